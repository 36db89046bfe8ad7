"""The audit trail forwarded to an Audit Record Repository (``audit.syslog``, IHE ITI-20):
Debian's rsyslog, started by the test, receives over UDP, TCP (octet counting) and mutual
TLS. Each message must parse as RFC 5424 twice (rsyslog's parser and the test's own),
carry the ITI-20 header values, and hold a DICOM audit message that passes the
project's transcription of the schema; a node's forwarded messages are its local
trail's exportable records, one for one. An absent repository costs nothing but
counted failures and a backlog; a restarted one gets the next record. Catching up: the
repository gets every record of the local trail (compared message for message) after an
outage, an overflow of ``max_queued``, and a node stopped by SIGTERM (none twice) or
SIGKILL (at least once); processes sharing one audit file send each record once."""

from __future__ import annotations

import logging
import os
import signal
import socket
import xml.etree.ElementTree as ET
from collections import Counter as CounterOf
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import pydicom
import pytest

from dicomnode.config import SyslogSettings, parse_settings
from dicomnode.ops.audit import MINOR_FAILURE, AuditRecord, AuditTrail
from dicomnode.ops.syslog import BOM, SyslogForwarder, syslog_message
from dicomnode.phantoms.dat_spect import write_dat_study
from dicomnode.service import Node
from tests.atna_schema import check_audit_message
from tests.hardening.certs import issue, make_ca
from tests.peers import free_port, node_config, start_node, storescu, wait_for
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


def _forwarding(tmp_path: Path, url: str, pki: dict[str, Path], *,
                flush_interval_s: float = 3600, **extra: object
                ) -> tuple[SyslogForwarder, Counts, AuditTrail]:
    """A started audit trail in ``tmp_path`` forwarding to ``url``, and its counters."""
    forwarder = SyslogForwarder(_settings(url, pki, **extra), node_ae="DICOMNODE",
                                source_id="dicomnode/DICOMNODE")
    counts = Counts(forwarder)
    trail = AuditTrail(tmp_path / "audit.sqlite3", forwarder=forwarder,
                       flush_interval_s=flush_interval_s)
    trail.start()
    return forwarder, counts, trail


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
    _forwarder, counts, trail = _forwarding(tmp_path, arr.url(scheme), pki)
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
        # PROCID: the process that made the record (its pid), else the sender
        assert fields["procid"] == str(record.detail.get("pid", os.getpid())).encode()
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
            for f in parsed] == [("1", "IHE+RFC-3881", "dicomnode", pid, "-")
                                 for pid in ("7", str(os.getpid()), str(os.getpid()))]
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
    assert "dicomnode_audit_forward_backlog 0.0" in metrics


def test_an_absent_repository_costs_counted_failures_and_a_backlog(
        tmp_path: Path, pki: dict[str, Path], caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="dicomnode.ops.syslog")
    nobody = f"tcp://127.0.0.1:{free_port()}"  # nothing listens there
    forwarder, counts, trail = _forwarding(tmp_path, nobody, pki, max_queued=3, timeout_s=0.5)
    for i in range(5):
        trail.append("analysis", job=i, study_uid=f"1.2.3.{i}", patient_key="c0ffee")
    assert trail.flush() == 5  # the local trail does not wait for the network
    wait_for(lambda: counts.failed >= 1, 30, "a failed attempt counted")
    assert counts.dropped == 0 and forwarder.backlog() == 5  # none given up
    trail.stop()
    assert len(trail.records()) == 5 and trail.verify() is None  # the record stays local
    trail.close()
    lines = [r.getMessage() for r in caplog.records]
    assert len([x for x in lines if "cannot send to" in x]) == 1, "logged once, not per try"
    assert any("5 record(s) not yet forwarded" in x and "at stop" in x for x in lines)
    assert not [x for x in lines if "1.2.3." in x or "c0ffee" in x], "no record content"


def test_a_repository_with_a_certificate_from_another_ca_gets_nothing(
        tmp_path: Path, arr: Rsyslog, pki: dict[str, Path]) -> None:
    before = len(arr.raw())
    _forwarder, counts, trail = _forwarding(tmp_path, arr.url("tls"), pki, ca=str(pki["other_ca"]))
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
    _forwarder, counts, trail = _forwarding(tmp_path, first.url("tcp"), pki)
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


# -- catching up: the repository gets every record of the local trail -------------------

def _messages(records: list[AuditRecord]) -> CounterOf[bytes]:
    """The syslog messages the records of a trail make, as the repository must get them
    (PROCID: the pid a record names, else this process, as the sender's)."""
    out: CounterOf[bytes] = CounterOf()
    for record in records:
        message = syslog_message(record, node_ae="DICOMNODE", source_id="dicomnode/DICOMNODE",
                                 hostname=socket.gethostname())
        if message is not None:
            out[message] += 1
    return out


def _arrived(server: Rsyslog) -> CounterOf[bytes]:
    """What the repository wrote (a restarted one writes on in the same files)."""
    return CounterOf(m for _, m in server.raw())


def _wait_arrived(expected: CounterOf[bytes], server: Rsyslog) -> None:
    wait_for(lambda: not (expected - _arrived(server)), 60,
             f"{sum(expected.values())} message(s) at the repository")


def _summary(messages: CounterOf[bytes]) -> list[tuple[bytes, int]]:
    """Short enough for an assertion's message: each message's header, how often."""
    return sorted((m.split(BOM)[0], n) for m, n in messages.items())


def _store(trail: AuditTrail, i: int) -> None:
    trail.append("store", calling_ae="CT1", address="127.0.0.1", study_uid=f"1.2.3.{i}",
                 patient_key="c0ffee", instances=i + 1, bytes=10 * (i + 1),
                 sop_classes={"1.2.840.10008.5.1.4.1.1.2": i + 1})


def test_records_made_while_the_repository_is_down_arrive_once_when_it_is_back(
        tmp_path: Path, pki: dict[str, Path]) -> None:
    tls = TlsFiles(pki["ca"], pki["arr_cert"], pki["arr_key"])
    first = start_rsyslog(tmp_path / "arr", tls)
    second: Rsyslog | None = None
    forwarder, counts, trail = _forwarding(
        tmp_path, first.url("tcp"), pki, timeout_s=0.5, flush_interval_s=0.2)
    try:
        for i in range(3):
            _store(trail, i)
        trail.flush()
        _wait_arrived(_messages(trail.records()), first)
        first.stop()  # the repository goes away; the node carries on recording
        for i in range(3, 10):
            _store(trail, i)
        wait_for(lambda: counts.failed >= 1 and len(trail.records()) == 10, 30,
                 "a failed attempt, the records in the local trail")
        second = start_rsyslog(tmp_path / "arr", tls,
                               ports=(first.udp_port, first.tcp_port, first.tls_port))
        _wait_arrived(_messages(trail.records()), second)
    finally:
        trail.stop()  # sends what is left, commits the cursor
        for server in (first, second):
            if server is not None:
                server.stop()
    assert second is not None
    expected = _messages(trail.records())
    trail.close()
    assert _arrived(second) == expected, _summary(_arrived(second))  # every record once
    assert counts.sent == 10 and counts.dropped == 0
    assert forwarder.backlog() == 0


def test_an_overflow_of_max_queued_loses_no_record(
        tmp_path: Path, pki: dict[str, Path]) -> None:
    tls = TlsFiles(pki["ca"], pki["arr_cert"], pki["arr_key"])
    first = start_rsyslog(tmp_path / "arr", tls)
    ports = (first.udp_port, first.tcp_port, first.tls_port)
    first.stop()  # the repository is down from the start
    second: Rsyslog | None = None
    _forwarder, counts, trail = _forwarding(
        tmp_path, first.url("tcp"), pki, max_queued=2, timeout_s=0.5)
    try:
        for i in range(7):  # more than max_queued, in one batch of the writer
            _store(trail, i)
        assert trail.flush() == 7
        wait_for(lambda: counts.failed >= 1, 30, "a failed attempt counted")
        second = start_rsyslog(tmp_path / "arr", tls, ports=ports)
        _wait_arrived(_messages(trail.records()), second)
    finally:
        trail.stop()  # sends what is left, commits the cursor
        if second is not None:
            second.stop()
    assert second is not None
    expected = _messages(trail.records())
    trail.close()
    assert _arrived(second) == expected, _summary(_arrived(second))  # every record once
    assert counts.dropped == 0


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL], ids=["SIGTERM", "SIGKILL"])
def test_records_a_stopped_node_did_not_forward_arrive_after_its_restart(
        tmp_path: Path, pki: dict[str, Path], sig: signal.Signals) -> None:
    tls = TlsFiles(pki["ca"], pki["arr_cert"], pki["arr_key"])
    files = write_dat_study(tmp_path / "phantoms", n=1, seed=6)
    first = start_rsyslog(tmp_path / "arr", tls)
    ports = (first.udp_port, first.tcp_port, first.tls_port)
    second: Rsyslog | None = None
    port = free_port()
    storage = tmp_path / "node"
    config = node_config(storage, port, extra={
        "audit": {"syslog": _syslog(first.url("tcp"), pki, timeout_s=0.5)}})

    def local() -> list[AuditRecord]:
        trail = AuditTrail(storage / "audit.sqlite3")
        try:
            return trail.records(limit=10_000)
        finally:
            trail.close()

    def stores() -> int:
        return len([r for r in local() if r.kind == "store"])

    node = start_node(tmp_path / "run1", config)
    try:
        storescu(port, files)
        wait_for(lambda: stores() == 1, 30, "the store in the local trail")
        _wait_arrived(_messages(local()), first)
        first.stop()  # the repository goes away
        storescu(port, files)
        storescu(port, files)
        wait_for(lambda: stores() == 3, 30, "the stores in the local trail")
        wait_for(lambda: "cannot send to" in node.log_text(), 30, "a failed attempt")
    finally:
        node.stop(sig)
    before_restart = _messages(local())
    second = start_rsyslog(tmp_path / "arr", tls, ports=ports)
    node = start_node(tmp_path / "run2", config)
    try:
        _wait_arrived(before_restart, second)
    finally:
        node.stop()
        second.stop()
    expected = _messages(local())  # with the second run's own start and stop
    arrived = _arrived(second)
    assert not expected - arrived, _summary(expected - arrived)  # none missing
    assert set(arrived) == set(expected), _summary(arrived)  # nothing else
    if sig == signal.SIGTERM:  # a clean stop committed its cursor: nothing twice
        assert arrived == expected, _summary(arrived - expected)
    assert len(expected) == sum(expected.values()) >= 7


def test_processes_sharing_an_audit_file_send_each_record_once(
        tmp_path: Path, arr: Rsyslog, pki: dict[str, Path]) -> None:
    path = tmp_path / "audit.sqlite3"
    before = len(arr.raw())
    forwarders = [SyslogForwarder(_settings(arr.url("tcp"), pki), node_ae="DICOMNODE",
                                  source_id="dicomnode/DICOMNODE", lease_s=3.0, poll_s=0.2)
                  for _ in range(2)]
    trails = [AuditTrail(path, forwarder=f, flush_interval_s=0.2) for f in forwarders]
    for trail in trails:
        trail.start()
    try:
        for i in range(6):
            _store(trails[i % 2], i)
        for trail in trails:
            trail.flush()
        _wait_arrived(_messages(trails[0].records()), arr)
        assert [f.sending() for f in forwarders].count(True) == 1
        leader = next(i for i, f in enumerate(forwarders) if f.sending())
        trails[leader].close()  # a clean stop gives the lease up
        other = trails[1 - leader]
        _store(other, 6)
        other.flush()
        _wait_arrived(_messages(other.records()), arr)
        assert forwarders[1 - leader].sending()
    finally:
        for trail in trails:
            trail.close()
    new = CounterOf(m for _, m in arr.raw()[before:])
    reader = AuditTrail(path)
    records = reader.records()
    reader.close()
    assert len(records) == 7
    assert new == _messages(records), _summary(new)  # each once, by one process


def test_udp_gets_the_records_the_trail_holds_from_its_cursor_on(
        tmp_path: Path, arr: Rsyslog, pki: dict[str, Path]) -> None:
    path = tmp_path / "audit.sqlite3"
    before = len(arr.raw())
    trail = AuditTrail(path)  # records made before forwarding ran (or a crash before it)
    for i in range(4):
        _store(trail, i)
    trail.close()

    def forwarding() -> AuditTrail:
        forwarder = SyslogForwarder(_settings(arr.url("udp"), pki), node_ae="DICOMNODE",
                                    source_id="dicomnode/DICOMNODE")
        return AuditTrail(path, forwarder=forwarder, flush_interval_s=0.2)

    trail = forwarding()
    trail.start()
    try:
        wait_for(lambda: len(arr.raw()) >= before + 4, 30, "the trail at the repository")
    finally:
        trail.close()
    trail = forwarding()  # restarted: on from its cursor
    trail.start()
    try:
        _store(trail, 4)
        trail.flush()
        wait_for(lambda: len(arr.raw()) >= before + 5, 30, "the new record")
        records = trail.records()
        assert trail.verify() is None  # the cursor is no part of the chain
    finally:
        trail.close()
    new = CounterOf(m for name, m in arr.raw()[before:] if name == "udp")
    assert new == _messages(records), _summary(new)
