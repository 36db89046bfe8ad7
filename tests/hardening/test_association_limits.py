"""Association limits, silent connections and floods.

Default pynetdicom counts a connection against its association limit from accept until
its A-ASSOCIATE-RQ arrives (30 s for one that never sends it), so ten silent
connections lock the PACS out. Here: excess associations get A-ASSOCIATE-RJ "local
limit exceeded" at once, silent connections are closed after ``associate_timeout_s``
and never count against the limit, and allowed peers get in within 2 s while other
addresses flood the port.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE

from tests.hardening.nodes import hardened_node, timed
from tests.hardening.rawdicom import (
    RELEASE_RQ,
    RawPeer,
    back_to_baseline,
    process_figures,
    raw_peer,
)
from tests.peers import REPO, NodeProcess, wait_for


def figure(name: str, value: float, unit: str) -> None:
    print(f"FIGURE {name}: {value:.3f} {unit}")


@pytest.fixture(scope="module")
def node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    with hardened_node(tmp_path_factory.mktemp("limits")) as proc:
        with raw_peer(proc.port) as peer:
            peer.associate()
            assert peer.echo() == 0
        yield proc


def allowed_peer_echo(port: int) -> float:
    """An allowed caller (pynetdicom, from 127.0.0.1): associate, echo, release."""
    ae = AE(ae_title="TESTSCU")
    ae.add_requested_context("1.2.840.10008.1.1")
    ae.acse_timeout = 10
    ae.connection_timeout = 10
    start = time.monotonic()
    assoc = ae.associate("127.0.0.1", port, ae_title="DICOMNODE")
    assert assoc.is_established, "the allowed peer did not get in"
    status = assoc.send_c_echo()
    assoc.release()
    elapsed = time.monotonic() - start
    assert status.Status == 0
    return elapsed


def test_excess_associations_are_refused_with_local_limit(node: NodeProcess) -> None:
    held: list[RawPeer] = []
    try:
        for _ in range(4):  # max_associations
            peer = RawPeer(node.port)
            held.append(peer)
            assert peer.associate().pdu_type == 0x02
        with raw_peer(node.port) as extra:
            rj, elapsed = timed(extra.associate)
            assert rj.reject == (0x02, 0x03, 0x02)  # transient, presentation, local limit
        figure("excess association: time to A-ASSOCIATE-RJ", elapsed, "s")
        assert elapsed < 1.0
        held[0].send(RELEASE_RQ)
        assert held[0].read_pdu().pdu_type == 0x06
    finally:
        for peer in held:
            peer.close()

    def gets_in() -> bool:
        with raw_peer(node.port) as peer:
            return peer.associate().pdu_type == 0x02

    wait_for(gets_in, 5, "a freed slot to be reusable")


def test_silent_connections_are_closed_and_do_not_count(node: NodeProcess) -> None:
    silent = [RawPeer(node.port) for _ in range(12)]  # from the allowed host itself
    try:
        elapsed = allowed_peer_echo(node.port)
        figure("allowed peer with 12 silent connections from its own address", elapsed, "s")
        assert elapsed < 2.0
        closed_after = silent[-1].wait_closed(5)
        figure("silent connection closed after (associate_timeout_s 1)", closed_after, "s")
        assert closed_after < 1.5
    finally:
        for peer in silent:
            peer.close()


@pytest.mark.parametrize("mode", ["silent", "slowloris"])
def test_allowed_peers_get_in_during_a_flood(node: NodeProcess, mode: str) -> None:
    before = process_figures(node.proc.pid)
    flood = subprocess.Popen(
        [sys.executable, "-m", "tests.hardening.flood", "--port", str(node.port),
         "--seconds", "5", "--first", "2", "--last", "40", "--per-source", "6",
         "--mode", mode], cwd=REPO, stdout=subprocess.PIPE, text=True)
    try:
        assert flood.stdout is not None
        assert flood.stdout.readline().strip() == "ready"
        time.sleep(1.0)  # let the flood fill every pool
        times = [allowed_peer_echo(node.port) for _ in range(10)]
        summary = json.loads(flood.stdout.readline())
    finally:
        flood.kill()
        flood.wait()
    figure(f"{mode} flood: slowest allowed association (of 10)", max(times), "s")
    figure(f"{mode} flood: median allowed association", sorted(times)[5], "s")
    print(f"{mode} flood from 39 addresses: {summary}")
    assert max(times) < 2.0
    assert summary["connected"] > 39 * 6
    back_to_baseline(node.proc.pid, before, timeout=15)
