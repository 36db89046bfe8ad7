"""From a verified spool file to a ledger record, and start-up reconciliation.

The spool file, fsynced and renamed under its content hash, is the durable record of a
received instance; the ledger row is committed before the success response but its WAL
is fsynced only by the next state transition (see ``Ledger.record_instance``). A killed
process loses nothing (the WAL is in the page cache). A power loss or kernel crash can
lose the last ledger commits, never the files, so after an unclean stop the node walks
the spool files written since the previous start and indexes those the ledger does not
know. Orthanc and dcmtk's storescp sync less than this (one fsync per instance, no
directory or index sync).

An unclean stop is recognised by the run marker: ``node.running`` in the storage root,
written (and fsynced) at start with the start time, removed after a clean stop has made
the ledger durable.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from dicomnode.ingest.completion import expected_instances
from dicomnode.ingest.ledger import InstanceRecord, Ledger
from dicomnode.ingest.parse import DatasetRejected, InstanceHeader, read_instance
from dicomnode.ingest.spool import Spool, StoredFile, fsync_dir

log = logging.getLogger(__name__)

MARKER = "node.running"
# file times are compared with the previous start; allow for a clock stepped back a little
CLOCK_SLACK_S = 3600.0


def build_record(header: InstanceHeader, stored: StoredFile, ledger: Ledger,
                 calling_ae: str, keywords: Sequence[str]) -> InstanceRecord:
    """The ledger record for a verified instance (identifiers hashed, never stored)."""
    ds = header.attrs
    patient = f"{ds.get('PatientID', '')}|{ds.get('IssuerOfPatientID', '')}"
    accession = str(ds.get("AccessionNumber", "") or "")
    expected, expected_by = expected_instances(ds)
    return InstanceRecord(
        sop_instance_uid=header.sop_instance_uid,
        sop_class_uid=header.sop_class_uid,
        study_uid=header.study_instance_uid,
        series_uid=header.series_instance_uid,
        patient_key=ledger.hash_identifier(patient),
        accession_key=ledger.hash_identifier(accession) if accession else None,
        modality=str(ds.get("Modality", "") or "") or None,
        path=stored.relpath,
        sha256=stored.sha256,
        size=stored.size,
        transfer_syntax=header.transfer_syntax_uid,
        calling_ae=calling_ae,
        attrs={k: ds[k] for k in keywords if k in ds},
        expected_count=expected,
        expected_by=expected_by,
    )


def unclean_since(root: Path) -> float | None:
    """The previous run's start time when that run did not stop cleanly (its marker is
    still there), else None. An unreadable marker means: reconcile everything (0.0)."""
    try:
        text = (root / MARKER).read_text(encoding="ascii", errors="replace").strip()
    except FileNotFoundError:
        return None
    try:
        return float(text)
    except ValueError:
        return 0.0


def mark_running(root: Path, now: float | None = None) -> None:
    """Write the run marker (after any reconciliation: a crash during one must leave the
    older start time in place, so the next start reconciles from there)."""
    marker = root / MARKER
    tmp = root / f"{MARKER}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, f"{time.time() if now is None else now:.3f}\n".encode("ascii"))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, marker)
    fsync_dir(root)


def mark_stopped(root: Path, ledger: Ledger) -> None:
    """After a clean stop: make the ledger durable, then remove the marker."""
    ledger.sync()
    with contextlib.suppress(FileNotFoundError):
        (root / MARKER).unlink()
        fsync_dir(root)


@dataclass(frozen=True)
class ReconcileReport:
    scanned: int = 0   # spool files written since the previous start
    indexed: int = 0   # of those, recorded now because the ledger had lost them
    mismatched: int = 0  # files whose bytes no longer match their name (kept, logged)
    unreadable: int = 0  # files that no longer parse (kept, logged)


def reconcile(spool: Spool, ledger: Ledger, since: float, keywords: Sequence[str],
              keep: frozenset[int] | None = None) -> ReconcileReport:
    """Index spool objects written at or after ``since`` that the ledger does not know."""
    cutoff = since - CLOCK_SLACK_S
    known = ledger.known_sha256(cutoff)
    scanned = 0
    unknown: list[tuple[float, Path]] = []
    for sub in sorted(spool.objects.iterdir()):
        if not sub.is_dir() or sub.is_symlink() or sub.stat().st_mtime < cutoff:
            continue
        for entry in os.scandir(sub):
            if not (entry.is_file(follow_symlinks=False) and entry.name.endswith(".dcm")):
                continue
            mtime = entry.stat(follow_symlinks=False).st_mtime
            if mtime < cutoff:
                continue
            scanned += 1
            if entry.name[:-4] not in known:
                unknown.append((mtime, Path(entry.path)))
    indexed = mismatched = unreadable = 0
    # oldest first: a re-sent instance's newer version must end up as the current one
    for _, path in sorted(unknown):
        digest = path.name[:-4]
        with path.open("rb") as fp:
            actual = hashlib.file_digest(fp, "sha256").hexdigest()
        if actual != digest:
            # the spool fsyncs before it renames, so this is damage, not a receive that
            # was cut short: keep the bytes for a person to look at, never index them
            log.error("spool object %s does not match its content hash; not indexed",
                      digest[:12])
            mismatched += 1
            continue
        try:
            header = read_instance(path, keep=keep)
        except DatasetRejected as rej:
            log.warning("spool object %s no longer parses (%s); left in place",
                        digest[:12], rej.reason)
            unreadable += 1
            continue
        stored = StoredFile(f"objects/{path.parent.name}/{path.name}", digest,
                            path.stat().st_size, created=True)
        ledger.record_instance(build_record(header, stored, ledger, header.sending_ae or "",
                                            keywords))
        indexed += 1
    ledger.sync()
    return ReconcileReport(scanned, indexed, mismatched, unreadable)
