"""Command line: ``dicomnode serve|worker|send|status|check-config|demo|phantom``.

Errors print one line and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from dicomnode.config import DEFAULT_CONFIG, ConfigError, Settings, load_settings


class CliError(Exception):
    """An error whose message is the whole story for the user."""


def _settings(args: argparse.Namespace) -> Settings:
    path = Path(args.config) if args.config else DEFAULT_CONFIG
    return load_settings(path)


def _setup_logging(level: str) -> None:
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")


def cmd_serve(args: argparse.Namespace) -> int:
    from dicomnode.service import Node

    settings = _settings(args)
    _setup_logging("DEBUG" if args.debug else settings.log_level)
    Node(settings).serve_forever()
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    settings = _settings(args)
    if settings.jobs.engine != "celery":
        raise CliError(f"{settings.source}: jobs.engine: a worker needs engine celery "
                       "and a broker (jobs: {engine: celery, broker: redis://host:6379/0})")
    _setup_logging("DEBUG" if args.debug else settings.log_level)
    from dicomnode.jobs.celery_engine import run_worker

    return run_worker(settings)


def cmd_check_config(args: argparse.Namespace) -> int:
    settings = _settings(args)
    print(f"{settings.source}: OK ({len(settings.routes)} route(s), "
          f"{len(settings.destinations)} destination(s), "
          f"{len(settings.security.allowed_callers)} allowed caller(s))")
    return 0


# Magic numbers of executables and archives that a DICOM preamble can carry as a
# polyglot (CVE-2019-11687). TIFF ("II*\0", "MM\0*") is a legitimate dual format.
_EXECUTABLE_MAGIC = {
    b"MZ": "a Windows executable (PE)",
    b"\x7fELF": "an ELF executable",
    b"#!": "a script",
    b"\xca\xfe\xba\xbe": "a Mach-O or Java class file",
    b"\xcf\xfa\xed\xfe": "a Mach-O executable",
    b"\xce\xfa\xed\xfe": "a Mach-O executable",
    b"PK\x03\x04": "a ZIP/JAR archive",
}


def preamble_warning(path: Path) -> str | None:
    """Why the file's 128-byte preamble looks executable (CVE-2019-11687), or None.

    The preamble never travels over the network, so sending such a file is harmless to
    the receiver; but the file itself is a polyglot that can run on the machine holding
    it, which the operator should know.
    """
    try:
        with path.open("rb") as fp:
            head = fp.read(132)
    except OSError:
        return None
    if len(head) < 132 or head[128:132] != b"DICM":
        return None
    for magic, what in _EXECUTABLE_MAGIC.items():
        if head.startswith(magic):
            return f"preamble is {what} (CVE-2019-11687 polyglot)"
    return None


def cmd_send(args: argparse.Namespace) -> int:
    from dicomnode.net.scu import AssociationFailed, send_files

    paths: list[Path] = []
    for p in args.paths:
        path = Path(p)
        if path.is_dir():
            paths.extend(sorted(q for q in path.rglob("*") if q.is_file()
                                and q.suffix.lower() in (".dcm", "")))
        elif path.is_file():
            paths.append(path)
        else:
            raise CliError(f"{p}: no such file or directory")
    if not paths:
        raise CliError("nothing to send")
    for path in paths:
        if (why := preamble_warning(path)) is not None:
            print(f"warning: {path}: {why}; the preamble is not sent", file=sys.stderr)
    try:
        results = send_files(paths, host=args.host, port=args.port, called_aet=args.called_aet,
                             calling_aet=args.calling_aet)
    except AssociationFailed as exc:
        raise CliError(str(exc)) from exc
    failed = [r for r in results if r.category == "failure"]
    for r in results:
        status = "none" if r.status is None else f"0x{r.status:04X}"
        if args.verbose or r.category != "success":
            print(f"{r.path}: {r.category} ({status}){' ' + r.error if r.error else ''}")
    print(f"sent {len(results) - len(failed)}/{len(results)} file(s)")
    return 1 if failed else 0


def cmd_status(args: argparse.Namespace) -> int:
    from dicomnode.service import LEDGER_NAME, open_ledger

    settings = _settings(args)
    if settings.ledger.url is None and not (settings.spool_dir / LEDGER_NAME).exists():
        raise CliError(f"no ledger at {settings.spool_dir / LEDGER_NAME}: has the node run?")
    ledger = open_ledger(settings, readonly=True)
    counts = ledger.counts()
    failures = ledger.failures()
    unmatched = len(ledger.unmatched_series(1000))
    report: dict[str, Any] = {"counts": counts, **failures, "unmatched_series": unmatched}
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    c = counts
    print(f"instances stored: {c['instances']['stored']}")
    for table in ("studies", "series", "jobs", "outbox"):
        parts = ", ".join(f"{k} {v}" for k, v in sorted(c[table].items())) or "none"
        print(f"{table}: {parts}")
    print(f"series matched by no route: {unmatched}")
    for job in failures["failed_jobs"]:
        print(f"FAILED job {job['id']} ({job['route']}, {job['attempts']} attempt(s)): "
              f"{str(job['error']).splitlines()[0] if job['error'] else ''}")
    for dl in failures["dead_letters"]:
        print(f"DEAD result {dl['id']} to {dl['destination']} after {dl['attempts']} "
              f"attempt(s): {dl['error']}")
    return 0


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the audit trail (JSON lines or DICOM audit messages), or check its chain."""
    from dicomnode.ops.atna import export_xml
    from dicomnode.ops.audit import AUDIT_NAME, AuditTrail

    settings = _settings(args)
    path = settings.spool_dir / AUDIT_NAME
    if not path.exists():
        raise CliError(f"no audit trail at {path}: has the node run?")
    trail = AuditTrail(path)
    try:
        if args.verify:
            broken = trail.verify()
            if broken is not None:
                print(f"audit trail {path}: the hash chain breaks at record {broken}")
                return 1
            print(f"audit trail {path}: hash chain intact")
            return 0
        records = trail.records(after=args.after, limit=args.limit)
        if args.format == "atna":
            sys.stdout.write(export_xml(records, node_ae=settings.node.ae_title,
                                        source_id=f"dicomnode/{settings.node.ae_title}")
                             .decode())
        else:
            for record in records:
                print(json.dumps(record.to_json(), sort_keys=True))
    finally:
        trail.close()
    return 0


def cmd_phantom(args: argparse.Namespace) -> int:
    from dicomnode.phantoms import registry

    writers = registry.phantom_kinds()
    if args.kind not in writers:
        raise CliError(f"unknown phantom kind {args.kind!r}; known: {', '.join(sorted(writers))}")
    out = Path(args.out)
    paths = writers[args.kind](out, n=args.n, seed=args.seed)
    print(f"wrote {len(paths)} file(s) under {out}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from dicomnode.demo import run_demo

    _setup_logging("DEBUG" if args.debug else "WARNING")
    return int(run_demo(Path(args.workdir), n=args.n, seed=args.seed, keep=args.keep))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicomnode", description=__doc__)
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logs")
    sub = parser.add_subparsers(dest="command", required=True)

    def with_config(p: argparse.ArgumentParser) -> None:
        p.add_argument("--config", help=f"YAML config (default: {DEFAULT_CONFIG})")

    p = sub.add_parser("serve", help="run the node until SIGTERM/SIGINT")
    with_config(p)
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run analysis only, taking jobs from the Celery broker "
                       "(jobs.engine: celery) until SIGTERM/SIGINT")
    with_config(p)
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("check-config", help="validate a config file without starting")
    with_config(p)
    p.set_defaults(func=cmd_check_config)

    p = sub.add_parser("send", help="C-STORE files or folders to a peer")
    p.add_argument("paths", nargs="+")
    p.add_argument("--host", required=True)
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--called-aet", required=True)
    p.add_argument("--calling-aet", default="DICOMNODE")
    p.add_argument("-v", "--verbose", action="store_true")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser("status", help="summarise the ledger")
    with_config(p)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("audit", help="print the audit trail, or check its hash chain")
    with_config(p)
    p.add_argument("--format", choices=("json", "atna"), default="json",
                   help="JSON lines, or DICOM audit messages (PS3.15 A.5, IHE ATNA)")
    p.add_argument("--after", type=int, default=0, help="only records after this id")
    p.add_argument("--limit", type=int, default=10_000)
    p.add_argument("--verify", action="store_true", help="check the hash chain")
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("phantom", help="write synthetic studies with ground truth")
    p.add_argument("kind")
    p.add_argument("--out", required=True)
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=cmd_phantom)

    p = sub.add_parser("demo", help="run the whole loop on the embedded defaults")
    p.add_argument("--workdir", default="./var/demo")
    p.add_argument("--n", type=int, default=4)
    p.add_argument("--seed", type=int, default=7)
    p.add_argument("--keep", action="store_true", help="keep the PACS running afterwards")
    p.set_defaults(func=cmd_demo)

    from dicomnode.training.commands import register as register_training

    register_training(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    func: Callable[[argparse.Namespace], int] = args.func
    try:
        return int(func(args))
    except ConfigError as exc:
        if args.debug:
            raise
        for problem in exc.problems:
            print(f"config error: {problem}", file=sys.stderr)
        return 2
    except (CliError, OSError) as exc:
        if args.debug:
            raise
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
