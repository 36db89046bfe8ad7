"""The pure parts of the defences, exhaustively: PDU checks, admission, config, preamble."""

from __future__ import annotations

import contextlib
import socket
import struct
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dicomnode.cli import preamble_warning
from dicomnode.config import ConfigError, NodeSettings, parse_settings
from dicomnode.net.limits import Admission, ConnectionLimits, LogThrottle
from dicomnode.net.pdu_guard import (
    MessageTracker,
    PduViolation,
    check_header,
    command_fields,
)
from tests.hardening.rawdicom import echo_rq, find_rq, pdv, store_rq


@settings(max_examples=500, derandomize=True, database=None)
@given(st.binary(min_size=6, max_size=6), st.booleans())
def test_check_header_only_ever_answers_or_raises_a_violation(header: bytes,
                                                              first: bool) -> None:
    try:
        parsed = check_header(header, max_pdu_size=16384, first=first)
    except PduViolation:
        return
    assert 1 <= parsed.pdu_type <= 7 and parsed.length <= 128 * 1024


def test_the_advertised_maximum_is_the_limit() -> None:
    assert check_header(struct.pack(">BBL", 4, 0, 16384), max_pdu_size=16384).length == 16384
    with pytest.raises(PduViolation, match="exceeds the advertised maximum"):
        check_header(struct.pack(">BBL", 4, 0, 16385), max_pdu_size=16384)
    with pytest.raises(PduViolation, match="not an A-ASSOCIATE-RQ"):
        check_header(struct.pack(">BBL", 4, 0, 100), max_pdu_size=16384, first=True)


@settings(max_examples=800, derandomize=True, database=None)
@given(st.lists(st.one_of(st.binary(max_size=64), st.builds(
    pdv, st.sampled_from([1, 3, 5]), st.integers(0, 3),
    st.sampled_from([echo_rq(), store_rq("1.2", "1.3"), b"\0" * 10, b""]))), max_size=6))
def test_the_tracker_only_ever_accepts_or_raises_a_violation(bodies: list[bytes]) -> None:
    tracker = MessageTracker()
    for body in bodies:
        try:
            tracker.feed(body, {1, 3})
        except PduViolation:
            return


@settings(max_examples=500, derandomize=True, database=None)
@given(st.binary(max_size=200))
def test_command_fields_never_raise_anything_else(command: bytes) -> None:
    with contextlib.suppress(PduViolation):
        command_fields(command)


def test_well_formed_messages_pass() -> None:
    tracker = MessageTracker()
    echo = echo_rq()
    tracker.feed(pdv(1, 0x01, echo[:10]) + pdv(1, 0x01, echo[10:30]))
    tracker.feed(pdv(1, 0x03, echo[30:]))
    tracker.feed(pdv(3, 0x03, store_rq("1.2", "1.3")))
    for _ in range(100):  # C-STORE data streams to disk: not bounded here
        tracker.feed(pdv(3, 0x00, b"\0" * 16000))
    tracker.feed(pdv(3, 0x02, b"\0" * 10))
    tracker.feed(pdv(1, 0x03, echo))
    with pytest.raises(PduViolation, match="not a service"):
        tracker.feed(pdv(1, 0x03, find_rq()))


def _limits() -> ConnectionLimits:
    return ConnectionLimits(max_associations=2, max_pending=4, max_pending_per_address=2,
                            associate_timeout_s=1, pdu_timeout_s=1, network_timeout_s=60,
                            max_pdu_size=16384)


def test_admission_refuses_strangers_and_evicts_for_allowed_hosts() -> None:
    admission = Admission(_limits(), lambda address: address == "10.0.0.1")
    socks = [socket.socket() for _ in range(8)]
    try:
        a = admission.admit("10.9.9.9", socks[0])
        b = admission.admit("10.9.9.9", socks[1])
        assert a and b and admission.admit("10.9.9.9", socks[2]) is None  # per address
        assert admission.admit("10.9.9.8", socks[3]) and admission.admit("10.9.9.7", socks[4])
        assert admission.admit("10.9.9.6", socks[5]) is None  # strangers' pool full
        first = admission.admit("10.0.0.1", socks[6])
        assert first is not None
        for sock in socks[7:]:  # beyond its own share: the oldest is closed instead
            assert admission.admit("10.0.0.1", sock) is not None
        assert admission.admit("10.0.0.1", socket.socket()) is not None
        assert admission.evicted_connections == 1
        admission.leave(first)  # already evicted: a no-op
        assert admission.reserve_association() and admission.reserve_association()
        assert not admission.reserve_association()
        admission.release_association()
        assert admission.reserve_association()
    finally:
        for sock in socks:
            sock.close()


def test_log_throttle() -> None:
    now = [0.0]
    throttle = LogThrottle(10.0, clock=lambda: now[0])
    assert throttle.allow("k") == 0
    assert throttle.allow("k") is None and throttle.allow("k") is None
    now[0] = 11.0
    assert throttle.allow("k") == 2


def test_new_config_keys(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("node.crt", "node.key", "ca.pem"):
        (tmp_path / name).write_text("x")
    monkeypatch.setenv("PACS_SECRET", "from-env")
    settings_ = parse_settings({
        "node": {"pdu_timeout_s": 2, "associate_timeout_s": 3, "max_pending_connections": 8,
                 "max_pending_per_address": 2},
        "destinations": {"pacs": {"ae_title": "PACS", "host": "10.0.0.1", "port": 104}},
        "security": {
            "allowed_callers": [{"ae_title": "PACS", "host": "10.0.0.0/24"}],
            "tls": {"cert": str(tmp_path / "node.crt"), "key": str(tmp_path / "node.key"),
                    "ca": str(tmp_path / "ca.pem"), "require_client_cert": True,
                    "destinations": ["pacs"]},
            "user_identity": {"users": [
                {"ae_title": "PACS", "username": "pacs", "password_env": "PACS_SECRET"}]}}})
    node = settings_.node
    assert (node.pdu_timeout_s, node.associate_timeout_s) == (2.0, 3.0)
    assert (node.max_pending_connections, node.max_pending_per_address) == (8, 2)
    sec = settings_.security
    assert sec.host_allowed("10.0.0.7") and not sec.host_allowed("10.0.1.7")
    assert sec.tls is not None and sec.tls.destinations == ("pacs",)
    assert sec.user_identity is not None
    assert sec.user_identity.verify("PACS", 2, b"pacs", b"from-env")
    assert not sec.user_identity.verify("PACS", 2, b"pacs", b"wrong")
    assert "from-env" not in repr(sec.user_identity)
    assert NodeSettings().max_pending_per_address == 4


def test_bad_security_config_is_reported_in_full(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as err:
        parse_settings({"security": {
            "tls": {"cert": str(tmp_path / "missing.crt"), "require_client_cert": True,
                    "destinations": ["nowhere"]},
            "user_identity": {"required": True, "users": []}}})
    text = str(err.value)
    for expected in ("security.tls.cert: no such file", "security.tls.key: missing",
                     "security.tls.require_client_cert: needs security.tls.ca",
                     "security.user_identity.users: required is true"):
        assert expected in text


@pytest.mark.parametrize(("preamble", "flagged"), [
    (b"MZ", "Windows executable"), (b"\x7fELF", "ELF executable"), (b"#!/bin/sh", "script"),
    (b"II*\x00", None), (b"\0", None)])
def test_preamble_warning(tmp_path: Path, preamble: bytes, flagged: str | None) -> None:
    path = tmp_path / "f.dcm"
    path.write_bytes(preamble.ljust(128, b"\0") + b"DICM" + b"\0" * 16)
    why = preamble_warning(path)
    assert (why is None) if flagged is None else (why is not None and flagged in why)
