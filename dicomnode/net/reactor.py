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
- on a DUL thread, when its socket becomes readable.

Otherwise it sleeps for the same time, so every loop still runs its other checks
(release, abort, timeouts) exactly as often as before: it can only wake earlier.
"""

from __future__ import annotations

import select
import threading
import time as _time
from types import ModuleType
from typing import Any

from pynetdicom import association as _association
from pynetdicom import dul as _dul

_installed = False


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
            if fileno >= 0:
                try:
                    select.select([fileno], [], [], seconds)
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
    _installed = True
