"""A connection flood from many loopback addresses, run as its own process.

``python -m tests.hardening.flood --port P --seconds S --first 2 --last 40 --mode silent``
keeps ``--per-source`` connections open from each of 127.0.0.<first>..<last>,
reconnecting whenever the node closes one. ``silent`` connections never send a byte;
``slowloris`` ones send an A-ASSOCIATE-RQ one byte every ``--interval`` seconds. All of
127.0.0.0/8 is loopback on Linux, so each address looks like another host to the node.
Prints a JSON summary (connections made, refused or closed by the node) at the end.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import select
import socket
import time

from tests.hardening.rawdicom import IMPLICIT_LE, VERIFICATION, associate_rq


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--first", type=int, default=2)
    ap.add_argument("--last", type=int, default=40)
    ap.add_argument("--per-source", type=int, default=8)
    ap.add_argument("--mode", choices=["silent", "slowloris"], default="silent")
    ap.add_argument("--interval", type=float, default=0.1)
    args = ap.parse_args()
    rq = associate_rq([(1, VERIFICATION, [IMPLICIT_LE])], calling="FLOOD")
    sources = [f"127.0.0.{i}" for i in range(args.first, args.last + 1)]
    open_socks: dict[socket.socket, tuple[str, int]] = {}
    counts = {"connected": 0, "connect_failed": 0, "closed_by_node": 0, "bytes_sent": 0}
    end = time.monotonic() + args.seconds
    print("ready", flush=True)
    next_byte = time.monotonic()
    while time.monotonic() < end:
        per_source: dict[str, int] = {}
        for src, _ in open_socks.values():
            per_source[src] = per_source.get(src, 0) + 1
        for src in sources:
            for _ in range(args.per_source - per_source.get(src, 0)):
                s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                s.settimeout(0.5)
                try:
                    s.bind((src, 0))
                    s.connect(("127.0.0.1", args.port))
                except OSError:
                    counts["connect_failed"] += 1
                    s.close()
                    continue
                s.setblocking(False)
                open_socks[s] = (src, 0)
                counts["connected"] += 1
        readable, _, _ = select.select(list(open_socks), [], [], 0.05)
        for s in readable:
            try:
                data = s.recv(65536)
            except OSError:
                data = b""
            if not data:
                counts["closed_by_node"] += 1
                del open_socks[s]
                s.close()
        if args.mode == "slowloris" and time.monotonic() >= next_byte:
            next_byte = time.monotonic() + args.interval
            for s, (src, sent) in list(open_socks.items()):
                if sent < len(rq) - 1:  # never the last byte
                    with contextlib.suppress(OSError):
                        s.send(rq[sent:sent + 1])
                        open_socks[s] = (src, sent + 1)
                        counts["bytes_sent"] += 1
    for s in open_socks:
        s.close()
    print(json.dumps(counts), flush=True)


if __name__ == "__main__":
    main()
