"""Jobs that hang, crash or fail, and destinations that fail or are gone: each is
recorded with its reason, retried as configured, shown by `dicomnode status`, and never
holds up ingest."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pynetdicom import AE, AllStoragePresentationContexts, evt

from dicomnode.config import OutboxSettings
from tests.peers import (
    PYDICOM_DATA,
    PYDICOM_FILES,
    REPO,
    NodeProcess,
    free_port,
    node_config,
    start_node,
    storescu,
    wait_for,
)

PLUGINS = {name: f"tests.support.pipelines:{cls}" for name, cls in
           (("hang", "Hang"), ("crash_once", "CrashOnce"), ("broken", "Broken"),
            ("note", "NoteOnly"))}


class FlakyPacs:
    """A storage SCP that answers 0xA700 (out of resources) to the first ``failures``
    C-STOREs, then success; it records what it finally stored."""

    def __init__(self, failures: int) -> None:
        self.failures = failures
        self.calls = 0
        self.stored: list[str] = []
        self.port = free_port()
        ae = AE(ae_title="FLAKY")
        for cx in AllStoragePresentationContexts:
            assert cx.abstract_syntax is not None
            ae.add_supported_context(cx.abstract_syntax)
        self.server: Any = ae.start_server(("127.0.0.1", self.port), block=False,
                                           evt_handlers=[(evt.EVT_C_STORE, self.on_store)])
        self.lock = threading.Lock()

    def on_store(self, event: evt.Event) -> int:
        with self.lock:
            self.calls += 1
            if self.calls <= self.failures:
                return 0xA700
            self.stored.append(str(event.request.AffectedSOPInstanceUID))
            return 0x0000


@pytest.fixture
def flaky() -> Iterator[FlakyPacs]:
    pacs = FlakyPacs(failures=2)
    yield pacs
    pacs.server.shutdown()


def _job_state(node: NodeProcess, route: str) -> dict[str, Any] | None:
    import sqlite3

    with sqlite3.connect(node.storage / "ledger.sqlite3") as c:
        row = c.execute("SELECT state, attempts, error FROM jobs WHERE route=? ORDER BY id DESC",
                        (route,)).fetchone()
    return None if row is None else {"state": row[0], "attempts": row[1], "error": row[2]}


def test_misbehaving_jobs_and_destinations(tmp_path: Path, flaky: FlakyPacs) -> None:
    closed = free_port()  # nothing listens here
    config = node_config(
        tmp_path / "var", free_port(),
        routes=[
            {"name": "ct-hangs", "match": {"Modality": "CT"}, "pipeline": "hang"},
            {"name": "mr-crashes-once", "match": {"Modality": "MR"}, "pipeline": "crash_once",
             "send_to": ["flaky"]},
            {"name": "cr-broken", "match": {"Modality": "CR"}, "pipeline": "broken"},
            {"name": "nm-to-nowhere", "match": {"Modality": "NM"}, "pipeline": "note",
             "send_to": ["nowhere"]},
        ],
        destinations={"flaky": {"ae_title": "FLAKY", "host": "127.0.0.1", "port": flaky.port},
                      "nowhere": {"ae_title": "GONE", "host": "127.0.0.1", "port": closed}},
        extra={"pipelines": PLUGINS,
               "jobs": {"workers": 1, "timeout_s": 8, "max_attempts": 2},
               "outbox": {"max_attempts": 3, "backoff_initial_s": 0.2, "backoff_max_s": 0.5}})
    markers = tmp_path / "markers"
    markers.mkdir()
    node = start_node(tmp_path / "node", config,
                      env={"DICOMNODE_TEST_MARKERS": str(markers)})
    try:
        storescu(node.port, [PYDICOM_FILES / "CT_small.dcm"])
        wait_for(lambda: (_job_state(node, "ct-hangs") or {}).get("state") == "running", 60,
                 "the hanging job to start")
        # ingest is not held up by a hung analysis
        t0 = time.monotonic()
        storescu(node.port, [PYDICOM_FILES / "MR_small.dcm", PYDICOM_DATA / "RG1_UNCI.dcm",
                             PYDICOM_DATA / "JPEG2000_UNC.dcm"])
        assert time.monotonic() - t0 < 10
        wait_for(lambda: all((_job_state(node, r) or {}).get("state") in ("done", "failed")
                             for r in ("ct-hangs", "mr-crashes-once", "cr-broken",
                                       "nm-to-nowhere")), 180, "every job to finish")
        hang = _job_state(node, "ct-hangs")
        assert hang == {"state": "failed", "attempts": 2, "error": "timed out after 8 s"}
        crash = _job_state(node, "mr-crashes-once")
        assert crash is not None and crash["state"] == "done" and crash["attempts"] == 2
        broken = _job_state(node, "cr-broken")
        assert broken is not None and broken["state"] == "failed"
        assert "the model file is corrupt" in broken["error"]
        wait_for(lambda: len(flaky.stored) == 1, 60, "the flaky PACS to accept the result")
        wait_for(lambda: node.status()["dead_letters"], 60, "the unreachable send to give up")
        time.sleep(1.0)  # a duplicate send would arrive within the outbox interval
        assert len(flaky.stored) == 1 and flaky.calls == 3
        status = node.status()
        (dead,) = status["dead_letters"]
        assert dead["destination"] == "nowhere" and dead["attempts"] == 3
        text = subprocess.run([sys.executable, "-m", "dicomnode.cli", "status", "--config",
                               str(node.config_path)], capture_output=True, text=True,
                              cwd=REPO, check=True).stdout
        assert "FAILED job" in text and "timed out after 8 s" in text
        assert "the model file is corrupt" in text and "DEAD result" in text
        assert "worker process died" in node.log_text()
        storescu(node.port, [PYDICOM_FILES / "CT_small.dcm"])  # still serving
    finally:
        node.stop()


def test_default_backoff_outlasts_a_ten_minute_outage() -> None:
    """With the defaults, the shortest possible retry schedule (every jitter at its
    minimum) spans more than ten minutes before a result is dead-lettered."""
    cfg = OutboxSettings()
    waits = [min(cfg.backoff_max_s, cfg.backoff_initial_s * 2 ** (a - 1)) * 0.5
             for a in range(1, cfg.max_attempts)]
    assert sum(waits) > 600, sum(waits)
