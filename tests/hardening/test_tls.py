"""DICOM TLS (BCP 195): mutual TLS works, every bad handshake is refused, and a client
that connects and says nothing blocks nobody (the handshake is off the accept thread)."""

from __future__ import annotations

import socket
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from pynetdicom import AE

from dicomnode.config import TlsSettings
from dicomnode.net.scu import AssociationFailed, StoreClient
from dicomnode.net.tls import client_context
from tests.hardening.certs import Authority, Pair, issue, make_ca
from tests.hardening.nodes import hardened_node
from tests.hardening.rawdicom import Closed, RawPeer, associate_rq
from tests.peers import PYDICOM_FILES, NodeProcess, peer_env, require_tool

CT = PYDICOM_FILES / "CT_small.dcm"


def figure(name: str, value: float, unit: str) -> None:
    print(f"FIGURE {name}: {value:.3f} {unit}")


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Pair
    client: Pair
    expired: Pair
    rogue_ca: Authority
    rogue_client: Pair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca = make_ca(d, "test-ca")
    rogue = make_ca(d, "rogue-ca")
    return Pki(ca, issue(ca, d, "node", server=True), issue(ca, d, "client", server=False),
               issue(ca, d, "expired", server=False, expired=True), rogue,
               issue(rogue, d, "rogue-client", server=False))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[NodeProcess]:
    tls = {"cert": str(pki.server.cert), "key": str(pki.server.key), "ca": str(pki.ca.pem),
           "require_client_cert": True}
    with hardened_node(tmp_path_factory.mktemp("tls"), node={"associate_timeout_s": 3.0},
                       extra={"security": {"tls": tls}}) as proc:
        yield proc


def _context(pki: Pki, client: Pair | None, ca: Path | None = None) -> ssl.SSLContext:
    if client is not None:
        return client_context(TlsSettings(client.cert, client.key, ca or pki.ca.pem))
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(cafile=ca or pki.ca.pem)
    return ctx


def _echo(port: int, ctx: ssl.SSLContext) -> bool:
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = ae.connection_timeout = ae.network_timeout = 5
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE", tls_args=(ctx, "localhost"))
    if not assoc.is_established:
        return False
    try:
        return bool(assoc.send_c_echo().Status == 0)
    finally:
        assoc.release()


def test_mutual_tls_echo_and_store(node: NodeProcess, pki: Pki) -> None:
    ctx = _context(pki, pki.client)
    assert _echo(node.port, ctx)
    client = StoreClient(host="127.0.0.1", port=node.port, called_aet="DICOMNODE",
                         calling_aet="TESTSCU", tls=ctx)
    [result] = client.send([CT])
    assert result.status == 0
    with socket.create_connection(("127.0.0.1", node.port)) as raw, \
            ctx.wrap_socket(raw, server_hostname="localhost") as tls:
        assert tls.version() in ("TLSv1.2", "TLSv1.3")


@pytest.mark.parametrize("who", ["no client certificate", "client signed by another CA",
                                 "expired client certificate"])
def test_bad_client_certificates_are_refused(node: NodeProcess, pki: Pki, who: str) -> None:
    client = {"no client certificate": None, "client signed by another CA": pki.rogue_client,
              "expired client certificate": pki.expired}[who]
    assert not _echo(node.port, _context(pki, client))


def test_the_scu_refuses_a_server_it_does_not_trust(node: NodeProcess, pki: Pki) -> None:
    client = StoreClient(host="127.0.0.1", port=node.port, called_aet="DICOMNODE",
                         calling_aet="TESTSCU", tls=_context(pki, pki.client, pki.rogue_ca.pem))
    with pytest.raises(AssociationFailed, match="TLS handshake failed"):
        client.send([CT])


@pytest.mark.parametrize("version", [ssl.TLSVersion.TLSv1, ssl.TLSVersion.TLSv1_1])
def test_tls_before_1_2_is_refused(node: NodeProcess, pki: Pki,
                                   version: ssl.TLSVersion) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    ctx.set_ciphers("DEFAULT:@SECLEVEL=0")  # let this client offer the old protocol
    ctx.minimum_version = ctx.maximum_version = version
    ctx.load_cert_chain(pki.client.cert, pki.client.key)
    with socket.create_connection(("127.0.0.1", node.port), timeout=5) as raw, \
            pytest.raises(ssl.SSLError) as err:
        ctx.wrap_socket(raw, server_hostname="localhost")
    print(f"TLS {version.name}: {err.value}")
    # the server's alert, not this client failing to offer anything
    assert "NO_PROTOCOLS_AVAILABLE" not in str(err.value)
    assert "PROTOCOL_VERSION" in str(err.value) or "UNSUPPORTED_PROTOCOL" in str(err.value)


def test_plain_dicom_to_the_tls_port_is_refused(node: NodeProcess) -> None:
    with RawPeer(node.port) as peer:
        peer.send(associate_rq([(1, "1.2.840.10008.1.1", ["1.2.840.10008.1.2"])]))
        with pytest.raises((Closed, ValueError, AssertionError, ssl.SSLError, OSError)):
            pdu = peer.read_pdu()
            assert pdu.pdu_type in (0x02, 0x03), "no DICOM answer over plain TCP"
            raise AssertionError(f"a plain-TCP peer got a DICOM answer: {pdu}")


def test_silent_tls_clients_block_nobody(node: NodeProcess, pki: Pki) -> None:
    silent = [RawPeer(node.port, source=f"127.0.0.{2 + i % 3}") for i in range(9)]
    silent += [RawPeer(node.port) for _ in range(3)]  # and from the allowed host itself
    try:
        start = time.monotonic()
        assert _echo(node.port, _context(pki, pki.client))
        elapsed = time.monotonic() - start
    finally:
        for peer in silent:
            peer.close()
    figure("TLS association beside 12 silent TLS connections", elapsed, "s")
    assert elapsed < 2.0


def test_dcmtk_storescu_over_mutual_tls(node: NodeProcess, pki: Pki) -> None:
    exe = require_tool("storescu")
    out = subprocess.run([exe, "+tls", str(pki.client.key), str(pki.client.cert),
                          "+cf", str(pki.ca.pem), "-aet", "STORESCU", "-aec", "DICOMNODE",
                          "127.0.0.1", str(node.port), str(CT)],
                         capture_output=True, text=True, env=peer_env(), timeout=60)
    assert out.returncode == 0, out.stderr


def test_the_log_records_refused_handshakes(node: NodeProcess) -> None:
    text = node.log_text()
    assert "(TLS)" in text
    for reason in ("PEER_DID_NOT_RETURN_A_CERTIFICATE", "CERTIFICATE_VERIFY_FAILED",
                   "UNSUPPORTED_PROTOCOL", "WRONG_VERSION_NUMBER"):
        assert f"TLS with 127.0.0.1 failed: TLS handshake refused: {reason}" in text
