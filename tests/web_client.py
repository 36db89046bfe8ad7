"""A small HTTP client for the node's status API in tests (stdlib only)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from typing import Any


class WebClient:
    def __init__(self, port: int, token: str | None = None) -> None:
        self.base = f"http://127.0.0.1:{port}"
        self.token = token

    def request(self, method: str, path: str, body: Any = None,
                token: str | None = None) -> tuple[int, dict[str, str], bytes]:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        use = token if token is not None else self.token
        if use:
            req.add_header("Authorization", f"Bearer {use}")
        if data is not None:
            req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=30) as rsp:
                return rsp.status, dict(rsp.headers), rsp.read()
        except urllib.error.HTTPError as exc:
            return exc.code, dict(exc.headers), exc.read()

    def get(self, path: str, token: str | None = None) -> Any:
        status, _, body = self.request("GET", path, token=token)
        assert status == 200, (path, status, body[:300])
        return json.loads(body)

    def post(self, path: str, body: Any, token: str | None = None) -> Any:
        status, _, raw = self.request("POST", path, body, token=token)
        assert status == 200, (path, status, raw[:300])
        return json.loads(raw)

    def text(self, path: str, token: str | None = None) -> str:
        status, _, body = self.request("GET", path, token=token)
        assert status == 200, (path, status, body[:300])
        return body.decode()
