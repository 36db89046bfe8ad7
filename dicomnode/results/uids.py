"""Deterministic UIDs for result objects.

Re-running the same algorithm version on the same inputs must give the same UIDs, so
that a re-sent result replaces the earlier one in the PACS instead of duplicating it.
UUID-derived UIDs under the 2.25 root (PS3.5 B.2) need no registered root.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterable

_NAMESPACE = uuid.UUID("6c1f4f0e-3b5a-5d0b-9a8e-2f0d1c3b7a90")


def derive_uid(*parts: str | int | Iterable[str]) -> str:
    """Return a 2.25 UID that depends only on ``parts`` (iterables are sorted first)."""
    tokens: list[str] = []
    for part in parts:
        if isinstance(part, str | int):
            tokens.append(str(part))
        else:
            tokens.append(",".join(sorted(part)))
    return f"2.25.{uuid.uuid5(_NAMESPACE, '|'.join(tokens)).int}"
