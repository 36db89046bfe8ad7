"""Delivers result objects from the outbox, until the destination confirms each.

Every C-STORE response status is checked: success and warning statuses confirm
delivery (warnings are logged); failures and lost associations are retried with
capped exponential backoff and jitter, then dead-lettered. A row is marked
``sending`` before it goes out, so after a crash it is re-sent; its deterministic SOP
Instance UID makes that repeat replace rather than duplicate at the PACS.
"""

from __future__ import annotations

import logging
import random
import threading
from collections import defaultdict
from pathlib import Path

from dicomnode.config import Destination, Settings
from dicomnode.ingest.ledger import Ledger, OutboxRow
from dicomnode.ingest.spool import Spool
from dicomnode.net.scu import AssociationFailed, StoreClient
from dicomnode.net.tls import client_context_for
from dicomnode.ops.events import NO_EVENTS, NodeEvents

log = logging.getLogger(__name__)


class OutboxSender:
    def __init__(self, settings: Settings, ledger: Ledger, spool: Spool,
                 rng: random.Random | None = None, events: NodeEvents = NO_EVENTS) -> None:
        self.settings = settings
        self.events = events
        self.ledger = ledger
        self.spool = spool
        self.rng = rng or random.Random()
        self._lock = threading.Lock()

    def backoff(self, attempts: int) -> float:
        cfg = self.settings.outbox
        base = min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** max(0, attempts - 1))
        return float(base * (0.5 + self.rng.random()))

    def _failed(self, row: OutboxRow, attempts: int, status: int | None, error: str) -> None:
        if attempts >= self.settings.outbox.max_attempts:
            self.ledger.mark_send_failed(row.id, status, error, None)
            log.error("result %d to %s dead-lettered after %d attempts: %s", row.id,
                      row.destination, attempts, error)
        else:
            delay = self.backoff(attempts)
            self.ledger.mark_send_failed(row.id, status, error, self.ledger.clock() + delay)
            log.warning("result %d to %s failed (attempt %d, %s); retry in %.1f s", row.id,
                        row.destination, attempts, error, delay)

    def pump(self) -> int:
        """Send what is due; returns the number confirmed. Safe to call concurrently."""
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            return self._pump()
        finally:
            self._lock.release()

    def _pump(self) -> int:
        due = self.ledger.due_outbox()
        by_dest: dict[str, list[OutboxRow]] = defaultdict(list)
        for row in due:
            by_dest[row.destination].append(row)
        confirmed = 0
        for name, rows in by_dest.items():
            dest = self.settings.destinations.get(name)
            if dest is None:
                for row in rows:
                    self.ledger.mark_send_failed(row.id, None, f"unknown destination {name!r}",
                                                 None)
                continue
            confirmed += self._send_batch(dest, rows)
        return confirmed

    def _send_batch(self, dest: Destination, rows: list[OutboxRow]) -> int:
        client = StoreClient(host=dest.host, port=dest.port, called_aet=dest.ae_title,
                             calling_aet=self.settings.node.ae_title,
                             timeout_s=self.settings.outbox.timeout_s,
                             tls=client_context_for(self.settings.security.tls, dest.name))
        # another receiver sharing the ledger may have claimed some of them first
        rows = [row for row in rows if self.ledger.mark_sending(row.id)]
        if not rows:
            return 0
        paths: list[Path] = [self.spool.path(row.path) for row in rows]
        try:
            results = client.send(paths)
        except (AssociationFailed, OSError, RuntimeError, ValueError) as exc:
            for row in rows:
                self._failed(row, row.attempts + 1, None, str(exc))
                self.events.send_answered(row, False, None, str(exc))
            return 0
        confirmed = 0
        for row, res in zip(rows, results, strict=True):
            attempts = row.attempts + 1
            cat = res.category
            if cat in ("success", "warning"):
                assert res.status is not None
                if cat == "warning":
                    log.warning("result %d: %s answered warning 0x%04X", row.id, dest.name,
                                res.status)
                self.ledger.mark_sent(row.id, res.status)
                self.events.send_answered(row, True, res.status, None)
                confirmed += 1
            else:
                status = f"0x{res.status:04X}" if res.status is not None else "no response"
                error = f"{status} {res.error or ''}".strip()
                self._failed(row, attempts, res.status, error)
                self.events.send_answered(row, False, res.status, error)
        if confirmed:
            log.info("%d result object(s) confirmed by %s", confirmed, dest.name)
        return confirmed
