"""Phantom kinds for ``dicomnode phantom KIND --out DIR --n N --seed S``."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

Writer = Callable[..., list[Path]]


def phantom_kinds() -> dict[str, Writer]:
    from dicomnode.phantoms.dat_spect import write_dat_study

    kinds: dict[str, Writer] = {"dat-spect": write_dat_study}
    try:
        from dicomnode.phantoms.common import PHANTOM_KINDS
    except ImportError:
        return kinds
    kinds.update(PHANTOM_KINDS)
    return kinds


def write(kind: str, out: Path, *, n: int, seed: int, **options: Any) -> list[Path]:
    return phantom_kinds()[kind](out, n=n, seed=seed, **options)
