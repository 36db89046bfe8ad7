"""Real peers for tests: Orthanc as the PACS, dcmtk tools, and the node itself.

Everything binds to free loopback ports and its own temporary directories. Waiting is
done by polling with a deadline, never by fixed sleeps. Under CI=true a missing peer is
a failure, never a skip.
"""

from __future__ import annotations

import base64
import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

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


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env


# -- Orthanc -------------------------------------------------------------------------

@dataclass
class Orthanc:
    aet: str
    dicom_port: int
    http_port: int
    workdir: Path
    proc: subprocess.Popen[bytes]
    user: str = "test"
    password: str = "test"

    def _request(self, method: str, path: str, body: bytes | None = None) -> Any:
        req = urllib.request.Request(f"http://127.0.0.1:{self.http_port}{path}", data=body,
                                     method=method)
        token = base64.b64encode(f"{self.user}:{self.password}".encode()).decode()
        req.add_header("Authorization", f"Basic {token}")
        with urllib.request.urlopen(req, timeout=30) as rsp:
            data = rsp.read()
        ctype = rsp.headers.get("Content-Type", "")
        return json.loads(data) if "json" in ctype else data

    def get(self, path: str) -> Any:
        return self._request("GET", path)

    def post(self, path: str, body: Any) -> Any:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        return self._request("POST", path, data)

    def delete(self, path: str) -> Any:
        return self._request("DELETE", path)

    def instances(self) -> list[str]:
        result: list[str] = self.get("/instances")
        return result

    def instance_tags(self, orthanc_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.get(f"/instances/{orthanc_id}/simplified-tags")
        return result

    def instance_file(self, orthanc_id: str) -> bytes:
        result: bytes = self.get(f"/instances/{orthanc_id}/file")
        return result

    def find_instances(self, **tags: str) -> list[dict[str, Any]]:
        out = []
        for oid in self.instances():
            t = self.instance_tags(oid)
            if all(str(t.get(k)) == v for k, v in tags.items()):
                out.append({"id": oid, **t})
        return out

    def upload(self, path: Path) -> None:
        self.post("/instances", path.read_bytes())

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


def start_orthanc(workdir: Path, *, aet: str = "ORTHANC",
                  modalities: dict[str, list[Any]] | None = None,
                  extra: dict[str, Any] | None = None) -> Orthanc:
    exe = shutil.which("Orthanc") or shutil.which("orthanc")
    if exe is None:
        require_tool("Orthanc")
        raise AssertionError("unreachable")
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port = int((extra or {}).get("DicomPort") or free_port())
    http_port = int((extra or {}).get("HttpPort") or free_port())
    config = {
        "Name": "dicomnode-test-pacs",
        "StorageDirectory": str(workdir / "storage"),
        "IndexDirectory": str(workdir / "index"),
        "DicomAet": aet,
        "DicomPort": dicom_port,
        "HttpPort": http_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {"test": "test"},
        "DicomCheckCalledAet": True,
        "DicomModalities": modalities or {},
        "SyncStorageArea": True,
        "StorageCompression": False,
        "Plugins": [],
        "HttpTimeout": 60,
        "DicomScpTimeout": 30,
        "StableAge": 2,
        "OverwriteInstances": False,
        "LimitFindResults": 0,
        "LimitFindInstances": 0,
    }
    config.update(extra or {})
    cfg = workdir / "orthanc.json"
    cfg.write_text(json.dumps(config, indent=2))
    log = (workdir / "orthanc.log").open("wb")
    proc = subprocess.Popen([exe, "--logdir=" + str(workdir), str(cfg)], stdout=log,
                            stderr=subprocess.STDOUT, env=peer_env(), cwd=workdir)
    orthanc = Orthanc(aet, dicom_port, http_port, workdir, proc)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"Orthanc exited with {proc.returncode}; see {workdir}")
        try:
            orthanc.get("/system")
            return port_open(dicom_port)
        except (urllib.error.URLError, ConnectionError, OSError):
            return False

    wait_for(ready, 60, "Orthanc to start")
    return orthanc


@contextlib.contextmanager
def orthanc_running(workdir: Path, **kwargs: Any) -> Iterator[Orthanc]:
    orthanc = start_orthanc(workdir, **kwargs)
    try:
        yield orthanc
    finally:
        orthanc.stop()


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
               env: dict[str, str] | None = None) -> NodeProcess:
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "node.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log_path = workdir / log_name
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([str(REPO), full_env.get("PYTHONPATH", "")])
    full_env.update(env or {})
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "serve", "--config",
                                 str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
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
