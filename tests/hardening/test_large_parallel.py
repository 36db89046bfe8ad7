"""Long tier: one 1 GB instance and four 500 MB instances at once; peak RSS < 400 MB."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from tests.integration.test_large_instance import _peak_rss_kib, write_big_instance
from tests.peers import (
    PYDICOM_FILES,
    free_port,
    node_config,
    peer_env,
    require_tool,
    start_node,
    storescu,
)

FRAME = 512 * 512 * 2


@pytest.mark.slow
def test_five_large_instances_in_parallel(tmp_path: Path) -> None:
    exe = require_tool("storescu")
    files = [tmp_path / "big1g.dcm"]
    write_big_instance(files[0], frames=1024**3 // FRAME)
    for i in range(4):
        files.append(tmp_path / f"big500m_{i}.dcm")
        write_big_instance(files[-1], frames=500 * 1024**2 // FRAME)
    config = node_config(tmp_path / "var", free_port())
    config["completion"] = {"series_quiet_s": 600, "study_quiet_s": 600}
    node = start_node(tmp_path / "node", config)
    try:
        storescu(node.port, [PYDICOM_FILES / "CT_small.dcm"])
        baseline = _peak_rss_kib(node.proc.pid)
        procs = [subprocess.Popen([exe, "-aet", "STORESCU", "-aec", "DICOMNODE",
                                   "127.0.0.1", str(node.port), str(f)], env=peer_env(),
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
                 for f in files]
        codes = [p.wait(900) for p in procs]
        peak = _peak_rss_kib(node.proc.pid)
        stored = node.status()["counts"]["instances"]["stored"]
    finally:
        node.stop()
    print(f"5 large instances in parallel: peak RSS {baseline / 1024:.0f} -> "
          f"{peak / 1024:.0f} MiB")
    assert codes == [0] * 5
    assert stored == 6
    assert peak / 1024 < 400
