"""The hardening suite: fast checks here, the long tier behind ``-m slow``.

Tests marked ``slow`` are deselected by the project's pytest options (``-m 'not slow'``)
and run with ``scripts/test.sh -m slow``, so the normal run stays within its budget.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.hardening.nodes import hardened_node
from tests.peers import NodeProcess

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="package")
def shared_node(tmp_path_factory: pytest.TempPathFactory) -> Iterator[NodeProcess]:
    """One hardened node for the modules that only need a node to talk to."""
    with hardened_node(tmp_path_factory.mktemp("shared")) as proc:
        yield proc
