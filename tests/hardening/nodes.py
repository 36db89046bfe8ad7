"""Starting hardened nodes and feeding them datasets through raw PDUs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pydicom

from tests.hardening.rawdicom import CT_IMAGE, EXPLICIT_LE, RawPeer, p_data, pdv, store_rq
from tests.peers import NodeProcess, free_port, node_config, start_node

# Tight limits so that the tests measure behaviour rather than wait for defaults.
HARDENED = {"max_pdu_size": 16384, "pdu_timeout_s": 0.5, "associate_timeout_s": 1.0,
            "max_associations": 4, "max_pending_connections": 16,
            "max_pending_per_address": 4}


@contextmanager
def hardened_node(workdir: Path, *, node: dict[str, Any] | None = None,
                  **config: Any) -> Iterator[NodeProcess]:
    extra = dict(config.pop("extra", {}) or {})
    extra["node"] = {**HARDENED, **(node or {})}
    cfg = node_config(workdir / "var", free_port(), extra=extra, **config)
    proc = start_node(workdir, cfg)
    try:
        yield proc
    finally:
        proc.stop()


def dataset_bytes(path: Path) -> bytes:
    """The encoded data set after the file meta information: what travels on the wire."""
    ds = pydicom.dcmread(path, stop_before_pixels=True)
    offset = 132 + 12 + int(ds.file_meta.FileMetaInformationGroupLength)
    return path.read_bytes()[offset:]


def store_raw(peer: RawPeer, context_id: int, sop_instance: str, data: bytes, *,
              sop_class: str = CT_IMAGE, fragment: int = 16378) -> int:
    """C-STORE ``data`` as it is, in fragments that fill 16 KiB PDUs exactly."""
    peer.send(p_data(pdv(context_id, 0x03, store_rq(sop_class, sop_instance))))
    chunks = [data[i:i + fragment] for i in range(0, len(data), fragment)] or [b""]
    for i, chunk in enumerate(chunks):
        peer.send(p_data(pdv(context_id, 0x02 if i == len(chunks) - 1 else 0x00, chunk)))
    return peer.read_pdu().status()


def associate_for_storage(peer: RawPeer, syntax: str = EXPLICIT_LE, **kwargs: Any) -> int:
    """Associate with one CT storage context; returns its context id (asserts accepted)."""
    ac = peer.associate([(1, CT_IMAGE, [syntax])], **kwargs)
    assert ac.pdu_type == 0x02, f"association not accepted: {ac}"
    assert ac.accepted_contexts() == {1: 0}
    return 1


def timed(fn: Any, *args: Any, **kwargs: Any) -> tuple[Any, float]:
    start = time.monotonic()
    result = fn(*args, **kwargs)
    return result, time.monotonic() - start
