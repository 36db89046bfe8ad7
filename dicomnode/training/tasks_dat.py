"""Training task registered on import (filled in by its task module)."""

from __future__ import annotations
