"""dicomnode.net.reactor: pynetdicom's 1 ms polling sleeps wake on work, and only wake
earlier than before (never later, never stealing a wake-up from another waiter)."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest
from pynetdicom import AE
from pynetdicom import association as pyn_association
from pynetdicom import dul as pyn_dul
from pynetdicom.association import Association
from pynetdicom.pdu_primitives import P_DATA

from dicomnode.net import reactor


class _SleepingAssociation(Association):
    """An association thread that only runs the patched sleep once."""

    def __init__(self, mode: str, seconds: float) -> None:
        super().__init__(AE(), mode)
        self.seconds = seconds
        self.slept = -1.0

    def run(self) -> None:
        started = time.monotonic()
        vars(pyn_association)["time"].sleep(self.seconds)
        self.slept = time.monotonic() - started


def test_acceptor_sleep_ends_when_a_message_is_queued() -> None:
    reactor.install()
    assoc = _SleepingAssociation("acceptor", 5.0)
    assoc.start()
    time.sleep(0.05)
    assoc.dimse.msg_queue.put((None, None))
    assoc.join(5)
    assert 0 <= assoc.slept < 1.0, f"slept {assoc.slept:.3f} s despite a queued message"


def test_sleep_without_work_lasts_as_long_as_before() -> None:
    reactor.install()
    assoc = _SleepingAssociation("acceptor", 0.2)
    assoc.start()
    assoc.join(5)
    assert assoc.slept >= 0.19


def test_a_thread_blocked_on_the_same_queue_still_gets_its_message() -> None:
    """Queue.put wakes one waiter; the reactor must pass the wake-up on."""
    reactor.install()
    assoc = _SleepingAssociation("acceptor", 3.0)
    got: list[float] = []

    def getter() -> None:
        started = time.monotonic()
        assoc.dimse.msg_queue.get(timeout=10)
        got.append(time.monotonic() - started)

    assoc.start()
    time.sleep(0.05)  # the reactor waits first, so it is the one put() wakes
    other = threading.Thread(target=getter)
    other.start()
    time.sleep(0.05)
    assoc.dimse.msg_queue.put((None, None))
    other.join(10)
    assoc.join(10)
    assert got and got[0] < 1.0, f"the blocked getter waited {got}"


def test_requestor_keeps_the_plain_sleep() -> None:
    reactor.install()
    assoc = _SleepingAssociation("requestor", 0.3)
    assoc.start()
    time.sleep(0.05)
    assoc.dimse.msg_queue.put((None, None))
    assoc.join(5)
    assert assoc.slept >= 0.29


def test_dul_sleep_ends_when_its_socket_is_readable() -> None:
    reactor.install()
    ours, peer = socket.socketpair()
    assoc = Association(AE(), "acceptor")
    slept: list[float] = []

    class _Dul(pyn_dul.DULServiceProvider):
        def run(self) -> None:
            started = time.monotonic()
            vars(pyn_dul)["time"].sleep(5.0)
            slept.append(time.monotonic() - started)

    dul = _Dul(assoc)
    dul.socket = type("S", (), {"socket": ours})()  # type: ignore[assignment]
    try:
        dul.start()
        time.sleep(0.05)
        peer.sendall(b"\x04")
        dul.join(5)
        assert slept and slept[0] < 1.0, f"slept {slept} with data waiting"
    finally:
        ours.close()
        peer.close()


def _dul_with_one_sleep(monkeypatch: pytest.MonkeyPatch, sock: socket.socket,
                        seconds: float, slept: list[float]) -> pyn_dul.DULServiceProvider:
    """A DUL thread that runs the installed reactor wrapper (so it has the send wake-up
    every DUL gets) around one patched sleep instead of pynetdicom's loop."""

    def one_sleep(dul: pyn_dul.DULServiceProvider) -> None:
        started = time.monotonic()
        vars(pyn_dul)["time"].sleep(seconds)
        slept.append(time.monotonic() - started)

    monkeypatch.setattr(reactor, "_dul_run_reactor", one_sleep)

    class _Dul(pyn_dul.DULServiceProvider):
        def run(self) -> None:
            self.run_reactor()

    dul = _Dul(Association(AE(), "acceptor"))
    dul.socket = type("S", (), {"socket": sock})()  # type: ignore[assignment]
    return dul


@pytest.fixture
def ours() -> Iterator[socket.socket]:
    """The DUL's end of a connected socket pair (the peer end says nothing)."""
    sock, peer = socket.socketpair()
    try:
        yield sock
    finally:
        sock.close()
        peer.close()


def test_dul_sleep_ends_when_a_primitive_is_queued_to_send(
        monkeypatch: pytest.MonkeyPatch, ours: socket.socket) -> None:
    """The association thread's response must not wait for the DUL's next 1 ms look."""
    reactor.install()
    slept: list[float] = []
    dul = _dul_with_one_sleep(monkeypatch, ours, 5.0, slept)
    dul.start()
    time.sleep(0.05)
    dul.send_pdu(P_DATA())
    dul.join(5)
    assert slept and slept[0] < 1.0, f"slept {slept} with a primitive to send"
    assert dul.to_provider_queue.qsize() == 1


def test_dul_sleep_without_anything_to_send_lasts_as_before(
        monkeypatch: pytest.MonkeyPatch, ours: socket.socket) -> None:
    reactor.install()
    slept: list[float] = []
    dul = _dul_with_one_sleep(monkeypatch, ours, 0.2, slept)
    dul.start()
    dul.join(5)
    assert slept and slept[0] >= 0.19


def test_send_wake_is_closed_when_the_reactor_ends(monkeypatch: pytest.MonkeyPatch,
                                                   ours: socket.socket) -> None:
    reactor.install()
    slept: list[float] = []
    dul = _dul_with_one_sleep(monkeypatch, ours, 0.01, slept)
    dul.start()
    dul.join(5)
    wake = vars(dul)[reactor._WAKE_ATTR]
    assert wake.fd == -1
    dul.send_pdu(P_DATA())  # after the end: queued, no write to a closed descriptor
