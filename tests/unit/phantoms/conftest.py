"""Helpers shared by the phantom tests."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.peers import require_tool


def dciodvfy_errors(path: Path) -> list[str]:
    """Error lines dciodvfy prints for one file (warnings are allowed)."""
    exe = require_tool("dciodvfy")
    proc = subprocess.run([exe, str(path)], capture_output=True, text=True, check=False)
    return [line for line in (proc.stdout + proc.stderr).splitlines() if line.startswith("Error")]


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }
