"""The spool: received bytes on disk, exactly as they came, under content-derived names.

Layout under the storage root::

    tmp/            partial files being received (removed at start-up: never acknowledged)
    objects/ab/...  received instances, named by the sha256 of their bytes
    results/ab/...  result objects the node produced, named the same way

A file reaches ``objects/`` only by ``rename`` after ``fsync``, and the directory is
fsynced after the rename, so a name under ``objects/`` always refers to complete,
durable bytes. No name is ever derived from a peer-supplied string.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import secrets
import stat
from dataclasses import dataclass
from pathlib import Path


class SpoolFull(Exception):
    """The filesystem holding the spool is out of space (or quota)."""


class InstanceTooLarge(Exception):
    """An incoming instance exceeded the configured size cap."""


@dataclass(frozen=True)
class StoredFile:
    relpath: str  # relative to the storage root, e.g. "objects/ab/ab12....dcm"
    sha256: str
    size: int
    created: bool  # False when identical bytes were already stored


def fsync_dir(path: Path) -> None:
    """Make a rename or a new entry in this directory durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SpoolTempFile:
    """A write-only temporary file that hashes as it writes and never raises on write.

    pynetdicom writes received fragments from its reactor thread, where an exception
    would abort the association without a status. Errors (disk full, size cap) are
    remembered instead, later writes are dropped, and the store handler turns the
    remembered error into the proper DICOM status.
    """

    def __init__(self, directory: Path, max_bytes: int) -> None:
        self.path = directory / f"{secrets.token_hex(16)}.part"
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0)
        self._fd: int | None = os.open(self.path, flags, 0o600)
        self._hash = hashlib.sha256()
        self.size = 0
        self.max_bytes = max_bytes
        self.error: Exception | None = None

    # pynetdicom uses .name, .write, .file.flush() and .close()
    @property
    def name(self) -> str:
        return str(self.path)

    @property
    def file(self) -> SpoolTempFile:
        return self

    def flush(self) -> None:
        """Data is written with os.write, so there is no user-space buffer to flush."""

    def write(self, data: bytes | bytearray | memoryview) -> int:
        if self.error is not None or self._fd is None:
            return len(data)
        if self.size + len(data) > self.max_bytes:
            self.error = InstanceTooLarge(f"instance larger than {self.max_bytes} bytes")
            self._truncate()
            return len(data)
        view = memoryview(data)
        try:
            while view:
                n = os.write(self._fd, view)
                self._hash.update(view[:n])
                view = view[n:]
                self.size += n
        except OSError as exc:
            self.error = SpoolFull(str(exc)) if exc.errno in (errno.ENOSPC, errno.EDQUOT) else exc
            self._truncate()
        return len(data)

    def _truncate(self) -> None:
        """Give the space back at once: a full disk must not stay full because of us."""
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)

    def fsync(self) -> None:
        if self._fd is None:
            raise ValueError("file already closed")
        try:
            os.fsync(self._fd)
        except OSError as exc:
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(str(exc)) from exc
            raise

    def hexdigest(self) -> str:
        return self._hash.hexdigest()

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def discard(self) -> None:
        self.close()
        with contextlib.suppress(FileNotFoundError):
            self.path.unlink()


class Spool:
    """Owns the storage root's directories and the write-fsync-rename protocol."""

    def __init__(self, root: Path, *, max_instance_bytes: int = 4 * 1024**3,
                 tmp_name: str | None = None) -> None:
        """``tmp_name``: this receiver's own folder under ``tmp/`` where several share
        the spool (each clears only its own partial files at start)."""
        self.root = root.resolve()
        self.tmp = self.root / "tmp" / tmp_name if tmp_name else self.root / "tmp"
        self.objects = self.root / "objects"
        self.results = self.root / "results"
        self.max_instance_bytes = max_instance_bytes
        for d in (self.root, self.tmp, self.objects, self.results):
            d.mkdir(mode=0o700, parents=True, exist_ok=True)

    def clear_partials(self) -> int:
        """Remove leftovers of receives that never got a status (crash, abort)."""
        removed = 0
        for entry in self.tmp.iterdir():
            if entry.is_file() or entry.is_symlink():
                entry.unlink()
                removed += 1
        return removed

    def new_temp(self) -> SpoolTempFile:
        return SpoolTempFile(self.tmp, self.max_instance_bytes)

    def commit(self, temp: SpoolTempFile, area: str = "objects") -> StoredFile:
        """fsync, rename to the hash-derived name, fsync the directory.

        Identical bytes already stored are not written again (the temp file is dropped).
        """
        if temp.error is not None:
            err = temp.error
            temp.discard()
            raise err
        try:
            temp.fsync()
        except Exception:
            temp.discard()
            raise
        temp.close()
        digest = temp.hexdigest()
        base = self.objects if area == "objects" else self.results
        subdir = base / digest[:2]
        final = subdir / f"{digest}.dcm"
        relpath = f"{area}/{digest[:2]}/{digest}.dcm"
        if final.exists():
            temp.discard()
            return StoredFile(relpath, digest, temp.size, created=False)
        new_dir = not subdir.exists()
        try:
            subdir.mkdir(mode=0o700, exist_ok=True)
            os.rename(temp.path, final)
            fsync_dir(subdir)
            if new_dir:
                fsync_dir(base)
        except OSError as exc:
            temp.discard()
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise SpoolFull(str(exc)) from exc
            raise
        return StoredFile(relpath, digest, temp.size, created=True)

    def write_bytes(self, data: bytes, area: str = "results") -> StoredFile:
        temp = SpoolTempFile(self.tmp, max(self.max_instance_bytes, len(data)))
        temp.write(data)
        return self.commit(temp, area)

    def path(self, relpath: str) -> Path:
        """Resolve a ledger path, refusing anything that would leave the storage root."""
        candidate = (self.root / relpath).resolve()
        if self.root not in candidate.parents:
            raise ValueError("path outside the spool")
        st = os.lstat(candidate)
        if stat.S_ISLNK(st.st_mode):
            raise ValueError("symlink in the spool")
        return candidate
