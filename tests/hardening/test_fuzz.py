"""Protocol and data set fuzzing against a running node (hypothesis, derandomized).

Every generated case must end in an answer the protocol allows (an association answer,
an A-ABORT, a DIMSE status, a close); the node must not crash, anything it accepted must
be stored byte for byte as sent, and afterwards its threads and file descriptors must be
back to their baseline. The normal tier runs a small budget; ``-m slow`` runs more.
"""

from __future__ import annotations

import contextlib
import socket
import sqlite3
import struct
import time
from collections.abc import Iterator

import pydicom
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.hardening.nodes import dataset_bytes, hardened_node, store_raw
from tests.hardening.rawdicom import (
    CT_IMAGE,
    IMPLICIT_LE,
    VERIFICATION,
    Closed,
    ProcessFigures,
    RawPeer,
    associate_rq,
    back_to_baseline,
    echo_rq,
    p_data,
    process_figures,
    raw_peer,
    store_rq,
)
from tests.peers import PYDICOM_DATA, PYDICOM_FILES, NodeProcess

SEEDS = [PYDICOM_FILES / "CT_small.dcm", PYDICOM_FILES / "MR_small.dcm",
         PYDICOM_FILES / "rtplan.dcm", PYDICOM_FILES / "rtdose.dcm",
         PYDICOM_DATA / "emri_small.dcm", PYDICOM_FILES / "ExplVR_BigEnd.dcm",
         PYDICOM_FILES / "JPEG2000.dcm", PYDICOM_FILES / "waveform_ecg.dcm",
         PYDICOM_FILES / "MR_small_RLE.dcm"]
ALLOWED_STATUS = {0x0000, 0x0110, 0xA700, 0xA900} | set(range(0xB000, 0xB010)) | set(
    range(0xC000, 0xD000))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with hardened_node(tmp_path_factory.mktemp("fuzz")) as proc:
        ct = PYDICOM_FILES / "CT_small.dcm"
        ds = pydicom.dcmread(ct, stop_before_pixels=True)
        with raw_peer(proc.port) as peer:  # warm up (lazy imports, ledger) before baselines
            peer.associate([(1, CT_IMAGE, [str(ds.file_meta.TransferSyntaxUID)])])
            assert store_raw(peer, 1, str(ds.SOPInstanceUID), dataset_bytes(ct)) == 0
        time.sleep(1.0)
        yield proc


def _baseline(node: NodeProcess) -> ProcessFigures:
    time.sleep(0.5)
    return process_figures(node.proc.pid)


# -- protocol fuzzing ------------------------------------------------------------------

def _pdv(context_id: int, control: int, data: bytes, declared: int | None) -> bytes:
    length = len(data) + 2 if declared is None else declared
    return struct.pack(">LBB", length, context_id, control) + data


def _pdu(pdu_type: int, body: bytes, declared: int | None) -> bytes:
    return struct.pack(">BBL", pdu_type, 0, len(body) if declared is None else declared) + body


COMMANDS = st.sampled_from([echo_rq(), store_rq(CT_IMAGE, "1.2.3.4"), echo_rq()[:30],
                            b"\0" * 12])
PDV = st.builds(_pdv, st.sampled_from([1, 3, 5, 0, 255]), st.integers(0, 255),
                st.one_of(COMMANDS, st.binary(max_size=200)),
                st.one_of(st.none(), st.none(), st.integers(0, 2**32 - 1)))
P_DATA = st.lists(PDV, max_size=4).map(lambda pdvs: p_data(*pdvs))
RAW_PDU = st.builds(_pdu, st.one_of(st.integers(1, 7), st.integers(0, 255)),
                    st.binary(max_size=300),
                    st.one_of(st.none(), st.integers(0, 2**32 - 1)))
ASSOC_RQ = st.builds(lambda cut, calling: associate_rq(
    [(1, VERIFICATION, [IMPLICIT_LE]), (3, CT_IMAGE, [IMPLICIT_LE])], calling=calling)[:cut],
    st.integers(6, 400), st.sampled_from(["TESTSCU", "NOBODY", ""]))
SCENARIO = st.tuples(st.booleans(), st.lists(st.one_of(P_DATA, RAW_PDU, ASSOC_RQ,
                                                       st.binary(max_size=64)),
                                             min_size=1, max_size=5))


def _play(port: int, associate: bool, pdus: list[bytes]) -> list[int]:
    """Send the scenario; return the PDU types the node answered with."""
    seen: list[int] = []
    deadline = time.monotonic() + 10
    while True:
        peer = RawPeer(port, timeout=3)
        if not associate:
            break
        ac = peer.associate([(1, VERIFICATION, [IMPLICIT_LE]), (3, CT_IMAGE, [IMPLICIT_LE])])
        if ac.pdu_type == 0x02:
            break
        # the previous cases' associations may still be winding down: the limit is right
        assert ac.reject == (0x02, 0x03, 0x02) and time.monotonic() < deadline
        peer.close()
        time.sleep(0.05)
    with peer:
        with contextlib.suppress(OSError):
            for data in pdus:
                peer.send(data)
        peer.sock.settimeout(0.25)  # a node waiting for more is fine: we stop there
        with contextlib.suppress(Closed, TimeoutError, socket.timeout, OSError):
            while True:
                seen.append(peer.read_pdu().pdu_type)
    assert all(t in (0x02, 0x03, 0x04, 0x06, 0x07) for t in seen), seen
    return seen


def _protocol_fuzz(node: NodeProcess, examples: int) -> None:
    before = _baseline(node)

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(SCENARIO)
    def run(scenario: tuple[bool, list[bytes]]) -> None:
        _play(node.port, *scenario)
        assert node.proc.poll() is None, "the node died"

    run()
    with raw_peer(node.port) as peer:
        assert peer.associate().pdu_type == 0x02 and peer.echo() == 0
    after = back_to_baseline(node.proc.pid, before, timeout=30)
    print(f"protocol fuzz, {examples} examples: {before} -> {after}")


def test_protocol_fuzz(node: NodeProcess) -> None:
    _protocol_fuzz(node, 50)


@pytest.mark.slow
def test_protocol_fuzz_long(node: NodeProcess) -> None:
    _protocol_fuzz(node, 2000)


# -- data set fuzzing ------------------------------------------------------------------

def _mutate(data: bytes, mutations: list[tuple[str, int, int]]) -> bytes:
    buf = bytearray(data)
    for kind, where, value in mutations:
        if not buf:
            break
        pos = where % len(buf)
        if kind == "flip":
            buf[pos] ^= 1 << (value % 8)
        elif kind == "byte":
            buf[pos] = value % 256
        elif kind == "length":
            buf[pos:pos + 4] = struct.pack("<L", [0xFFFFFFFF, 0x7FFFFFFF, value % 2**32,
                                                  len(buf)][value % 4])
        elif kind == "truncate":
            del buf[pos:]
        elif kind == "insert":
            buf[pos:pos] = bytes([value % 256]) * (1 + value % 9)
    return bytes(buf)


MUTATION = st.tuples(st.sampled_from(["flip", "byte", "length", "truncate", "insert"]),
                     st.integers(0, 2**31), st.integers(0, 2**32 - 1))


def _stored_bytes(node: NodeProcess, sop_uid: str) -> bytes | None:
    with sqlite3.connect(node.storage / "ledger.sqlite3") as db:
        row = db.execute("SELECT path FROM instances WHERE sop_instance_uid=?",
                         (sop_uid,)).fetchone()
    return None if row is None else (node.storage / row[0]).read_bytes()


def _dataset_fuzz(node: NodeProcess, examples: int) -> None:
    seeds = []
    for path in SEEDS:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        seeds.append((str(ds.file_meta.MediaStorageSOPClassUID),
                      str(ds.file_meta.TransferSyntaxUID), str(ds.SOPInstanceUID),
                      dataset_bytes(path)))
    before = _baseline(node)
    outcomes: dict[str, int] = {}

    @settings(max_examples=examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.integers(0, len(seeds) - 1), st.lists(MUTATION, min_size=1, max_size=4))
    def run(seed: int, mutations: list[tuple[str, int, int]]) -> None:
        sop_class, syntax, sop_uid, data = seeds[seed]
        fuzzed = _mutate(data, mutations)
        with RawPeer(node.port, timeout=5) as peer:
            ac = peer.associate([(1, sop_class, [syntax])])
            assert ac.accepted_contexts() == {1: 0}, (sop_class, syntax)
            try:
                status = store_raw(peer, 1, sop_uid, fuzzed, sop_class=sop_class)
            except (Closed, AssertionError):
                outcomes["aborted"] = outcomes.get("aborted", 0) + 1
                return
        outcomes[f"0x{status:04X}"] = outcomes.get(f"0x{status:04X}", 0) + 1
        assert status in ALLOWED_STATUS, hex(status)
        if status == 0:  # accepted: must be stored exactly as sent
            stored = _stored_bytes(node, sop_uid)
            assert stored is not None and stored.endswith(fuzzed)
        assert node.proc.poll() is None, "the node died"

    run()
    after = back_to_baseline(node.proc.pid, before, timeout=30)
    assert list((node.storage / "tmp").iterdir()) == []
    print(f"data set fuzz, {examples} examples: {dict(sorted(outcomes.items()))}; "
          f"{before} -> {after}")


def test_dataset_fuzz(node: NodeProcess) -> None:
    _dataset_fuzz(node, 40)


@pytest.mark.slow
def test_dataset_fuzz_long(node: NodeProcess) -> None:
    _dataset_fuzz(node, 1500)

