"""Let pynetdicom's polling loops wake on work instead of sleeping through it.

pynetdicom runs two polling loops per association: the DUL thread sleeps 1 ms whenever
its previous pass found nothing to do, and the association's reactor sleeps 1 ms before
every look at the queue of decoded DIMSE messages. Each received instance waits in both,
and on a busy machine a thread that slept has to be scheduled again before it can go on.
Both sleeps go through the ``time`` module each of those modules imported; this installs
a stand-in there whose ``sleep``, called on one of those threads, returns as soon as the
work the loop is waiting for arrives:

- on an accepted association's thread, when a decoded DIMSE message is queued for it
  (the node's SCP handlers run on that thread; requested associations, where a
  caller blocks on the same queue for its responses, keep the plain sleep);
- on a DUL thread, when its socket becomes readable or when a primitive is queued for it
  to send (the association thread's C-STORE-RSP waited up to 1 ms for the DUL's next look
  at its queue while the peer, waiting for that response, sent nothing to wake it).

Otherwise it sleeps for the same time, so every loop still runs its other checks
(release, abort, timeouts) exactly as often as before: it can only wake earlier.
"""

from __future__ import annotations

import contextlib
import os
import select
import threading
import time as _time
from collections.abc import Callable
from types import ModuleType
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul

_installed = False
_WAKE_ATTR = "_dicomnode_send_wake"


class _SendWake:
    """An eventfd a DUL thread selects on beside its socket; set when a primitive is queued
    for it to send. Closed by the DUL thread itself when its reactor ends; setting it after
    that does nothing (the lock keeps a write off a closed, perhaps reused, descriptor)."""

    def __init__(self) -> None:
        self.fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self._lock = threading.Lock()

    def set(self) -> None:
        with self._lock:
            if self.fd >= 0:
                with contextlib.suppress(OSError):  # saturated: it is set either way
                    os.eventfd_write(self.fd, 1)

    def clear(self) -> None:
        with contextlib.suppress(OSError):  # already clear
            os.eventfd_read(self.fd)

    def close(self) -> None:
        with self._lock:
            if self.fd >= 0:
                os.close(self.fd)
                self.fd = -1


class _WakeOnWork:
    """Stands in for the ``time`` module inside pynetdicom's association and dul."""

    def __init__(self, real: ModuleType) -> None:
        self._real = real

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)

    def sleep(self, seconds: float) -> None:
        thread = threading.current_thread()
        if (seconds > 0 and isinstance(thread, _association.Association)
                and thread.is_acceptor):
            queue = getattr(getattr(thread, "dimse", None), "msg_queue", None)
            if queue is not None:
                with queue.not_empty:
                    if not queue._qsize():
                        queue.not_empty.wait(seconds)
                    if queue._qsize():
                        # put() wakes one waiter: if that was this one, pass it on, so a
                        # thread blocked in get() on the same queue is never left asleep
                        queue.not_empty.notify()
                return
        if seconds > 0 and isinstance(thread, _dul.DULServiceProvider):
            sock = getattr(thread.socket, "socket", None)
            fileno = sock.fileno() if sock is not None else -1
            wake: _SendWake | None = getattr(thread, _WAKE_ATTR, None)
            if fileno >= 0:
                fds = [fileno] if wake is None or wake.fd < 0 else [fileno, wake.fd]
                try:
                    readable, _, _ = select.select(fds, [], [], seconds)
                    if wake is not None and wake.fd in readable:
                        wake.clear()
                    return
                except (OSError, ValueError):
                    pass  # closed under us: fall back to a plain sleep
        self._real.sleep(seconds)


def install() -> None:
    """Idempotent; affects only pynetdicom's association and dul modules."""
    global _installed
    if _installed:
        return
    _association.time = _WakeOnWork(_time)  # type: ignore[assignment,attr-defined]
    _dul.time = _WakeOnWork(_time)  # type: ignore[assignment,attr-defined]
    if hasattr(os, "eventfd"):  # Linux; elsewhere the DUL keeps waking on its socket only
        global _dul_run_reactor, _dul_send_pdu
        provider = _dul.DULServiceProvider
        _dul_run_reactor, _dul_send_pdu = provider.run_reactor, provider.send_pdu
        provider.run_reactor = _run_reactor_with_wake  # type: ignore[method-assign]
        provider.send_pdu = _send_pdu_and_wake  # type: ignore[method-assign]
    _installed = True


_dul_run_reactor: Callable[[_dul.DULServiceProvider], None] | None = None
_dul_send_pdu: Callable[[_dul.DULServiceProvider, Any], None] | None = None


def _run_reactor_with_wake(self: _dul.DULServiceProvider) -> None:
    wake = _SendWake()
    setattr(self, _WAKE_ATTR, wake)
    try:
        assert _dul_run_reactor is not None
        _dul_run_reactor(self)
    finally:
        wake.close()


def _send_pdu_and_wake(self: _dul.DULServiceProvider, primitive: Any) -> None:
    assert _dul_send_pdu is not None
    _dul_send_pdu(self, primitive)
    wake: _SendWake | None = getattr(self, _WAKE_ATTR, None)
    if wake is not None:
        wake.set()
