"""Hostile data sets through the network: deflate bombs, deep nesting, absurd sizes."""

from __future__ import annotations

import contextlib
import subprocess
from pathlib import Path

import pydicom
import pytest

from tests.hardening.datasets import absurd_image, deflate_bomb, nested_sequences
from tests.hardening.nodes import associate_for_storage, store_raw
from tests.hardening.rawdicom import (
    CT_IMAGE,
    DEFLATED,
    EXPLICIT_LE,
    Closed,
    p_data,
    pdv,
    process_figures,
    raw_peer,
    store_rq,
)
from tests.peers import PYDICOM_FILES, NodeProcess, peer_env, require_tool


def figure(name: str, value: float, unit: str) -> None:
    print(f"FIGURE {name}: {value:.3f} {unit}")


def _stored(node: NodeProcess) -> int:
    return int(node.status()["counts"]["instances"]["stored"])


def test_a_deflate_bomb_is_never_inflated(shared_node: NodeProcess) -> None:
    uid = pydicom.uid.generate_uid()
    bomb = deflate_bomb(uid)
    assert len(bomb) < 2 << 20  # 1 GiB of pixel data declared and deflated into this
    figure("deflate bomb: deflated size (inflates to 1 GiB)", len(bomb) / 1024, "KiB")
    before = process_figures(shared_node.proc.pid)
    with raw_peer(shared_node.port) as peer:
        ac = peer.associate([(1, CT_IMAGE, [DEFLATED]), (3, CT_IMAGE, [EXPLICIT_LE])])
        assert ac.accepted_contexts() == {1: 0x04, 3: 0}  # 4: transfer syntax not supported
        # send it anyway, on the refused context: the node aborts at the first fragment
        peer.send(p_data(pdv(1, 0x03, store_rq(CT_IMAGE, uid))))
        try:
            for i in range(0, len(bomb), 16000):
                peer.send(p_data(pdv(1, 0x00, bomb[i:i + 16000])))
        except OSError:
            pass
        with contextlib.suppress(Closed):
            assert peer.read_pdu().abort == (0x02, 0x06)
    after = process_figures(shared_node.proc.pid)
    figure("deflate bomb: node RSS growth", (after.hwm_kib - before.hwm_kib) / 1024, "MiB")
    assert after.hwm_kib - before.hwm_kib < 64 * 1024


def test_a_deflated_file_sent_by_dcmtk_is_refused(shared_node: NodeProcess,
                                                  tmp_path: Path) -> None:
    ds = pydicom.dcmread(PYDICOM_FILES / "CT_small.dcm")
    ds.SOPInstanceUID = pydicom.uid.generate_uid()
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    ds.file_meta.TransferSyntaxUID = pydicom.uid.DeflatedExplicitVRLittleEndian
    path = tmp_path / "deflated.dcm"
    ds.save_as(path, enforce_file_format=True)
    before = _stored(shared_node)
    # -dn: dcmtk must not inflate it itself, so only the deflated syntax is proposed
    out = subprocess.run([require_tool("dcmsend"), "-v", "-dn", "-aet", "STORESCU", "-aec",
                          "DICOMNODE", "127.0.0.1", str(shared_node.port), str(path)],
                         capture_output=True, text=True, env=peer_env(), timeout=60)
    assert "No Acceptable Presentation Contexts" in out.stderr, out.stderr
    assert _stored(shared_node) == before


@pytest.mark.parametrize("depth", [33, 500])
def test_deeply_nested_sequences_are_refused(shared_node: NodeProcess, depth: int) -> None:
    uid = pydicom.uid.generate_uid()
    data = nested_sequences(uid, depth)
    with raw_peer(shared_node.port) as peer:
        cx = associate_for_storage(peer)
        assert store_raw(peer, cx, uid, data) == 0xC001
    assert shared_node.proc.poll() is None
    assert "nested deeper than 32" in shared_node.log_text()


def test_nesting_at_the_limit_is_accepted(shared_node: NodeProcess) -> None:
    uid = pydicom.uid.generate_uid()
    with raw_peer(shared_node.port) as peer:
        cx = associate_for_storage(peer)
        assert store_raw(peer, cx, uid, nested_sequences(uid, 32)) == 0


def test_absurd_declared_sizes_are_refused_before_any_allocation(
        shared_node: NodeProcess) -> None:
    uid = pydicom.uid.generate_uid()
    before = process_figures(shared_node.proc.pid)
    with raw_peer(shared_node.port) as peer:
        cx = associate_for_storage(peer)
        assert store_raw(peer, cx, uid, absurd_image(uid)) == 0xC001
    after = process_figures(shared_node.proc.pid)
    assert after.hwm_kib - before.hwm_kib < 16 * 1024
    assert "Rows/Columns/Frames/Bits declare" in shared_node.log_text()
