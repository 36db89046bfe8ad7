"""Real peers for tests: Orthanc as the PACS, dcmtk tools, and the node itself.

Everything binds to free loopback ports and its own temporary directories. Waiting is
done by polling with a deadline, never by fixed sleeps. Under CI=true a missing peer is
a failure, never a skip.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from dicomnode.peers import (  # re-exported for the tests
    Orthanc,
    free_port,
    peer_env,
    port_open,
    wait_for,
)
from dicomnode.peers import start_orthanc as _start_orthanc

__all__ = ["Orthanc", "free_port", "peer_env", "port_open", "wait_for"]

REPO = Path(__file__).resolve().parent.parent
PYDICOM_FILES = Path(str(__import__("pydicom").__file__)).parent / "data" / "test_files"
PYDICOM_DATA = Path(str(__import__("data_store").__file__)).parent / "data"


def in_ci() -> bool:
    return os.environ.get("CI", "").lower() == "true"


def require_tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        message = f"{name} is not installed (run scripts/test.sh, which installs the peers)"
        if in_ci():
            pytest.fail(message)
        pytest.skip(message)
    return path


def require_orthanc() -> None:
    if shutil.which("Orthanc") is None:
        require_tool("Orthanc")


def start_orthanc(workdir: Path, **kwargs: Any) -> Orthanc:
    require_orthanc()
    return _start_orthanc(workdir, name="dicomnode-test-pacs", **kwargs)


@contextlib.contextmanager
def orthanc_running(workdir: Path, **kwargs: Any) -> Iterator[Orthanc]:
    orthanc = start_orthanc(workdir, **kwargs)
    try:
        yield orthanc
    finally:
        orthanc.stop()


def ai_results(orthanc: Orthanc, study_uid: str) -> list[dict[str, Any]]:
    """The node's result objects (series description "AI ...") in one study of Orthanc,
    each as its tags plus its Orthanc id."""
    found = orthanc.post("/tools/find", {"Level": "Instance", "Expand": True,
                                          "Query": {"StudyInstanceUID": study_uid}})
    out = []
    for item in found:
        tags = orthanc.instance_tags(item["ID"])
        if str(tags.get("SeriesDescription", "")).startswith("AI "):
            out.append({"id": item["ID"], **tags})
    return out


# -- the node as a separate process --------------------------------------------------

def node_config(storage: Path, port: int, *, routes: list[dict[str, Any]] | None = None,
                destinations: dict[str, Any] | None = None,
                callers: list[dict[str, str]] | None = None,
                extra: dict[str, Any] | None = None) -> dict[str, Any]:
    config: dict[str, Any] = {
        "node": {"ae_title": "DICOMNODE", "host": "127.0.0.1", "port": port,
                 "storage": str(storage)},
        "security": {"allowed_callers": callers if callers is not None else [
            {"ae_title": "STORESCU", "host": "127.0.0.1"},
            {"ae_title": "ORTHANC", "host": "127.0.0.1"},
            {"ae_title": "TESTSCU", "host": "127.0.0.1"}]},
        "completion": {"series_quiet_s": 1.0, "study_quiet_s": 2.0, "sweep_interval_s": 0.2},
        "destinations": destinations or {},
        "routes": routes or [],
        "models": {"dir": str(REPO / "models")},
        "jobs": {"workers": 1, "timeout_s": 120, "max_attempts": 3},
        "outbox": {"max_attempts": 20, "backoff_initial_s": 0.2, "backoff_max_s": 2,
                   "interval_s": 0.2, "timeout_s": 15},
        "logging": {"level": "INFO"},
    }
    for key, value in (extra or {}).items():
        if isinstance(value, dict) and isinstance(config.get(key), dict):
            config[key] = {**config[key], **value}
        else:
            config[key] = value
    return config


@dataclass
class NodeProcess:
    config_path: Path
    port: int
    storage: Path
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def status(self) -> dict[str, Any]:
        out = subprocess.run([sys.executable, "-m", "dicomnode.cli", "status", "--json",
                              "--config", str(self.config_path)], capture_output=True,
                             text=True, check=True, cwd=REPO)
        result: dict[str, Any] = json.loads(out.stdout)
        return result

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        return int(self.proc.returncode)


def start_node(workdir: Path, config: dict[str, Any], *, log_name: str = "node.log",
               env: dict[str, str] | None = None, checkout: Path = REPO) -> NodeProcess:
    """``checkout``: run the node from another copy of the repository (benchmarks)."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "node.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log_path = workdir / log_name
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(checkout), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                                 str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=checkout,
                                env=full_env)
    port = int(config["node"]["port"])
    node = NodeProcess(cfg, port, Path(config["node"]["storage"]), proc, log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"node exited with {proc.returncode}:\n{node.log_text()}")
        return port_open(port)

    wait_for(ready, 60, "the node to listen")
    return node


def storescu(port: int, files: list[Path], *, aet: str = "STORESCU", aec: str = "DICOMNODE",
             check: bool = True, extra: list[str] | None = None
             ) -> subprocess.CompletedProcess[str]:
    exe = require_tool("storescu")
    cmd = [exe, "-aet", aet, "-aec", aec, *(extra or []), "127.0.0.1", str(port),
           *map(str, files)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"storescu failed ({result.returncode}):\n{result.stderr}")
    return result


def dcmsend(port: int, files: list[Path], *, aet: str = "STORESCU", aec: str = "DICOMNODE",
            check: bool = True) -> subprocess.CompletedProcess[str]:
    exe = require_tool("dcmsend")
    # -dn: never decompress, so the peer receives the files' own transfer syntaxes
    cmd = [exe, "-dn", "-aet", aet, "-aec", aec, "127.0.0.1", str(port), *map(str, files)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=peer_env(), timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"dcmsend failed ({result.returncode}):\n{result.stderr}")
    return result
