"""The status page and API over HTTPS (`web.tls`), checked with curl as the client:
mutual TLS works, a caller without a certificate or speaking plain HTTP gets nothing, and
a client that connects and says nothing holds up nobody else."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from dicomnode.config import ConfigError, load_settings
from tests.hardening.certs import Authority, Pair, issue, make_ca
from tests.peers import (
    NodeProcess,
    free_port,
    node_config,
    port_open,
    require_tool,
    start_node,
    wait_for,
)

TOKEN = "operator-token-0123456789abcdef"


@dataclass(frozen=True)
class Pki:
    ca: Authority
    server: Pair
    client: Pair
    rogue: Pair


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    d = tmp_path_factory.mktemp("pki")
    ca, rogue_ca = make_ca(d, "web-ca"), make_ca(d, "rogue-ca")
    return Pki(ca, issue(ca, d, "node", server=True), issue(ca, d, "browser", server=False),
               issue(rogue_ca, d, "rogue", server=False))


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory, pki: Pki) -> Iterator[tuple[NodeProcess, int]]:
    tmp = tmp_path_factory.mktemp("web-tls")
    web_port = free_port()
    config = node_config(tmp / "var", free_port(), extra={"web": {
        "host": "127.0.0.1", "port": web_port,
        "tokens": [{"name": "ops", "token": TOKEN, "role": "operator"}],
        "tls": {"cert": str(pki.server.cert), "key": str(pki.server.key),
                "ca": str(pki.ca.pem), "require_client_cert": True}}})
    proc = start_node(tmp / "node", config)
    try:
        wait_for(lambda: port_open(web_port), 30, "the web server")
        yield proc, web_port
    finally:
        proc.stop()


def _curl(pki: Pki, url: str, *, client: Pair | None, token: bool = True,
          extra: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    cmd = [require_tool("curl"), "--silent", "--show-error", "--max-time", "15",
           "--include", "--cacert", str(pki.ca.pem)]
    if client is not None:
        cmd += ["--cert", str(client.cert), "--key", str(client.key)]
    if token:
        cmd += ["-H", f"Authorization: Bearer {TOKEN}"]
    return subprocess.run([*cmd, *(extra or []), url], capture_output=True, text=True,
                          timeout=30)


def test_https_with_a_client_certificate(node: tuple[NodeProcess, int], pki: Pki) -> None:
    _, port = node
    health = _curl(pki, f"https://localhost:{port}/healthz", client=pki.client, token=False)
    assert health.returncode == 0, health.stderr
    assert health.stdout.startswith("HTTP/1.1 200")
    assert "strict-transport-security: max-age=31536000" in health.stdout.lower()
    queues = _curl(pki, f"https://127.0.0.1:{port}/api/queues", client=pki.client)
    assert queues.returncode == 0, queues.stderr
    assert queues.stdout.startswith("HTTP/1.1 200")
    metrics = _curl(pki, f"https://localhost:{port}/metrics", client=pki.client)
    assert "dicomnode_instances_received_total" in metrics.stdout


@pytest.mark.parametrize("who", ["no client certificate", "a certificate from another CA"])
def test_callers_without_a_trusted_certificate_get_nothing(node: tuple[NodeProcess, int],
                                                          pki: Pki, who: str) -> None:
    _, port = node
    client = None if who == "no client certificate" else pki.rogue
    out = _curl(pki, f"https://localhost:{port}/healthz", client=client, token=False)
    assert out.returncode != 0, out.stdout
    assert "HTTP/1.1" not in out.stdout


def test_plain_http_to_the_https_port_gets_nothing(node: tuple[NodeProcess, int],
                                                   pki: Pki) -> None:
    _, port = node
    out = _curl(pki, f"http://127.0.0.1:{port}/healthz", client=None, token=False)
    assert "HTTP/1.1 200" not in out.stdout


def test_a_silent_client_does_not_block_others(node: tuple[NodeProcess, int],
                                               pki: Pki) -> None:
    """The handshake runs on the request's thread, not in the accept loop."""
    proc, port = node
    with socket.create_connection(("127.0.0.1", port)) as silent:
        silent.settimeout(5)
        out = _curl(pki, f"https://localhost:{port}/healthz", client=pki.client, token=False,
                    extra=["--max-time", "5"])
        assert out.returncode == 0, out.stderr
        assert out.stdout.startswith("HTTP/1.1 200")
    assert "Traceback" not in proc.log_text()


def test_web_tls_is_validated(tmp_path: Path, pki: Pki) -> None:
    def problems(tls: dict[str, object]) -> list[str]:
        config = node_config(tmp_path / "var", free_port(),
                             extra={"web": {"port": free_port(), "tls": tls}})
        path = tmp_path / "node.yaml"
        path.write_text(yaml.safe_dump(config))
        with pytest.raises(ConfigError) as err:
            load_settings(path)
        return err.value.problems

    [missing] = problems({"cert": str(pki.server.cert)})
    assert "web.tls.key: missing" in missing
    [no_ca] = problems({"cert": str(pki.server.cert), "key": str(pki.server.key),
                        "require_client_cert": True})
    assert "web.tls.require_client_cert: needs web.tls.ca" in no_ca
    [outgoing] = problems({"cert": str(pki.server.cert), "key": str(pki.server.key),
                           "destinations": ["pacs"]})
    assert "web.tls" in outgoing and "destinations" in outgoing
