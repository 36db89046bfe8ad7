"""The audit trail forwarded to an Audit Record Repository (``audit.syslog``, IHE ITI-20):
Debian's rsyslog, started by the test, receives over UDP, TCP (octet counting) and mutual
TLS. Each message must parse as RFC 5424 twice (rsyslog's parser and the test's own),
carry the ITI-20 header values, and hold a DICOM audit message that passes the
project's transcription of the schema; a node's forwarded messages are its local
trail's exportable records, one for one. An absent repository costs nothing but
counted failures and a bounded queue; a restarted one gets the next record."""

from __future__ import annotations

import logging
import os
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from dicomnode.config import SyslogSettings, parse_settings
from dicomnode.ops.audit import MINOR_FAILURE, AuditTrail
from dicomnode.ops.syslog import BOM, SyslogForwarder
from dicomnode.phantoms.dat_spect import write_dat_study
from dicomnode.service import Node
from tests.atna_schema import check_audit_message
from tests.hardening.certs import issue, make_ca
from tests.peers import free_port, node_config, storescu, wait_for
from tests.rsyslog import Rsyslog, TlsFiles, parse_rfc5424, start_rsyslog


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    d = tmp_path_factory.mktemp("pki")
    ca, other = make_ca(d, "arr-ca"), make_ca(d, "other-ca")
    arr, node = issue(ca, d, "arr", server=True), issue(ca, d, "node", server=False)
    return {"ca": ca.pem, "other_ca": other.pem, "arr_cert": arr.cert, "arr_key": arr.key,
            "node_cert": node.cert, "node_key": node.key}


@pytest.fixture(scope="module")
def arr(tmp_path_factory: pytest.TempPathFactory, pki: dict[str, Path]) -> Iterator[Rsyslog]:
    server = start_rsyslog(tmp_path_factory.mktemp("rsyslog"),
                           TlsFiles(pki["ca"], pki["arr_cert"], pki["arr_key"]))
    yield server
    server.stop()


def _syslog(url: str, pki: dict[str, Path], **extra: object) -> dict[str, object]:
    config: dict[str, object] = {"url": url, **extra}
    if url.startswith("tls://"):
        config = {"ca": str(pki["ca"]), "cert": str(pki["node_cert"]),
                  "key": str(pki["node_key"]), **config}
    return config


def _settings(url: str, pki: dict[str, Path], **extra: object) -> SyslogSettings:
    syslog = parse_settings({"audit": {"syslog": _syslog(url, pki, **extra)}}).audit.syslog
    assert syslog is not None
    return syslog


class Counts:
    def __init__(self, forwarder: SyslogForwarder) -> None:
        self.sent = self.failed = self.dropped = 0
        forwarder.on_sent = lambda n: self._add("sent", n)
        forwarder.on_failed = lambda n: self._add("failed", n)
        forwarder.on_dropped = lambda n: self._add("dropped", n)

    def _add(self, name: str, n: int) -> None:
        setattr(self, name, getattr(self, name) + n)


def _received(arr: Rsyslog, before: int, count: int) -> list[tuple[str, bytes]]:
    wait_for(lambda: len(arr.raw()) >= before + count, 30,
             f"{count} message(s) at the repository")
    new = arr.raw()[before:]
    assert len(new) == count, [m[:80] for _, m in new]
    return new


def _audit_xml(message: bytes) -> ET.Element:
    """The DICOM audit message in a syslog message, checked against the schema."""
    fields = parse_rfc5424(message)
    msg = fields["msg"]
    assert msg.startswith(BOM), "MSG-UTF8: the BOM, then UTF-8"
    root = ET.fromstring(msg[len(BOM):])
    assert check_audit_message(root) == []
    return root


def _event_id(root: ET.Element) -> str:
    event = root.find("EventIdentification/EventID")
    assert event is not None
    return event.get("csd-code", "")


@pytest.mark.parametrize("scheme", ["udp", "tcp", "tls"])
def test_each_transport_delivers_rfc5424_messages_with_dicom_audit_xml(
        tmp_path: Path, arr: Rsyslog, pki: dict[str, Path], scheme: str) -> None:
    forwarder = SyslogForwarder(_settings(arr.url(scheme), pki), node_ae="DICOMNODE",
                                source_id="dicomnode/DICOMNODE")
    counts = Counts(forwarder)
    trail = AuditTrail(tmp_path / "audit.sqlite3", forwarder=forwarder,
                       flush_interval_s=3600)
    trail.start()
    before = len(arr.raw())
    trail.append("application", action="start", pid=7, ae_title="DICOMNODE", role="receiver")
    trail.append("association", calling_ae="CT1", address="127.0.0.1", studies=1)
    trail.append("store", calling_ae="CT1", address="127.0.0.1", study_uid="1.2.3.4",
                 patient_key="c0ffee", instances=2, bytes=10,
                 sop_classes={"1.2.840.10008.5.1.4.1.1.2": 2})
    trail.append("send", MINOR_FAILURE, destination="pacs", destination_ae="PACS",
                 destination_host="127.0.0.1", study_uid="1.2.3.4", patient_key="c0ffee",
                 sop_classes={"1.2.840.10008.5.1.4.1.1.88.34": 1}, status=0xA700,
                 why="refused\nby the peer")
    assert trail.flush() == 4
    records = [r for r in trail.records() if r.kind != "association"]
    received = _received(arr, before, 3)  # the association record has no audit message
    trail.close()

    assert {name for name, _ in received} == {scheme}
    roots = []
    for (_, message), record in zip(received, records, strict=True):
        fields = parse_rfc5424(message)
        assert fields["version"] == b"1"
        # ITI-20: facility 10; severity 5 (notice), 4 (warning) for a failure
        assert int(fields["pri"]) == (84 if record.outcome else 85)
        assert fields["msgid"] == b"IHE+RFC-3881" and fields["app_name"] == b"dicomnode"
        assert fields["procid"] == str(os.getpid()).encode()
        assert fields["structured_data"] == b"-"
        stamp = datetime.fromisoformat(fields["timestamp"].decode())
        assert abs(stamp.timestamp() - record.at) < 0.001 and stamp.tzinfo == UTC
        assert b"\n" not in message, "one line per message"
        roots.append(_audit_xml(message))
    assert [_event_id(r) for r in roots] == ["110100", "110104", "110104"]
    outcome = roots[2].find("EventIdentification/EventOutcomeDescription")
    assert outcome is not None and outcome.text == "refused\nby the peer"
    # rsyslog's own RFC 5424 parser read the same header
    parsed = arr.fields()[before:]
    assert [(f["version"], f["msgid"], f["app_name"], f["procid"], f["structured_data"])
            for f in parsed] == [("1", "IHE+RFC-3881", "dicomnode", str(os.getpid()), "-")] * 3
    assert [f["pri"] for f in parsed] == ["85", "85", "84"]
    assert (counts.sent, counts.failed, counts.dropped) == (3, 0, 0)


def test_a_node_forwards_its_trail_to_the_repository_over_mutual_tls(
        tmp_path: Path, arr: Rsyslog, pki: dict[str, Path]) -> None:
    files = write_dat_study(tmp_path / "phantoms", n=1, seed=5)
    header = pydicom.dcmread(files[0], stop_before_pixels=True)
    port = free_port()
    config = node_config(tmp_path / "node", port, extra={
        "audit": {"syslog": _syslog(arr.url("tls"), pki)}})
    before = len(arr.raw())
    node = Node(parse_settings(config))
    node.start()
    try:
        storescu(port, files)
        storescu(port, files, aet="INTRUDER", check=False)  # not an allowed caller
        wait_for(lambda: [r.kind for r in node.audit.records(kind="store")] == ["store"]
                 and node.audit.last("association-rejected") is not None, 30,
                 "the store and the refusal in the local trail")
    finally:
        node.stop()
    local = [r for r in node.audit.records() if r.kind != "association"]
    assert [r.kind for r in local] == ["configuration", "application", "store",
                                       "association-rejected", "application"]
    received = _received(arr, before, len(local))
    assert {name for name, _ in received} == {"tls"}
    roots = [_audit_xml(message) for _, message in received]
    # one for one, in the trail's order: 110113/110131, 110100/110120, 110104, 110113/
    # 110126 (severity warning), 110100/110121
    assert [_event_id(r) for r in roots] == ["110113", "110100", "110104", "110113",
                                             "110100"]
    assert [parse_rfc5424(m)["pri"] for _, m in received] == [b"85", b"85", b"85", b"84",
                                                               b"85"]
    store = roots[2].find("ParticipantObjectIdentification")
    assert store is not None and store.get("ParticipantObjectID") == header.StudyInstanceUID
    everything = b"".join(m for _, m in received)
    for identifier in (str(header.PatientID), str(header.PatientName)):
        assert identifier.encode() not in everything
    metrics = node.ops.metrics.exposition().decode()
    assert f"dicomnode_audit_forwarded_total {float(len(local))}" in metrics
    assert "dicomnode_audit_forward_failures_total 0.0" in metrics


def test_an_absent_repository_costs_counted_failures_and_a_bounded_queue(
        tmp_path: Path, pki: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.ops.syslog")
    nobody = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    forwarder = SyslogForwarder(_settings(nobody, pki, max_queued=3, timeout_s=0.5),
                                node_ae="DICOMNODE", source_id="dicomnode/DICOMNODE")
    counts = Counts(forwarder)
    trail = AuditTrail(tmp_path / "audit.sqlite3", forwarder=forwarder,
                       flush_interval_s=3600)
    trail.start()
    for i in range(5):
        trail.append("analysis", job=i, study_uid=f"1.2.3.{i}", patient_key="c0ffee")
    assert trail.flush() == 5  # the local trail does not wait for the network
    wait_for(lambda: counts.failed >= 1, 30, "a failed attempt counted")
    assert counts.dropped == 2 and forwarder.queued() == 3
    trail.stop()
    assert len(trail.records()) == 5 and trail.verify() is None  # the record stays local
    trail.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len([x for x in lines if "cannot send to" in x]) == 1, "logged once, not per try"
    assert any("not forwarded" in x and "queue is full" in x for x in lines)
    assert any("3 record(s) not forwarded" in x and "at stop" in x for x in lines)
    assert not [x for x in lines if "1.2.3." in x or "c0ffee" in x], "no record content"


def test_a_repository_with_a_certificate_from_another_ca_gets_nothing(
        tmp_path: Path, arr: Rsyslog, pki: dict[str, Path]) -> None:
    forwarder = SyslogForwarder(_settings(arr.url("tls"), pki, ca=str(pki["other_ca"])),
                                node_ae="DICOMNODE", source_id="dicomnode/DICOMNODE")
    counts = Counts(forwarder)
    before = len(arr.raw())
    trail = AuditTrail(tmp_path / "audit.sqlite3", forwarder=forwarder,
                       flush_interval_s=3600)
    trail.start()
    trail.append("application", action="start", pid=7, ae_title="DICOMNODE")
    trail.flush()
    wait_for(lambda: counts.failed >= 1, 30, "the handshake refused")
    trail.close()
    assert counts.sent == 0 and len(arr.raw()) == before


def test_a_restarted_repository_gets_the_next_record(
        tmp_path: Path, pki: dict[str, Path]) -> None:
    tls = TlsFiles(pki["ca"], pki["arr_cert"], pki["arr_key"])
    first = start_rsyslog(tmp_path / "arr", tls)
    second: Rsyslog | None = None
    forwarder = SyslogForwarder(_settings(first.url("tcp"), pki), node_ae="DICOMNODE",
                                source_id="dicomnode/DICOMNODE")
    counts = Counts(forwarder)
    trail = AuditTrail(tmp_path / "audit.sqlite3", forwarder=forwarder,
                       flush_interval_s=3600)
    trail.start()
    try:
        trail.append("application", action="start", pid=7, ae_title="DICOMNODE")
        trail.flush()
        _received(first, 0, 1)
        first.stop()  # closes the forwarder's connection
        second = start_rsyslog(tmp_path / "arr", tls,
                               ports=(first.udp_port, first.tcp_port, first.tls_port))
        trail.append("application", action="stop", pid=7, ae_title="DICOMNODE")
        trail.flush()
        received = _received(second, 1, 1)
        assert b'csd-code="110121"' in received[0][1]
        assert counts.sent == 2
    finally:
        trail.close()
        for server in (first, second):
            if server is not None:
                server.stop()
