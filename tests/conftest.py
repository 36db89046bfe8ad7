"""Shared fixtures. Peers and helpers live in tests/peers.py."""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore", message=".*Invalid value for VR.*")

from tests.servers import celery_broker, ledger_url, pg_server  # noqa: E402, F401  (fixtures)
