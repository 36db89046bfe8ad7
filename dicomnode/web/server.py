"""HTTP for the status page, the REST API, /metrics and the health probes.

The standard library's ``ThreadingHTTPServer``: the API is a few dozen small JSON
requests a minute from a browser or a scraper, which needs no framework, and keeps the
node's dependencies to what it already has plus ``prometheus_client``.

Access: every ``/api`` route and ``/metrics`` needs ``Authorization: Bearer <token>``
with a token from ``web.tokens`` (or the generated ``<storage>/web-token``); its role
decides what it may do. Open without a token: the page's static files (no data), the
OpenAPI document, ``/healthz`` and ``/readyz`` (a word each, for probes). Requests are
logged by method and path only: a query string could carry an accession number.
"""

from __future__ import annotations

import hmac
import json
import logging
import os
import re
import secrets
import ssl
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

from dicomnode.config import WebSettings, WebToken
from dicomnode.net.tls import server_context
from dicomnode.ops.audit import MINOR_FAILURE, AuditTrail
from dicomnode.ops.metrics import CONTENT_TYPE as METRICS_TYPE
from dicomnode.ops.metrics import NodeMetrics
from dicomnode.web.api import ApiError, Caller, StatusApi
from dicomnode.web.openapi import openapi_document

log = logging.getLogger(__name__)

TOKEN_FILE = "web-token"
MAX_BODY = 1 << 20
_STATIC = {"/": ("index.html", "text/html; charset=utf-8"),
           "/static/app.js": ("app.js", "text/javascript; charset=utf-8"),
           "/static/app.css": ("app.css", "text/css; charset=utf-8")}
_SECURITY_HEADERS = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Content-Security-Policy": "default-src 'self'; img-src 'self' data:; "
                               "frame-ancestors 'none'",
    "Cache-Control": "no-store",
}


def load_or_create_token(storage: Path) -> WebToken:
    """The local operator token in ``<storage>/web-token``, made (mode 0600) if absent."""
    path = storage / TOKEN_FILE
    if path.is_file():
        token = path.read_text(encoding="ascii").strip()
        if len(token) >= 16:
            return WebToken("local", token, "operator")
    storage.mkdir(parents=True, exist_ok=True)
    token = secrets.token_urlsafe(32)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w", encoding="ascii") as fp:
        fp.write(token + "\n")
    return WebToken("local", token, "operator")


@dataclass(frozen=True)
class _Route:
    method: str
    pattern: re.Pattern[str]
    permission: str | None  # None: open
    handler: Callable[..., Any]


class WebServer:
    def __init__(self, settings: WebSettings, api: StatusApi | None, metrics: NodeMetrics,
                 audit: AuditTrail, readiness: Callable[[], Mapping[str, bool]],
                 tokens: tuple[WebToken, ...], *, port: int | None = None) -> None:
        """``api`` None: only ``/metrics`` and the health probes (``dicomnode worker``);
        ``port``: instead of ``settings.port``."""
        self.settings = settings
        self.listen_port = settings.port if port is None else port
        self.api = api
        self.metrics = metrics
        self.audit = audit
        self.readiness = readiness
        self.tokens = tokens
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None
        self.routes = self._routes()

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        tls = self.settings.tls
        server: ThreadingHTTPServer
        if tls is not None:
            server = _TlsHTTPServer((self.settings.host, self.listen_port),
                                    self._handler_class(), server_context(tls))
        else:
            server = _HTTPServer((self.settings.host, self.listen_port), self._handler_class())
        server.daemon_threads = True
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={
            "poll_interval": 0.5}, name="dicomnode-web", daemon=True)
        self._thread.start()
        log.info("%s on %s://%s:%d/", "status page and API" if self.api is not None
                 else "metrics", "https" if tls is not None else "http", self.settings.host,
                 self.port)

    @property
    def port(self) -> int:
        if self._server is None:
            raise RuntimeError("not started")
        return int(self._server.server_address[1])

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None

    # -- routing -----------------------------------------------------------------------

    def _routes(self) -> list[_Route]:
        a = self.api

        def r(method: str, path: str, permission: str | None,
              handler: Callable[..., Any]) -> _Route:
            return _Route(method, re.compile(f"^{path}$"), permission, handler)

        uid = r"(?P<uid>[0-9.]{1,64})"
        probes = [
            r("GET", "/healthz", None, lambda c, q, b: ("text", "ok\n")),
            r("GET", "/readyz", None, self._ready),
            r("GET", "/metrics", "read",
              lambda c, q, b: ("metrics", self.metrics.exposition())),
        ]
        if a is None:
            return probes
        return [
            *probes,
            r("GET", "/api/openapi.json", None, lambda c, q, b: openapi_document()),
            r("GET", "/api/whoami", "read",
              lambda c, q, b: {"name": c.name, "role": c.role}),
            r("GET", "/api/studies", "read",
              lambda c, q, b: a.recent_studies(c, _int(q, "limit", 50))),
            r("POST", "/api/studies/search", "read", lambda c, q, b: a.search(c, b)),
            r("GET", f"/api/studies/{uid}", "read",
              lambda c, q, b, uid: a.timeline(c, uid)),
            r("GET", "/api/queues", "read", lambda c, q, b: a.queues(c)),
            r("POST", r"/api/outbox/(?P<oid>\d{1,12})/retry", "operate",
              lambda c, q, b, oid: a.retry_dead_letter(c, int(oid))),
            r("POST", "/api/outbox/retry-dead", "operate",
              lambda c, q, b: a.retry_dead_letter(c, None)),
            r("POST", r"/api/jobs/(?P<jid>\d{1,12})/retry", "operate",
              lambda c, q, b, jid: a.retry_job(c, int(jid))),
            r("GET", "/api/routes", "read", lambda c, q, b: a.routes(c)),
            r("POST", "/api/routes/test", "read", lambda c, q, b: a.test_rules(c, b)),
            r("GET", "/api/series", "read", lambda c, q, b: a.series(c, _int(q, "limit", 100))),
            r("GET", "/api/models", "read", lambda c, q, b: a.models(c)),
            r("GET", "/api/audit", "read", self._audit),
        ]

    def _ready(self, caller: Caller | None, q: Mapping[str, list[str]],
               body: Any) -> tuple[str, Any]:
        checks = dict(self.readiness())
        return ("ready", checks)

    def _audit(self, caller: Caller, q: Mapping[str, list[str]], body: Any) -> Any:
        assert self.api is not None
        after, limit = _int(q, "after", 0), _int(q, "limit", 500)
        if (q.get("format") or ["json"])[0] == "atna":
            return ("xml", self.api.audit_atna(caller, after, limit))
        kinds = q.get("kind")
        kind = kinds[0] if kinds else None
        return self.api.audit_records(caller, after, limit, kind)

    def authenticate(self, header: str | None, address: str) -> Caller | None:
        if not header or not header.startswith("Bearer "):
            return None
        presented = header[7:].strip().encode()
        found: Caller | None = None
        for token in self.tokens:  # compare with every token: no early exit to time
            if hmac.compare_digest(token.token.encode(), presented):
                found = Caller(token.name, token.role, address)
        return found

    def _handler_class(self) -> type[BaseHTTPRequestHandler]:
        web = self
        security_headers = dict(_SECURITY_HEADERS)
        if self.settings.tls is not None:
            security_headers["Strict-Transport-Security"] = "max-age=31536000"

        class Handler(BaseHTTPRequestHandler):
            server_version = "dicomnode"
            sys_version = ""
            protocol_version = "HTTP/1.1"
            timeout = 30  # a client that stops sending mid-request loses its thread

            def log_request(self, code: int | str = "-", size: int | str = "-") -> None:
                log.debug("%s %s %s", self.command, urlsplit(self.path).path, code)

            def log_message(self, format: str, *args: Any) -> None:
                log.debug("http: " + format, *args)

            def do_GET(self) -> None:
                self._dispatch("GET")

            def do_POST(self) -> None:
                self._dispatch("POST")

            def do_HEAD(self) -> None:
                self._dispatch("GET", head=True)

            def _send(self, status: int, body: bytes, ctype: str,
                      extra: Mapping[str, str] | None = None, head: bool = False) -> None:
                self.send_response(status)
                self.send_header("Content-Type", ctype)
                self.send_header("Content-Length", str(len(body)))
                for k, v in {**security_headers, **(extra or {})}.items():
                    self.send_header(k, v)
                self.end_headers()
                if not head:
                    self.wfile.write(body)

            def _json(self, status: int, data: Any, head: bool = False,
                      extra: Mapping[str, str] | None = None) -> None:
                self._send(status, json.dumps(data, default=str).encode(),
                           "application/json", extra, head)

            def _dispatch(self, method: str, head: bool = False) -> None:
                url = urlsplit(self.path)
                path = url.path
                if method == "GET" and path in _STATIC and web.api is not None:
                    name, ctype = _STATIC[path]
                    data = resources.files("dicomnode.web").joinpath("static", name)
                    self._send(200, data.read_bytes(), ctype, head=head)
                    return
                route, match = None, None
                allowed = False
                for candidate in web.routes:
                    m = candidate.pattern.match(path)
                    if m is not None:
                        allowed = True
                        if candidate.method == method:
                            route, match = candidate, m
                            break
                if route is None or match is None:
                    self._json(405 if allowed else 404,
                               {"error": "method not allowed" if allowed else "not found"},
                               head)
                    return
                address = str(self.client_address[0])
                caller: Caller | None = None
                if route.permission is not None:
                    caller = web.authenticate(self.headers.get("Authorization"), address)
                    if caller is None:
                        web.audit.append("web-auth", MINOR_FAILURE, address=address,
                                         why="missing or unknown bearer token",
                                         path=path[:100])
                        self._json(401, {"error": "a bearer token is required"}, head,
                                   {"WWW-Authenticate": 'Bearer realm="dicomnode"'})
                        return
                    if not caller.may(route.permission):
                        self._json(403, {"error": f"role {caller.role!r} may not do this"},
                                   head)
                        return
                body: Any = None
                if method == "POST":
                    length = int(self.headers.get("Content-Length") or 0)
                    if length > MAX_BODY:
                        self._json(413, {"error": "request body too large"})
                        self.close_connection = True
                        return
                    raw = self.rfile.read(length) if length else b""
                    try:
                        body = json.loads(raw) if raw else {}
                    except json.JSONDecodeError:
                        self._json(400, {"error": "body is not JSON"})
                        return
                    if not isinstance(body, dict):
                        self._json(400, {"error": "body must be a JSON object"})
                        return
                try:
                    result = route.handler(caller, parse_qs(url.query), body,
                                           **match.groupdict())
                except ApiError as exc:
                    self._json(exc.status, {"error": exc.message}, head)
                    return
                except Exception:
                    log.exception("web: %s %s failed", method, path)
                    self._json(500, {"error": "internal error; see the node's log"}, head)
                    return
                if isinstance(result, tuple):
                    kind, payload = result
                    if kind == "text":
                        self._send(200, payload.encode(), "text/plain; charset=utf-8",
                                   head=head)
                    elif kind == "metrics":
                        self._send(200, payload, METRICS_TYPE, head=head)
                    elif kind == "xml":
                        self._send(200, payload, "application/xml; charset=utf-8", head=head)
                    else:  # ready
                        ok = all(payload.values())
                        self._json(200 if ok else 503,
                                   {"ready": ok, "checks": payload}, head)
                    return
                self._json(200, result, head)

        return Handler


class _HTTPServer(ThreadingHTTPServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        # socketserver prints a traceback to stderr; a dropped client is not news
        log.debug("http: request from a client failed", exc_info=True)


class _TlsHTTPServer(_HTTPServer):
    """HTTPS with the handshake on the request's own thread (a client that connects and
    says nothing holds one thread until the timeout, never the accept loop)."""

    HANDSHAKE_TIMEOUT_S = 10.0

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler],
                 context: ssl.SSLContext) -> None:
        self.context = context
        super().__init__(address, handler)

    def get_request(self) -> tuple[Any, Any]:
        sock, address = super().get_request()
        return self.context.wrap_socket(sock, server_side=True,
                                        do_handshake_on_connect=False), address

    def finish_request(self, request: Any, client_address: Any) -> None:
        try:
            request.settimeout(self.HANDSHAKE_TIMEOUT_S)
            request.do_handshake()
        except (OSError, ssl.SSLError) as exc:
            log.info("https: TLS handshake refused or failed: %s", type(exc).__name__)
            return
        super().finish_request(request, client_address)


def _int(q: Mapping[str, list[str]], name: str, default: int) -> int:
    values = q.get(name)
    if not values:
        return default
    try:
        return max(0, int(values[0]))
    except ValueError:
        raise ApiError(400, f"{name} must be a whole number") from None
