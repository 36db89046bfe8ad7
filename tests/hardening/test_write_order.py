"""The order of operations before a C-STORE success, proven from the system calls.

The node runs under strace; for one stored instance the trace must show, in this order:
fsync of the received temp file, rename to its content-hash name, fsync of the object
directory, the ledger's commit (its frames written to ledger.sqlite3-wal), and only then
the P-DATA-TF carrying the C-STORE response. The WAL is not fsynced per instance (the
fsynced spool file is the durable record; ingest/reconcile.py re-indexes it after an
unclean stop), so the trace must also show the clean stop fsyncing the WAL and removing
the run marker.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import yaml

from tests.peers import (
    PYDICOM_FILES,
    REPO,
    free_port,
    node_config,
    port_open,
    require_tool,
    storescu,
    wait_for,
)

_LINE = re.compile(r"^(?P<pid>\d+)\s+(?P<t>[\d.]+)\s+(?P<call>\w+)\((?P<args>.*)\)\s+=\s+"
                   r"(?P<ret>-?\d+)")


def _events(trace: str) -> list[tuple[float, str, str, int]]:
    """(time, syscall, path-or-fd description, return value) in trace order."""
    fds: dict[int, str] = {}
    out = []
    for line in trace.splitlines():
        m = _LINE.match(line)
        if not m:
            continue
        call, args, ret = m["call"], m["args"], int(m["ret"])
        if call == "openat" and ret >= 0:
            path = re.search(r'"([^"]*)"', args)
            fds[ret] = path.group(1) if path else "?"
            out.append((float(m["t"]), call, fds[ret], ret))
        elif call in ("fsync", "fdatasync"):
            fd = int(args.split(",")[0])
            out.append((float(m["t"]), call, fds.get(fd, f"fd {fd}"), ret))
        elif call in ("rename", "renameat", "renameat2"):
            out.append((float(m["t"]), call, args, ret))
        elif call in ("sendto", "sendmsg", "write", "pwrite64"):
            fd = int(args.split(",")[0])
            first = re.search(r'"(\\\d+|.)', args)
            where = fds.get(fd, f"fd {fd}")
            out.append((float(m["t"]), call, f"{where} {first.group(1) if first else ''}", ret))
        elif call in ("unlink", "unlinkat"):
            out.append((float(m["t"]), call, args, ret))
    return out


def test_write_fsync_rename_dirfsync_commit_then_respond(tmp_path: Path) -> None:
    strace = require_tool("strace")
    port = free_port()
    config = node_config(tmp_path / "var", port)
    config["completion"] = {"series_quiet_s": 600, "study_quiet_s": 600}
    cfg = tmp_path / "node.yaml"
    cfg.write_text(yaml.safe_dump(config))
    trace_file = tmp_path / "trace.txt"
    proc = subprocess.Popen(
        [strace, "-f", "-ttt", "-o", str(trace_file), "-e",
         "trace=openat,fsync,fdatasync,rename,renameat,renameat2,sendto,sendmsg,write,pwrite64,"
         "unlink,unlinkat",
         sys.executable, "-m", "dicomnode.cli", "serve", "--config", str(cfg)],
        cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: port_open(port), 60, "the traced node to listen")
        storescu(port, [PYDICOM_FILES / "CT_small.dcm"])
    finally:
        # the first pid in the trace is the node itself (strace execs it); stop it so
        # strace exits on its own and flushes the trace
        first = trace_file.read_text().split(None, 1)[0] if trace_file.exists() else ""
        if first.isdigit():
            os.kill(int(first), signal.SIGTERM)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)
    events = _events(trace_file.read_text())
    renames = [i for i, e in enumerate(events) if e[1].startswith("rename") and "/objects/" in e[2]]
    assert len(renames) == 1, "expected exactly one rename into objects/"
    r = renames[0]
    temp = re.search(r'"([^"]+\.part)"', events[r][2])
    assert temp is not None
    temp_path = temp.group(1)
    before, after = events[:r], events[r + 1:]
    assert any(e[1] in ("fsync", "fdatasync") and e[2] == temp_path for e in before), \
        "the temp file was not fsynced before the rename"
    dir_sync = next(i for i, e in enumerate(after)
                    if e[1] in ("fsync", "fdatasync") and "/objects/" in e[2] + "/")
    wal_commit = next(i for i, e in enumerate(after)
                      if e[1] in ("write", "pwrite64") and "ledger.sqlite3-wal " in e[2])
    response = next(i for i, e in enumerate(after)
                    if e[1] in ("sendto", "sendmsg", "write") and e[2].endswith("\\4"))
    assert dir_sync < wal_commit < response, (
        f"order: dir fsync {dir_sync}, WAL commit {wal_commit}, response {response}")
    # the clean stop makes the ledger durable before it removes the run marker
    wal_sync = [i for i, e in enumerate(after) if i > response
                and e[1] in ("fsync", "fdatasync") and e[2].endswith("ledger.sqlite3-wal")]
    marker_gone = [i for i, e in enumerate(after)
                   if e[1].startswith("unlink") and "node.running" in e[2]]
    assert marker_gone and any(w < marker_gone[-1] for w in wal_sync), \
        "the clean stop did not fsync the WAL before removing the run marker"
    assert not (tmp_path / "var" / "node.running").exists()
