"""What operations add on the association thread: metrics and the audit tally per
instance (``Operations.instance_stored`` + ``store_answered``) and per association end,
and how long the audit writer takes to store what that produced.

    .venv/bin/python scripts/bench_ops_overhead.py --n 200000
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from dicomnode.config import parse_settings
from dicomnode.ingest.ledger import InstanceRecord
from dicomnode.ops.audit import AuditTrail
from dicomnode.ops.observer import Operations


class _Association:
    """Stands in for pynetdicom's Association: the observer only hangs its tally on it."""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=200_000, help="instances")
    parser.add_argument("--associations", type=int, default=20_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="dicomnode-bench-ops-") as tmp:
        settings = parse_settings({"node": {"storage": tmp}})
        trail = AuditTrail(Path(tmp) / "audit.sqlite3", flush_interval_s=3600)
        ops = Operations(settings, None, trail)  # type: ignore[arg-type]  # no ledger reads here
        assoc = _Association()
        ops.association_accepted(assoc, "CT1", "127.0.0.1")
        record = InstanceRecord("1.2.3.4", "1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.3.1",
                                "0123456789abcdef", None, "CT", "objects/x", "0" * 64, 524_288,
                                "1.2.840.10008.1.2.1", "CT1", {})
        start = time.perf_counter()
        for _ in range(args.n):
            ops.instance_stored(assoc, record, "new")
            ops.store_answered(assoc, 0, 0.004)
        per_instance = (time.perf_counter() - start) / args.n
        ops.association_closed(assoc)
        trail.flush()
        start = time.perf_counter()
        for _ in range(args.associations):
            ops.association_accepted(assoc, "CT1", "127.0.0.1")
            ops.instance_stored(assoc, record, "new")
            ops.association_closed(assoc)
        per_association = (time.perf_counter() - start) / args.associations
        start = time.perf_counter()
        written = trail.flush()
        flush = time.perf_counter() - start
        trail.close()
    print(f"per instance (association thread): {per_instance * 1e6:.1f} us")
    print(f"per association (accept, 1 instance, end): {per_association * 1e6:.1f} us")
    print(f"audit writer: {written} records in one transaction in {flush * 1000:.0f} ms")


if __name__ == "__main__":
    main()
