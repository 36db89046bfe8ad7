"""PDU limits: the advertised maximum, per-PDU deadlines and DIMSE framing, enforced.

Default pynetdicom reads a 256 MiB PDU into memory although it advertised 16 KiB, and
waits forever for a PDU that never ends. Each case here must end in an A-ABORT within
1 s, cost the node no memory, and leave it serving others.
"""

from __future__ import annotations

import struct
import time
from collections.abc import Iterator

import pydicom
import pytest

from tests.hardening.nodes import associate_for_storage, dataset_bytes, hardened_node, store_raw
from tests.hardening.rawdicom import (
    CT_IMAGE,
    IMPLICIT_LE,
    VERIFICATION,
    Closed,
    RawPeer,
    back_to_baseline,
    echo_rq,
    find_rq,
    p_data,
    pdv,
    process_figures,
    raw_peer,
    store_rq,
)
from tests.peers import PYDICOM_FILES, NodeProcess

CT = PYDICOM_FILES / "CT_small.dcm"


def figure(name: str, value: float, unit: str) -> None:
    print(f"FIGURE {name}: {value:.3f} {unit}")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with hardened_node(tmp_path_factory.mktemp("pdu")) as proc:
        yield proc


@pytest.fixture(scope="module")
def baseline(node: NodeProcess) -> Iterator[None]:
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    with raw_peer(node.port) as peer:  # warm up: the first store imports lazily
        cx = associate_for_storage(peer, str(ds.file_meta.TransferSyntaxUID))
        assert store_raw(peer, cx, str(ds.SOPInstanceUID), dataset_bytes(CT)) == 0
    time.sleep(1.0)
    before = process_figures(node.proc.pid)
    yield
    after = back_to_baseline(node.proc.pid, before)
    print(f"baseline {before} -> {after}")


def _expect_abort(peer: RawPeer, within: float = 1.0) -> tuple[int, int]:
    start = time.monotonic()
    pdu = peer.read_pdu()
    elapsed = time.monotonic() - start
    assert elapsed < within, f"A-ABORT after {elapsed:.2f} s"
    return pdu.abort


def _still_serving(node: NodeProcess) -> None:
    with raw_peer(node.port) as peer:
        assert peer.associate().pdu_type == 0x02
        assert peer.echo() == 0


def test_oversized_pdu_is_aborted_at_once_and_costs_no_memory(node: NodeProcess,
                                                              baseline: None) -> None:
    before = process_figures(node.proc.pid)
    with raw_peer(node.port) as peer:
        assert peer.associate().pdu_type == 0x02
        start = time.monotonic()
        peer.send(struct.pack(">BBL", 0x04, 0, 256 * 1024 * 1024))
        sent = 0
        try:  # keep pushing the announced body until the node stops reading
            while sent < 64 * 1024 * 1024 and time.monotonic() - start < 2:
                peer.send(b"\0" * 65536)
                sent += 65536
        except OSError:
            pass
        with pytest.raises(Closed):  # the abort came first, then the close
            while True:
                pdu = peer.read_pdu()
                assert pdu.abort == (0x02, 0x06)
                elapsed = time.monotonic() - start
    after = process_figures(node.proc.pid)
    figure("oversized PDU: time to A-ABORT", elapsed, "s")
    figure("oversized PDU: node RSS growth", (after.hwm_kib - before.hwm_kib) / 1024, "MiB")
    assert elapsed < 1.0
    assert after.hwm_kib - before.hwm_kib < 64 * 1024
    _still_serving(node)


def test_pdus_of_exactly_the_maximum_are_accepted(node: NodeProcess, baseline: None) -> None:
    ds = pydicom.dcmread(CT, stop_before_pixels=True)
    with raw_peer(node.port) as peer:
        cx = associate_for_storage(peer, str(ds.file_meta.TransferSyntaxUID))
        assert store_raw(peer, cx, str(ds.SOPInstanceUID), dataset_bytes(CT)) == 0


def test_one_byte_over_the_maximum_is_aborted(node: NodeProcess, baseline: None) -> None:
    with raw_peer(node.port) as peer:
        cx = associate_for_storage(peer)
        peer.send(p_data(pdv(cx, 0x03, store_rq(CT_IMAGE, "1.2.3.4"))))
        peer.send(p_data(pdv(cx, 0x00, b"\0" * 16379)))  # PDU length 16385
        assert _expect_abort(peer) == (0x02, 0x06)
    _still_serving(node)


@pytest.mark.parametrize("behaviour", ["stops", "trickles"])
def test_a_pdu_that_never_ends_is_aborted_within_a_second(node: NodeProcess, baseline: None,
                                                          behaviour: str) -> None:
    with raw_peer(node.port) as peer:
        assert peer.associate().pdu_type == 0x02
        start = time.monotonic()
        peer.send(struct.pack(">BBL", 0x04, 0, 1000) + b"\0\0\0")
        if behaviour == "trickles":
            peer.sock.settimeout(0.05)
            while True:
                try:
                    head = peer.sock.recv(6)
                    break
                except TimeoutError:
                    peer.send(b"\0")
            peer.sock.settimeout(5)
            assert head[:1] == b"\x07"
        else:
            assert peer.read_pdu().abort == (0x02, 0x00)
        elapsed = time.monotonic() - start
    figure(f"PDU that {behaviour}: time to A-ABORT (pdu_timeout_s 0.5)", elapsed, "s")
    assert elapsed < 1.0
    _still_serving(node)


def _cases() -> dict[str, tuple[list[bytes], tuple[int, int]]]:
    """Name -> (PDUs to send after associating with Verification and CT storage, abort)."""
    echo = echo_rq()
    return {
        "PDV longer than its PDU": (
            [p_data(struct.pack(">LBB", 5000, 1, 3) + echo)], (0x02, 0x06)),
        "PDV of length 1": ([p_data(struct.pack(">LB", 1, 1) + b"\0")], (0x02, 0x06)),
        "unknown PDU type": ([bytes([0x09, 0, 0, 0, 0, 4, 0, 0, 0, 0])], (0x02, 0x01)),
        "A-RELEASE-RQ with a body": ([bytes([0x05, 0, 0, 0, 0x10, 0]) + b"\0" * 4096],
                                     (0x02, 0x06)),
        "data set before any command": ([p_data(pdv(3, 0x02, b"\0" * 64))], (0x02, 0x06)),
        "context that was not accepted": ([p_data(pdv(5, 0x03, echo))], (0x02, 0x06)),
        "context switch inside a message": (
            [p_data(pdv(1, 0x01, echo[:20])), p_data(pdv(3, 0x03, echo[20:]))], (0x02, 0x06)),
        "endless command set": ([p_data(pdv(1, 0x01, b"\0" * 16000))] * 5, (0x02, 0x06)),
        "malformed command set": ([p_data(pdv(1, 0x03, b"\x00\x00\x00\x00\xff\xff"))],
                                  (0x02, 0x06)),
        "C-FIND on a storage context": ([p_data(pdv(3, 0x03, find_rq()))], (0x02, 0x02)),
        "data set for an echo": (
            [p_data(pdv(1, 0x03, echo_rq(dataset_type=0x0000)))]
            + [p_data(pdv(1, 0x00, b"\0" * 16000))] * 80, (0x02, 0x06)),
    }


@pytest.mark.parametrize("case", list(_cases()))
def test_protocol_violations_are_aborted(node: NodeProcess, baseline: None, case: str) -> None:
    pdus, abort = _cases()[case]
    with raw_peer(node.port) as peer:
        ac = peer.associate([(1, VERIFICATION, [IMPLICIT_LE]), (3, CT_IMAGE, [IMPLICIT_LE])])
        assert ac.accepted_contexts() == {1: 0, 3: 0}
        start = time.monotonic()
        try:
            for data in pdus:
                peer.send(data)
        except OSError:
            pass  # the node may abort and close before the last PDU is sent
        assert peer.read_pdu().abort == abort
        assert time.monotonic() - start < 1.0
    _still_serving(node)


def test_the_first_pdu_must_be_an_association_request(node: NodeProcess,
                                                      baseline: None) -> None:
    with raw_peer(node.port) as peer:
        peer.send(p_data(pdv(1, 0x03, echo_rq())))
        assert _expect_abort(peer) == (0x02, 0x02)


def test_an_aborted_store_leaves_no_partial_file(node: NodeProcess, baseline: None) -> None:
    with raw_peer(node.port) as peer:
        cx = associate_for_storage(peer)
        peer.send(p_data(pdv(cx, 0x03, store_rq(CT_IMAGE, "1.2.3.5"))))
        peer.send(p_data(pdv(cx, 0x00, b"\0" * 8000)))
        peer.send(struct.pack(">BBL", 0x04, 0, 10**9))
        assert _expect_abort(peer) == (0x02, 0x06)
    tmp = node.storage / "tmp"
    deadline = time.monotonic() + 5
    while list(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert list(tmp.iterdir()) == []


def test_the_log_names_each_refusal_without_data(node: NodeProcess, baseline: None) -> None:
    text = node.log_text()
    assert "exceeds the advertised maximum of 16384" in text
    assert "Traceback" not in text


@pytest.mark.parametrize("fault", ["reset", "half-open"])
def test_a_connection_lost_mid_dataset_stores_nothing(node: NodeProcess, baseline: None,
                                                      fault: str) -> None:
    """A peer that resets (RST) or half-closes its side in the middle of a data set: no
    instance is recorded, no partial file is left, and the node keeps serving."""
    import socket as _socket

    before = node.status()["counts"]["instances"]["stored"]
    peer = RawPeer(node.port)
    cx = associate_for_storage(peer)
    peer.send(p_data(pdv(cx, 0x03, store_rq(CT_IMAGE, "1.2.3.77"))))
    peer.send(p_data(pdv(cx, 0x00, b"\0" * 8000)))
    sock = peer.sock
    if fault == "reset":
        sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    else:
        sock.shutdown(_socket.SHUT_WR)
    tmp = node.storage / "tmp"
    deadline = time.monotonic() + 15
    while list(tmp.iterdir()) and time.monotonic() < deadline:
        time.sleep(0.05)
    if fault != "reset":
        peer.close()
    assert list(tmp.iterdir()) == []
    assert node.status()["counts"]["instances"]["stored"] == before
    with raw_peer(node.port) as again:
        associate_for_storage(again)
