"""Debian's rsyslog as the Audit Record Repository in the audit forwarding tests.

The test starts ``rsyslogd`` in the foreground with a configuration of its own (nothing of
``/etc/rsyslog.conf``, no ``/dev/log``, its own pid file and work folder): a UDP input
(RFC 5426), a plain TCP input (RFC 6587 octet counting) and a TLS input (RFC 5425, GnuTLS,
client certificates required and checked against the test CA), each on a free loopback
port. Every message received is written twice: as received (``raw.log``, the input's
name, a space, the message) and as the fields rsyslog's RFC 5424 parser found
(``fields.log``, one JSON object per line), so a test sees both the bytes sent and
whether an independent syslog implementation reads them as RFC 5424.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import socket
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.peers import free_port, in_ci, port_open, wait_for

_CONFIG = """\
global(workDirectory="{work}" maxMessageSize="64k"
       parser.escapeControlCharactersOnReceive="off"
       defaultNetstreamDriverCAFile="{ca}" defaultNetstreamDriverCertFile="{cert}"
       defaultNetstreamDriverKeyFile="{key}")
module(load="imudp")
module(load="imtcp" maxSessions="50")
template(name="raw" type="string" string="%inputname% %rawmsg%\\n")
template(name="fields" type="list" option.jsonf="on") {{
  property(outname="input" name="inputname" format="jsonf")
  property(outname="pri" name="pri" format="jsonf")
  property(outname="version" name="protocol-version" format="jsonf")
  property(outname="timestamp" name="timereported" dateFormat="rfc3339" format="jsonf")
  property(outname="hostname" name="hostname" format="jsonf")
  property(outname="app_name" name="app-name" format="jsonf")
  property(outname="procid" name="procid" format="jsonf")
  property(outname="msgid" name="msgid" format="jsonf")
  property(outname="structured_data" name="structured-data" format="jsonf")
  property(outname="msg" name="msg" format="jsonf")
}}
ruleset(name="arr") {{
  action(type="omfile" file="{work}/raw.log" template="raw")
  action(type="omfile" file="{work}/fields.log" template="fields")
}}
input(type="imudp" address="127.0.0.1" port="{udp}" name="udp" ruleset="arr")
input(type="imtcp" address="127.0.0.1" port="{tcp}" name="tcp" ruleset="arr")
input(type="imtcp" address="127.0.0.1" port="{tls}" name="tls" ruleset="arr"
      streamDriver.name="gtls" streamDriver.mode="1"
      streamDriver.authMode="x509/certvalid")
"""

_PROBE = b"<13>1 - - dicomnode-test - PROBE - probe"


@dataclass(frozen=True)
class TlsFiles:
    """The repository's certificate and key, and the CA its clients' must chain to."""

    ca: Path
    cert: Path
    key: Path


@dataclass
class Rsyslog:
    workdir: Path
    udp_port: int
    tcp_port: int
    tls_port: int
    proc: subprocess.Popen[bytes]

    def url(self, scheme: str) -> str:
        port = {"udp": self.udp_port, "tcp": self.tcp_port, "tls": self.tls_port}[scheme]
        return f"{scheme}://127.0.0.1:{port}"

    def raw(self) -> list[tuple[str, bytes]]:
        """(input name, message as received) for each message but the start-up probes."""
        path = self.workdir / "raw.log"
        if not path.exists():
            return []
        out = []
        for line in path.read_bytes().split(b"\n"):
            if line and _PROBE not in line:
                name, _, message = line.partition(b" ")
                out.append((name.decode(), message))
        return out

    def fields(self) -> list[dict[str, Any]]:
        """rsyslog's own parse of each message (``app_name``, ``msgid`` ...)."""
        path = self.workdir / "fields.log"
        if not path.exists():
            return []
        rows = [json.loads(line) for line in path.read_text("utf-8").splitlines() if line]
        return [r for r in rows if r.get("msgid") != "PROBE"]

    def log_text(self) -> str:
        return (self.workdir / "rsyslogd.log").read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def start_rsyslog(workdir: Path, tls: TlsFiles, *,
                  ports: tuple[int, int, int] | None = None) -> Rsyslog:
    """rsyslogd on free loopback ports (or ``ports``: udp, tcp, tls, e.g. to restart one
    in place), ready once every input answers."""
    exe = shutil.which("rsyslogd", path=os.pathsep.join(
        [os.environ.get("PATH", ""), "/usr/sbin", "/sbin"]))  # not on a user's PATH
    if exe is None or not glob.glob("/usr/lib/*/rsyslog/lmnsd_gtls.so"):
        message = ("rsyslogd with its TLS driver (Debian's rsyslog and rsyslog-gnutls) is "
                   "not installed (run scripts/setup.sh --test, which installs them)")
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    workdir.mkdir(parents=True, exist_ok=True)
    udp, tcp, tls_port = ports or (free_port(), free_port(), free_port())
    conf = workdir / "rsyslog.conf"
    conf.write_text(_CONFIG.format(work=workdir, ca=tls.ca, cert=tls.cert, key=tls.key,
                                   udp=udp, tcp=tcp, tls=tls_port))
    with (workdir / "rsyslogd.log").open("ab") as log:
        proc = subprocess.Popen([exe, "-n", "-f", str(conf), "-i", str(workdir / "pid")],
                                stdout=log, stderr=subprocess.STDOUT)
    server = Rsyslog(workdir, udp, tcp, tls_port, proc)
    try:
        def listening() -> bool:
            if proc.poll() is not None:
                raise AssertionError(f"rsyslogd exited at start:\n{server.log_text()}")
            return port_open(tcp) and port_open(tls_port)

        wait_for(listening, 30, "rsyslogd to listen")
        # UDP has no handshake: send probes until one is written
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            def probed() -> bool:
                probe.sendto(_PROBE, ("127.0.0.1", udp))
                raw = workdir / "raw.log"
                return raw.exists() and _PROBE in raw.read_bytes()

            wait_for(probed, 30, "rsyslogd to take UDP")
    except BaseException:
        server.stop()
        raise
    return server


# -- RFC 5424, read independently of the node's writer ---------------------------------

_RFC5424 = re.compile(
    rb"<(?P<pri>\d{1,3})>(?P<version>[1-9]\d{0,2}) "
    rb"(?P<timestamp>-|\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(?:\.\d{1,6})?(?:Z|[+-]\d\d:\d\d)) "
    rb"(?P<hostname>[!-~]{1,255}) (?P<app_name>[!-~]{1,48}) (?P<procid>[!-~]{1,128}) "
    rb"(?P<msgid>[!-~]{1,32}) (?P<structured_data>-|(?:\[[^\]]*\])+)(?: (?P<msg>.*))?",
    re.DOTALL)


def parse_rfc5424(message: bytes) -> dict[str, bytes]:
    """The fields of one SYSLOG-MSG (RFC 5424 section 6); AssertionError if it is not one."""
    match = _RFC5424.fullmatch(message)
    assert match is not None, f"not an RFC 5424 message: {message[:120]!r}"
    fields = {k: v for k, v in match.groupdict().items() if v is not None}
    assert 0 <= int(fields["pri"]) <= 191
    return fields
