"""``audit.syslog``: what the configuration accepts, and the message each record makes
(the transports themselves are tested against rsyslog in tests/integration)."""

from __future__ import annotations

from pathlib import Path

import pytest

from dicomnode.config import ConfigError, parse_settings
from dicomnode.ops.audit import SERIOUS_FAILURE, AuditRecord
from dicomnode.ops.syslog import BOM, octet_counted, syslog_forwarder, syslog_message


def _syslog(**syslog: object) -> object:
    return parse_settings({"audit": {"syslog": syslog}}).audit.syslog


def test_urls_name_the_transport_with_ipv6_and_default_ports() -> None:
    for url, (scheme, host, port) in {
            "udp://arr.example.org": ("udp", "arr.example.org", 514),
            "tcp://10.0.0.5:601": ("tcp", "10.0.0.5", 601),
            "tls://arr.example.org": ("tls", "arr.example.org", 6514),
            "tls://[2001:db8::1]:6514": ("tls", "2001:db8::1", 6514)}.items():
        s = _syslog(url=url)
        assert (s.scheme, s.host, s.port) == (scheme, host, port), url  # type: ignore[attr-defined]
    assert parse_settings({}).audit.syslog is None
    assert syslog_forwarder(parse_settings({})) is None


def test_every_problem_is_named_by_its_key(tmp_path: Path) -> None:
    pem = tmp_path / "node.crt"
    pem.write_text("-")
    with pytest.raises(ConfigError) as info:
        parse_settings({"audit": {"colour": "red", "syslog": {
            "url": "udp://arr:514", "ca": str(tmp_path / "missing.pem"), "cert": str(pem),
            "check_hostname": "yes", "max_queued": 0, "queue": 5}}})
    text = str(info.value)
    for fragment in ("audit.colour: unknown key", "audit.syslog.queue: unknown key",
                     "audit.syslog.ca: only for tls://", "audit.syslog.ca: no such file",
                     "audit.syslog.cert: give cert and key together",
                     "audit.syslog.check_hostname: expected true or false",
                     "audit.syslog.max_queued: must be >= 1"):
        assert fragment in text, fragment
    for url in ("syslog://arr:514", "https://arr", "tls://", "udp://arr:99999", "arr:514"):
        with pytest.raises(ConfigError, match=r"audit\.syslog\.url"):
            _syslog(url=url)


def test_a_record_becomes_one_rfc5424_line_and_association_records_none() -> None:
    record = AuditRecord(1, 1_700_000_000.25, "analysis", SERIOUS_FAILURE,
                         {"job": 3, "study_uid": "1.2.3", "why": "bad\r\ninput"}, "0" * 64)
    message = syslog_message(record, node_ae="DICOMNODE", source_id="dicomnode/DICOMNODE",
                             hostname="gpu 1", procid=42)
    assert message is not None
    assert message.startswith(b"<84>1 2023-11-14T22:13:20.250Z gpu-1 dicomnode 42 "
                              b"IHE+RFC-3881 - " + BOM + b"<?xml")
    assert b"\n" not in message and b"\r" not in message and b"bad&#13;&#10;input" in message
    assert octet_counted(b"<85>1 x") == b"7 <85>1 x"
    association = AuditRecord(2, 0.0, "association", 0, {}, "0" * 64)
    assert syslog_message(association, node_ae="A", source_id="s", hostname="h") is None
