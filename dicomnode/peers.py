"""Local peers the node works with: a private Orthanc as the PACS, and polling helpers.

Used by ``dicomnode demo`` and by the tests. Everything binds to free loopback ports and
its own directories; waiting is polling with a deadline, never a fixed sleep.
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
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any


class PeerMissingError(RuntimeError):
    """A peer program is not installed or would not start."""


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
    raise TimeoutError(f"timed out after {timeout:g} s waiting for {what} (last: {last!r})")


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def peer_env() -> dict[str, str]:
    env = dict(os.environ)
    env["TCP_NODELAY"] = "1"
    return env



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
                  extra: dict[str, Any] | None = None, name: str = "dicomnode-pacs") -> Orthanc:
    """Start a private Orthanc (own storage, own config, free loopback ports)."""
    exe = shutil.which("Orthanc") or shutil.which("orthanc")
    if exe is None:
        raise PeerMissingError("Orthanc is not installed (Debian package 'orthanc')")
    # absolute: Orthanc runs with cwd=workdir, so a relative --logdir would not exist there
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    dicom_port = int((extra or {}).get("DicomPort") or free_port())
    http_port = int((extra or {}).get("HttpPort") or free_port())
    config = {
        "Name": name,
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
            raise PeerMissingError(f"Orthanc exited with {proc.returncode}; see {workdir}")
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
