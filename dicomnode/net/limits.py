"""Who gets a thread, and who gets an association: admission before pynetdicom.

pynetdicom counts a connection against ``maximum_associations`` from the moment it is
accepted, and waits ``acse_timeout`` (30 s) for its A-ASSOCIATE-RQ; ten connections that
never speak lock every real peer out for that long. Here a connection is only
*pending* until it has sent a whole A-ASSOCIATE-RQ, and pending connections live in two
pools: one for hosts on the allow-list and one for everyone else, each bounded, the
second also per address. A flood from elsewhere fills only its own pool, so the PACS
(and the C-MOVE return path) always finds room. Association slots are counted only for
associations that passed the called/calling AE checks.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from dicomnode.config import NodeSettings


@dataclass(frozen=True)
class ConnectionLimits:
    max_associations: int
    max_pending: int
    max_pending_per_address: int
    associate_timeout_s: float
    pdu_timeout_s: float
    network_timeout_s: float
    max_pdu_size: int

    @classmethod
    def from_settings(cls, node: NodeSettings) -> ConnectionLimits:
        return cls(max_associations=node.max_associations,
                   max_pending=node.max_pending_connections,
                   max_pending_per_address=node.max_pending_per_address,
                   associate_timeout_s=node.associate_timeout_s,
                   pdu_timeout_s=node.pdu_timeout_s,
                   network_timeout_s=node.network_timeout_s,
                   max_pdu_size=node.max_pdu_size)

    @property
    def trusted_per_address(self) -> int:
        """An allowed host may open as many connections at once as it may associate."""
        return max(self.max_pending_per_address, self.max_associations)


class PendingTicket:
    """A connection holding a place in a pending pool until ``Admission.leave``."""

    __slots__ = ("accepted_at", "address", "sock", "trusted")

    def __init__(self, address: str, trusted: bool, sock: socket.socket) -> None:
        self.address = address
        self.trusted = trusted
        self.sock = sock
        self.accepted_at = time.monotonic()


class Admission:
    """Thread-safe bookkeeping of pending connections and association slots."""

    def __init__(self, limits: ConnectionLimits, host_trusted: Callable[[str], bool]) -> None:
        self.limits = limits
        self.host_trusted = host_trusted
        self._lock = threading.Lock()
        self._pending: dict[int, PendingTicket] = {}
        self._per_address: dict[str, int] = {}
        self._pool_size = {True: 0, False: 0}
        self._associations = 0
        self.refused_connections = 0
        self.evicted_connections = 0
        self.refused_associations = 0

    def admit(self, address: str, sock: socket.socket) -> PendingTicket | None:
        """Called on the accept thread: must not block. None means close it now.

        A host on the allow-list is never turned away: when its pool or its own share is
        full, its oldest pending connection is closed instead. A real peer sends its
        A-ASSOCIATE-RQ within milliseconds of connecting, so the oldest one still
        pending is the one least likely to be real. Others are refused when full.
        """
        trusted = self.host_trusted(address)
        per_address = (self.limits.trusted_per_address if trusted
                       else self.limits.max_pending_per_address)
        evicted: PendingTicket | None = None
        with self._lock:
            address_full = self._per_address.get(address, 0) >= per_address
            if address_full or self._pool_size[trusted] >= self.limits.max_pending:
                if not trusted:
                    self.refused_connections += 1
                    return None
                evicted = min((t for t in self._pending.values() if t.trusted
                               and (not address_full or t.address == address)),
                              key=lambda t: t.accepted_at)
                self._forget(evicted)
                self.evicted_connections += 1
            ticket = PendingTicket(address, trusted, sock)
            self._pending[id(ticket)] = ticket
            self._per_address[address] = self._per_address.get(address, 0) + 1
            self._pool_size[trusted] += 1
        if evicted is not None:
            with contextlib.suppress(OSError):
                evicted.sock.shutdown(socket.SHUT_RDWR)
        return ticket

    def _forget(self, ticket: PendingTicket) -> bool:
        if self._pending.pop(id(ticket), None) is None:
            return False
        left = self._per_address[ticket.address] - 1
        if left:
            self._per_address[ticket.address] = left
        else:
            del self._per_address[ticket.address]
        self._pool_size[ticket.trusted] -= 1
        return True

    def leave(self, ticket: PendingTicket) -> None:
        """The connection is no longer pending: handed to pynetdicom, or closed."""
        with self._lock:
            self._forget(ticket)

    def reserve_association(self) -> bool:
        with self._lock:
            if self._associations >= self.limits.max_associations:
                self.refused_associations += 1
                return False
            self._associations += 1
            return True

    def release_association(self) -> None:
        with self._lock:
            self._associations = max(0, self._associations - 1)

    @property
    def associations(self) -> int:
        return self._associations

    @property
    def pending(self) -> int:
        return len(self._pending)

    def close_pending(self) -> None:
        """At shutdown: end every pending connection so its thread returns at once."""
        with self._lock:
            tickets = list(self._pending.values())
        for ticket in tickets:
            with contextlib.suppress(OSError):
                ticket.sock.shutdown(socket.SHUT_RDWR)


class LogThrottle:
    """At most one log line per key per ``interval_s``: a flood must not flood the log."""

    def __init__(self, interval_s: float = 10.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.interval_s = interval_s
        self.clock = clock
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}
        self._lock = threading.Lock()

    def allow(self, key: str) -> int | None:
        """None to stay quiet; otherwise how many lines were suppressed since the last."""
        now = self.clock()
        with self._lock:
            last = self._last.get(key)
            if last is not None and now - last < self.interval_s:
                self._suppressed[key] = self._suppressed.get(key, 0) + 1
                return None
            self._last[key] = now
            return self._suppressed.pop(key, 0)
