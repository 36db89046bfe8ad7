"""Typed settings loaded from YAML.

Every validation problem is reported with the file and the dotted key it concerns, all
at once, so an administrator fixes a config in one pass instead of one error per start.
Relative paths are resolved against the current working directory (as Orthanc and
dcmtk do), which is the repository root for the README's commands.
"""

from __future__ import annotations

import hmac
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from dicomnode.routing.rules import Condition, RuleError, parse_conditions

_AE_RE = re.compile(r"^[\x20-\x5b\x5d-\x7e]{1,16}$")  # PS3.5 AE VR: no backslash, no controls

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "node.yaml"


class ConfigError(Exception):
    """One or more problems in a configuration file; ``problems`` lists each as 'file: key: why'."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("\n".join(problems))


@dataclass(frozen=True)
class NodeSettings:
    ae_title: str = "DICOMNODE"
    host: str = "0.0.0.0"
    port: int = 11112
    storage: Path = Path("./var")
    # where received and result objects live (objects/, results/, tmp/); default: storage.
    # A shared filesystem here lets any worker read what any receiver stored.
    spool: Path | None = None
    max_pdu_size: int = 262144
    max_associations: int = 16
    network_timeout_s: float = 60.0
    max_instance_bytes: int = 4 * 1024**3
    # A connection must finish its TLS handshake and its A-ASSOCIATE-RQ within this.
    associate_timeout_s: float = 10.0
    # Once a PDU has begun, all of it must arrive within this.
    pdu_timeout_s: float = 10.0
    # Connections that have not yet associated, from hosts not on the allow-list.
    max_pending_connections: int = 32
    max_pending_per_address: int = 4


@dataclass(frozen=True)
class CallerRule:
    """A peer allowed to store: its AE title and its address (IP, CIDR network or hostname)."""

    ae_title: str
    host: str

    def allows(self, ae_title: str, address: str) -> bool:
        if ae_title.strip() != self.ae_title:
            return False
        try:
            net = ipaddress.ip_network(self.host, strict=False)
        except ValueError:
            return address == self.host
        try:
            return ipaddress.ip_address(address) in net
        except ValueError:
            return False


@dataclass(frozen=True)
class TlsSettings:
    """DICOM TLS (PS3.15 B.9, BCP 195) for the listener and for outgoing associations."""

    cert: Path
    key: Path
    ca: Path | None = None
    require_client_cert: bool = False
    destinations: tuple[str, ...] = ()  # outgoing associations to these use TLS
    check_hostname: bool = True


@dataclass(frozen=True)
class IdentityRule:
    """Credentials one caller must present in its User Identity Negotiation item."""

    ae_title: str
    username: str
    password: str | None = field(default=None, repr=False)  # None: username alone


@dataclass(frozen=True)
class UserIdentitySettings:
    required: bool = True
    users: tuple[IdentityRule, ...] = ()

    def verify(self, calling_ae: str, id_type: int | None, primary: bytes,
               secondary: bytes) -> bool:
        """Whether a presented identity (PS3.7 D.3.3.7) is one configured for the caller.

        Only types 1 (username) and 2 (username and passcode) exist here; a username-only
        rule accepts type 1 or 2, a rule with a password accepts only a matching type 2.
        """
        for rule in self.users:
            if rule.ae_title != calling_ae.strip():
                continue
            if not hmac.compare_digest(rule.username.encode(), bytes(primary)):
                continue
            if rule.password is None:
                return id_type in (1, 2)
            if id_type == 2 and hmac.compare_digest(rule.password.encode(), bytes(secondary)):
                return True
        return False


@dataclass(frozen=True)
class SecuritySettings:
    allowed_callers: tuple[CallerRule, ...] = ()
    allow_any_caller: bool = False
    tls: TlsSettings | None = None
    user_identity: UserIdentitySettings | None = None

    def caller_allowed(self, ae_title: str, address: str) -> bool:
        if self.allow_any_caller:
            return True
        return any(rule.allows(ae_title, address) for rule in self.allowed_callers)

    def host_allowed(self, address: str) -> bool:
        """Whether some allowed caller connects from ``address``, whatever its AE title.

        Known at TCP accept, before any AE title is; it decides which pool of pending
        connections a newcomer joins, so floods from elsewhere cannot crowd it out.
        """
        if self.allow_any_caller:
            return True
        return any(rule.allows(rule.ae_title, address) for rule in self.allowed_callers)


@dataclass(frozen=True)
class CompletionSettings:
    series_quiet_s: float = 10.0
    study_quiet_s: float = 30.0
    sweep_interval_s: float = 1.0


@dataclass(frozen=True)
class Destination:
    name: str
    ae_title: str
    host: str
    port: int


@dataclass(frozen=True)
class Route:
    name: str
    conditions: tuple[Condition, ...]
    pipeline: str
    send_to: tuple[str, ...]
    level: str = "series"
    options: Mapping[str, Any] = field(default_factory=dict)


JOB_ENGINES = ("in-process", "celery")


@dataclass(frozen=True)
class JobSettings:
    """``engine: in-process`` (default) runs jobs on threads of ``serve``; ``celery``
    hands each job to a Celery ``broker`` (redis:// or amqp://) for ``dicomnode worker``
    processes, on this machine or others, sharing the ledger and the spool."""

    workers: int = 1
    timeout_s: float = 600.0
    max_attempts: int = 3
    engine: str = "in-process"
    broker: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class LedgerSettings:
    """``url`` unset: the embedded SQLite ledger in the storage folder; a SQLAlchemy URL
    (``postgresql+psycopg://user@host/db``) for a ledger several machines share."""

    url: str | None = field(default=None, repr=False)


@dataclass(frozen=True)
class OutboxSettings:
    max_attempts: int = 12
    backoff_initial_s: float = 2.0
    backoff_max_s: float = 300.0
    interval_s: float = 1.0
    timeout_s: float = 30.0


_CLOCK_RE = re.compile(r"^([01]\d|2[0-3]):([0-5]\d)$")


@dataclass(frozen=True)
class QuerySettings:
    """Priors from the query source: what is relevant, when and how fast to fetch it.

    ``off_peak`` is a daily window ("HH:MM-HH:MM", may wrap midnight, node local time)
    outside which the nightly job moves nothing; ``max_moves_per_minute`` caps C-MOVEs
    per PACS; ``send_to`` receives growth results (default: the query source).
    ``retrieve`` is how priors come to the node (:data:`RETRIEVE_MODES`): C-MOVE to the
    node, C-GET on the query association, or C-MOVE with C-GET when the move is refused.
    """

    source: str | None = None
    lookback_days: int = 1825
    modalities: tuple[str, ...] = ("MR",)
    body_parts: tuple[str, ...] = ("BRAIN", "HEAD")
    nightly: str | None = "02:00"
    off_peak: str | None = None
    max_moves_per_minute: int = 10
    timeout_s: float = 30.0
    total_timeout_s: float = 300.0
    send_to: tuple[str, ...] = ()
    reanalyse_images: bool = True
    retrieve: str = "move-then-get"


RETRIEVE_MODES = ("move", "get", "move-then-get")


WEB_ROLES = ("viewer", "operator", "clinical")


@dataclass(frozen=True)
class WebToken:
    """One bearer token for the status page and API, and the role it grants.

    Roles: ``viewer`` reads (hashed identifiers only); ``operator`` may also retry dead
    letters and failed jobs; ``clinical`` may also see patient identifiers.
    """

    name: str
    token: str = field(repr=False)
    role: str = "viewer"


@dataclass(frozen=True)
class WebSettings:
    """The HTTP status page, REST API and /metrics served beside the DICOM listener.

    Off unless configured; a non-loopback ``host`` needs ``allow_remote: true``. With no
    token configured, one is generated into ``<storage>/web-token`` (mode 0600).
    """

    enabled: bool = False
    host: str = "127.0.0.1"
    port: int = 8480
    allow_remote: bool = False
    tokens: tuple[WebToken, ...] = ()
    worker_port: int | None = None
    tls: TlsSettings | None = None  # HTTPS (and, with require_client_cert, client certs)

    @property
    def worker_listen_port(self) -> int:
        """Where ``dicomnode worker`` serves its own /metrics: ``worker_port``, else the
        port after ``port`` (so a worker beside a receiver does not collide with it)."""
        if self.worker_port is not None:
            return self.worker_port
        return self.port + 1 if 0 < self.port < 65535 else 0


SYSLOG_SCHEMES = {"udp": 514, "tcp": 514, "tls": 6514}  # with each one's default port


@dataclass(frozen=True)
class SyslogSettings:
    """Where audit records are also sent, as DICOM audit messages in RFC 5424 syslog
    messages (IHE ITI-20 Record Audit Event): ``udp://host:514`` (RFC 5426),
    ``tcp://host:514`` (RFC 6587 octet counting) or ``tls://host:6514`` (RFC 5425). For
    TLS, ``ca`` verifies the repository (the system store if absent) and ``cert``/``key``
    are the node's client certificate (ATNA's mutual node authentication)."""

    url: str
    scheme: str
    host: str
    port: int
    ca: Path | None = None
    cert: Path | None = None
    key: Path | None = None
    check_hostname: bool = True
    max_queued: int = 10000  # records read from the audit file at once (one batch)
    timeout_s: float = 5.0


@dataclass(frozen=True)
class AuditSettings:
    """The audit trail: always ``<node.storage>/audit.sqlite3``; ``syslog`` optionally
    forwards each record to an Audit Record Repository as well."""

    syslog: SyslogSettings | None = None


@dataclass(frozen=True)
class Settings:
    node: NodeSettings
    security: SecuritySettings
    completion: CompletionSettings
    destinations: Mapping[str, Destination]
    routes: tuple[Route, ...]
    jobs: JobSettings
    outbox: OutboxSettings
    query_source: str | None
    models_dir: Path
    log_level: str = "INFO"
    source: Path | None = None
    pipelines: Mapping[str, str] = field(default_factory=dict)
    query: QuerySettings = field(default_factory=QuerySettings)
    web: WebSettings = field(default_factory=WebSettings)
    ledger: LedgerSettings = field(default_factory=LedgerSettings)
    audit: AuditSettings = field(default_factory=AuditSettings)

    @property
    def spool_dir(self) -> Path:
        return self.node.storage

    @property
    def spool_root(self) -> Path:
        """Where the spool's objects live: ``node.spool``, else the storage folder."""
        return self.node.spool or self.node.storage


class _Reader:
    """Collects problems while reading a YAML mapping so all are reported together."""

    def __init__(self, file: str) -> None:
        self.file = file
        self.problems: list[str] = []

    def problem(self, key: str, why: str) -> None:
        self.problems.append(f"{self.file}: {key}: {why}")

    def mapping(self, data: Any, key: str) -> dict[str, Any]:
        if data is None:
            return {}
        if not isinstance(data, dict):
            self.problem(key, f"expected a mapping, got {type(data).__name__}")
            return {}
        return data

    def unknown(self, data: Mapping[str, Any], key: str, known: set[str]) -> None:
        for name in data:
            if name not in known:
                self.problem(f"{key}.{name}" if key else str(name), "unknown key")

    def number(self, data: Mapping[str, Any], key: str, name: str, default: float,
               *, minimum: float = 0.0, integer: bool = False) -> Any:
        value = data.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float):
            self.problem(f"{key}.{name}", f"expected a number, got {value!r}")
            return default
        if integer and not isinstance(value, int):
            self.problem(f"{key}.{name}", f"expected an integer, got {value!r}")
            return default
        if value < minimum:
            self.problem(f"{key}.{name}", f"must be >= {minimum}, got {value!r}")
            return default
        return value

    def ae_title(self, value: Any, key: str) -> str:
        if not isinstance(value, str) or not _AE_RE.match(value) or not value.strip():
            self.problem(key, "not a valid AE title (1-16 printable characters, no '\\'): "
                              f"{value!r}")
            return "INVALID"
        return value.strip()

    def port(self, value: Any, key: str) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
            self.problem(key, f"not a TCP port: {value!r}")
            return 0
        return value

    def existing_file(self, data: Mapping[str, Any], key: str, name: str) -> Path | None:
        """An optional path to a file that must exist (a PEM file); None when not given
        or unusable (the problem is recorded)."""
        value = data.get(name)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            self.problem(f"{key}.{name}", f"expected a file path, got {value!r}")
            return None
        path = Path(value)
        if not path.is_file():
            self.problem(f"{key}.{name}", f"no such file: {path}")
        return path

    def string(self, data: Mapping[str, Any], key: str, name: str, default: str) -> str:
        value = data.get(name, default)
        if not isinstance(value, str) or not value:
            self.problem(f"{key}.{name}", f"expected a non-empty string, got {value!r}")
            return default
        return value


def _parse_tls(r: _Reader, data: Any, where: str = "security.tls") -> TlsSettings | None:
    if data is None:
        return None
    t = r.mapping(data, where)
    allowed = {"cert", "key", "ca", "require_client_cert", "destinations", "check_hostname"}
    if where != "security.tls":  # a listener only: no outgoing destinations
        allowed -= {"destinations", "check_hostname"}
    r.unknown(t, where, allowed)
    paths = {name: r.existing_file(t, where, name) for name in ("cert", "key", "ca")}
    for name in ("cert", "key"):
        if t.get(name) is None:
            r.problem(f"{where}.{name}", "missing (a PEM file)")
    flags: dict[str, bool] = {}
    for name, default in (("require_client_cert", False), ("check_hostname", True)):
        value = t.get(name, default)
        if not isinstance(value, bool):
            r.problem(f"{where}.{name}", f"expected true or false, got {value!r}")
            value = default
        flags[name] = value
    if flags["require_client_cert"] and paths["ca"] is None:
        r.problem(f"{where}.require_client_cert",
                  f"needs {where}.ca, the CA that signs the callers' certificates")
    dests = t.get("destinations", [])
    if not isinstance(dests, list) or not all(isinstance(d, str) for d in dests):
        r.problem(f"{where}.destinations", "expected a list of destination names")
        dests = []
    if paths["cert"] is None or paths["key"] is None:
        return None
    return TlsSettings(paths["cert"], paths["key"], paths["ca"], flags["require_client_cert"],
                       tuple(dests), flags["check_hostname"])


def _parse_user_identity(r: _Reader, data: Any) -> UserIdentitySettings | None:
    if data is None:
        return None
    key = "security.user_identity"
    u = r.mapping(data, key)
    r.unknown(u, key, {"required", "users"})
    required = u.get("required", True)
    if not isinstance(required, bool):
        r.problem(f"{key}.required", f"expected true or false, got {required!r}")
        required = True
    raw = u.get("users", [])
    if not isinstance(raw, list):
        r.problem(f"{key}.users", "expected a list of {ae_title, username, password}")
        raw = []
    users: list[IdentityRule] = []
    for i, item in enumerate(raw):
        ikey = f"{key}.users[{i}]"
        item = r.mapping(item, ikey)
        r.unknown(item, ikey, {"ae_title", "username", "password", "password_env"})
        username = item.get("username")
        if not isinstance(username, str) or not username:
            r.problem(f"{ikey}.username", "missing or not a string")
            continue
        password = item.get("password")
        env = item.get("password_env")
        if password is not None and env is not None:
            r.problem(ikey, "give password or password_env, not both")
        if env is not None:
            if not isinstance(env, str) or env not in os.environ:
                r.problem(f"{ikey}.password_env", f"environment variable {env!r} is not set")
            else:
                password = os.environ[env]
        if password is not None and (not isinstance(password, str) or not password):
            r.problem(f"{ikey}.password", "expected a non-empty string")
            password = None
        users.append(IdentityRule(r.ae_title(item.get("ae_title"), f"{ikey}.ae_title"),
                                  username, password))
    if required and not users:
        r.problem(f"{key}.users", "required is true but no users are listed: nobody could "
                                  "associate")
    return UserIdentitySettings(required, tuple(users))


def _clock_window(r: _Reader, key: str, value: Any, *, window: bool) -> str | None:
    if value is None:
        return None
    text = value if isinstance(value, str) else ""
    parts = text.split("-") if window else [text]
    if len(parts) != (2 if window else 1) or not all(_CLOCK_RE.match(p.strip()) for p in parts):
        shape = '"HH:MM-HH:MM"' if window else '"HH:MM"'
        r.problem(key, f"expected {shape} (24-hour clock) or null, got {value!r}")
        return None
    if window and parts[0].strip() == parts[1].strip():
        r.problem(key, "start and end are the same; leave it out to allow any time")
        return None
    return "-".join(p.strip() for p in parts)


def _parse_query(r: _Reader, q: Mapping[str, Any],
                 destinations: Mapping[str, Destination]) -> QuerySettings:
    r.unknown(q, "query", {"source", "lookback_days", "modalities", "body_parts", "nightly",
                           "off_peak", "max_moves_per_minute", "timeout_s", "total_timeout_s",
                           "send_to", "reanalyse_images", "retrieve"})
    retrieve = q.get("retrieve", "move-then-get")
    if retrieve not in RETRIEVE_MODES:
        r.problem("query.retrieve", f"expected one of {', '.join(RETRIEVE_MODES)}, "
                                    f"got {retrieve!r}")
        retrieve = "move-then-get"
    reanalyse = q.get("reanalyse_images", True)
    if not isinstance(reanalyse, bool):
        r.problem("query.reanalyse_images", f"expected true or false, got {reanalyse!r}")
        reanalyse = True
    source = q.get("source")
    if source is not None and source not in destinations:
        r.problem("query.source", f"unknown destination {source!r}")
    lists: dict[str, tuple[str, ...]] = {}
    for name, default in (("modalities", ("MR",)), ("body_parts", ("BRAIN", "HEAD")),
                          ("send_to", (str(source),) if source else ())):
        value = q.get(name, list(default))
        if isinstance(value, str):
            value = [value]
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            r.problem(f"query.{name}", f"expected a list of names, got {value!r}")
            value = list(default)
        lists[name] = tuple(str(v) for v in value)
    for dest in lists["send_to"]:
        if dest not in destinations:
            r.problem("query.send_to", f"unknown destination {dest!r}")
    nightly = _clock_window(r, "query.nightly", q.get("nightly", "02:00"), window=False)
    off_peak = _clock_window(r, "query.off_peak", q.get("off_peak"), window=True)
    if nightly is not None and off_peak is not None:
        start, end = off_peak.split("-")
        inside = start <= nightly < end if start < end else (nightly >= start or nightly < end)
        if not inside:
            r.problem("query.nightly", f"{nightly} lies outside query.off_peak ({off_peak}): "
                                       "the nightly job would never move anything")
    timeout = float(r.number(q, "query", "timeout_s", 30.0, minimum=0.1))
    total = float(r.number(q, "query", "total_timeout_s", 300.0, minimum=0.1))
    return QuerySettings(
        source=str(source) if source is not None else None,
        lookback_days=r.number(q, "query", "lookback_days", 1825, minimum=1, integer=True),
        modalities=tuple(m.upper() for m in lists["modalities"]),
        body_parts=tuple(b.upper() for b in lists["body_parts"]),
        nightly=nightly,
        off_peak=off_peak,
        max_moves_per_minute=r.number(q, "query", "max_moves_per_minute", 10, minimum=1,
                                      integer=True),
        timeout_s=timeout,
        total_timeout_s=total,
        send_to=lists["send_to"],
        reanalyse_images=reanalyse,
        retrieve=str(retrieve),
    )


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _parse_web(r: _Reader, data: Any) -> WebSettings:
    if data is None:
        return WebSettings()
    w = r.mapping(data, "web")
    r.unknown(w, "web", {"enabled", "host", "port", "allow_remote", "tokens", "worker_port",
                         "tls"})
    flags: dict[str, bool] = {}
    for name, default in (("enabled", True), ("allow_remote", False)):
        value = w.get(name, default)
        if not isinstance(value, bool):
            r.problem(f"web.{name}", f"expected true or false, got {value!r}")
            value = default
        flags[name] = value
    host = r.string(w, "web", "host", "127.0.0.1")
    port = r.port(w.get("port", 8480), "web.port")
    worker_port = r.port(w["worker_port"], "web.worker_port") if "worker_port" in w else None
    if flags["enabled"] and not flags["allow_remote"] and not _is_loopback(host):
        r.problem("web.host", f"{host!r} is not a loopback address: the status page shows "
                              "what the node received; say allow_remote: true to serve it "
                              "on the network (with web.tls)")
    raw = w.get("tokens", [])
    if not isinstance(raw, list):
        r.problem("web.tokens", "expected a list of {name, token | token_env, role}")
        raw = []
    tokens: list[WebToken] = []
    for i, item in enumerate(raw):
        key = f"web.tokens[{i}]"
        item = r.mapping(item, key)
        r.unknown(item, key, {"name", "token", "token_env", "role"})
        name = item.get("name", f"token-{i}")
        role = item.get("role", "viewer")
        if role not in WEB_ROLES:
            r.problem(f"{key}.role", f"must be one of {', '.join(WEB_ROLES)}, got {role!r}")
            role = "viewer"
        token = item.get("token")
        env = item.get("token_env")
        if (token is None) == (env is None):
            r.problem(key, "give token or token_env (exactly one)")
            continue
        if env is not None:
            if not isinstance(env, str) or not os.environ.get(env):
                r.problem(f"{key}.token_env", f"environment variable {env!r} is not set")
                continue
            token = os.environ[env]
        if not isinstance(token, str) or len(token) < 16:
            r.problem(f"{key}.token", "expected a string of at least 16 characters")
            continue
        tokens.append(WebToken(str(name), token, str(role)))
    tls = _parse_tls(r, w.get("tls"), "web.tls")
    return WebSettings(flags["enabled"], host, port, flags["allow_remote"], tuple(tokens),
                       worker_port, tls)


def _parse_syslog(r: _Reader, data: Any) -> SyslogSettings | None:
    if data is None:
        return None
    key = "audit.syslog"
    y = r.mapping(data, key)
    r.unknown(y, key, {"url", "ca", "cert", "key", "check_hostname", "max_queued",
                       "timeout_s"})
    url = r.string(y, key, "url", "")
    match = re.match(r"^(udp|tcp|tls)://(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+)(?::(\d{1,5}))?/?$", url)
    if match is None:
        r.problem(f"{key}.url", "expected udp://host:port, tcp://host:port or "
                                f"tls://host:port, got {url!r}")
        return None
    scheme, host = match[1], match[2].strip("[]")
    port = int(match[3]) if match[3] else SYSLOG_SCHEMES[scheme]
    if not 0 < port < 65536:
        r.problem(f"{key}.url", f"not a port: {port}")
    paths = {name: r.existing_file(y, key, name) for name in ("ca", "cert", "key")}
    for name in ("ca", "cert", "key"):
        if y.get(name) is not None and scheme != "tls":
            r.problem(f"{key}.{name}", f"only for tls:// (the url is {scheme}://)")
    if (paths["cert"] is None) != (paths["key"] is None):
        r.problem(f"{key}.cert", "give cert and key together (the node's client certificate)")
    check = y.get("check_hostname", True)
    if not isinstance(check, bool):
        r.problem(f"{key}.check_hostname", f"expected true or false, got {check!r}")
        check = True
    return SyslogSettings(
        url=url, scheme=scheme, host=host, port=port, ca=paths["ca"], cert=paths["cert"],
        key=paths["key"], check_hostname=check,
        max_queued=r.number(y, key, "max_queued", 10000, minimum=1, integer=True),
        timeout_s=float(r.number(y, key, "timeout_s", 5.0, minimum=0.1)))


def load_settings(path: Path) -> Settings:
    """Read and validate a config file; raise ConfigError listing every problem."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read: {exc.strerror or exc}"]) from exc
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError([f"{path}: not valid YAML: {exc}"]) from exc
    return parse_settings(data, source=path)


def parse_settings(data: Any, *, source: Path | None = None) -> Settings:
    r = _Reader(str(source) if source else "<config>")
    top = r.mapping(data, "(top level)")
    r.unknown(top, "", {"node", "security", "completion", "destinations", "routes", "query",
                        "models", "jobs", "outbox", "logging", "pipelines", "web",
                        "ledger", "audit"})

    plugins: dict[str, str] = {}
    for plugin, target in r.mapping(top.get("pipelines"), "pipelines").items():
        if not isinstance(target, str) or not re.match(r"^[\w.]+:[\w.]+$", target):
            r.problem(f"pipelines.{plugin}",
                      f"expected 'package.module:attribute', got {target!r}")
            continue
        plugins[str(plugin)] = target

    n = r.mapping(top.get("node"), "node")
    r.unknown(n, "node", {"ae_title", "host", "port", "storage", "spool", "max_pdu_size",
                          "max_associations", "network_timeout_s", "max_instance_bytes",
                          "associate_timeout_s", "pdu_timeout_s", "max_pending_connections",
                          "max_pending_per_address"})
    node = NodeSettings(
        ae_title=r.ae_title(n.get("ae_title", "DICOMNODE"), "node.ae_title"),
        host=r.string(n, "node", "host", "0.0.0.0"),
        port=r.port(n.get("port", 11112), "node.port"),
        storage=Path(r.string(n, "node", "storage", "./var")),
        spool=Path(r.string(n, "node", "spool", "")) if n.get("spool") else None,
        max_pdu_size=r.number(n, "node", "max_pdu_size", 262144, minimum=4096, integer=True),
        max_associations=r.number(n, "node", "max_associations", 16, minimum=1, integer=True),
        network_timeout_s=float(r.number(n, "node", "network_timeout_s", 60.0, minimum=1)),
        max_instance_bytes=r.number(n, "node", "max_instance_bytes", 4 * 1024**3,
                                    minimum=1024, integer=True),
        associate_timeout_s=float(r.number(n, "node", "associate_timeout_s", 10.0,
                                           minimum=0.1)),
        pdu_timeout_s=float(r.number(n, "node", "pdu_timeout_s", 10.0, minimum=0.1)),
        max_pending_connections=r.number(n, "node", "max_pending_connections", 32, minimum=1,
                                         integer=True),
        max_pending_per_address=r.number(n, "node", "max_pending_per_address", 4, minimum=1,
                                         integer=True),
    )

    s = r.mapping(top.get("security"), "security")
    r.unknown(s, "security", {"allowed_callers", "allow_any_caller", "tls", "user_identity"})
    callers: list[CallerRule] = []
    raw_callers = s.get("allowed_callers", [])
    if not isinstance(raw_callers, list):
        r.problem("security.allowed_callers", "expected a list of {ae_title, host}")
        raw_callers = []
    for i, item in enumerate(raw_callers):
        key = f"security.allowed_callers[{i}]"
        item = r.mapping(item, key)
        r.unknown(item, key, {"ae_title", "host"})
        if "ae_title" not in item or "host" not in item:
            r.problem(key, "needs both ae_title and host")
            continue
        host = str(item["host"])
        callers.append(CallerRule(r.ae_title(item["ae_title"], f"{key}.ae_title"), host))
    allow_any = s.get("allow_any_caller", False)
    if not isinstance(allow_any, bool):
        r.problem("security.allow_any_caller", f"expected true or false, got {allow_any!r}")
        allow_any = False
    tls = _parse_tls(r, s.get("tls"))
    identity = _parse_user_identity(r, s.get("user_identity"))
    security = SecuritySettings(tuple(callers), allow_any, tls, identity)

    c = r.mapping(top.get("completion"), "completion")
    r.unknown(c, "completion", {"series_quiet_s", "study_quiet_s", "sweep_interval_s"})
    completion = CompletionSettings(
        series_quiet_s=float(r.number(c, "completion", "series_quiet_s", 10.0)),
        study_quiet_s=float(r.number(c, "completion", "study_quiet_s", 30.0)),
        sweep_interval_s=float(r.number(c, "completion", "sweep_interval_s", 1.0, minimum=0.05)),
    )

    destinations: dict[str, Destination] = {}
    d = r.mapping(top.get("destinations"), "destinations")
    for dest_name, item in d.items():
        key = f"destinations.{dest_name}"
        item = r.mapping(item, key)
        r.unknown(item, key, {"ae_title", "host", "port"})
        for required in ("ae_title", "host", "port"):
            if required not in item:
                r.problem(f"{key}.{required}", "missing")
        destinations[str(dest_name)] = Destination(
            name=str(dest_name),
            ae_title=r.ae_title(item.get("ae_title", "X"), f"{key}.ae_title"),
            host=str(item.get("host", "")),
            port=r.port(item.get("port", 0), f"{key}.port"),
        )

    routes: list[Route] = []
    raw_routes = top.get("routes", [])
    if raw_routes is None:
        raw_routes = []
    if not isinstance(raw_routes, list):
        r.problem("routes", "expected a list of routes")
        raw_routes = []
    seen: set[str] = set()
    for i, item in enumerate(raw_routes):
        key = f"routes[{i}]"
        item = r.mapping(item, key)
        r.unknown(item, key, {"name", "match", "pipeline", "send_to", "level", "options"})
        name = item.get("name")
        if not isinstance(name, str) or not name:
            r.problem(f"{key}.name", "missing or not a string")
            name = f"route-{i}"
        elif name in seen:
            r.problem(f"{key}.name", f"duplicate route name {name!r}")
        seen.add(name)
        key = f"routes[{i}] ({name})"
        try:
            conditions = parse_conditions(item.get("match"))
        except RuleError as exc:
            for why in exc.problems:
                r.problems.append(f"{r.file}: {key}.match.{why}")
            conditions = ()
        pipeline = item.get("pipeline")
        if not isinstance(pipeline, str) or not pipeline:
            r.problem(f"{key}.pipeline", "missing")
            pipeline = ""
        else:
            from dicomnode.pipelines.registry import known_pipelines

            known = known_pipelines(plugins)
            if pipeline not in known:
                r.problem(f"{key}.pipeline",
                          f"unknown pipeline {pipeline!r}; known: {', '.join(known)}")
        send_to = item.get("send_to", [])
        if isinstance(send_to, str):
            send_to = [send_to]
        if not isinstance(send_to, list):
            r.problem(f"{key}.send_to", "expected a list of destination names")
            send_to = []
        for dest in send_to:
            if dest not in destinations:
                r.problem(f"{key}.send_to", f"unknown destination {dest!r}")
        level = item.get("level", "series")
        if level not in ("series", "study"):
            r.problem(f"{key}.level", f"must be 'series' or 'study', got {level!r}")
            level = "series"
        options = r.mapping(item.get("options"), f"{key}.options")
        routes.append(Route(name, conditions, pipeline, tuple(str(x) for x in send_to),
                            level, options))

    if tls is not None:
        for name in tls.destinations:
            if name not in destinations:
                r.problem("security.tls.destinations", f"unknown destination {name!r}")

    q = r.mapping(top.get("query"), "query")
    query = _parse_query(r, q, destinations)
    query_source = query.source

    m = r.mapping(top.get("models"), "models")
    r.unknown(m, "models", {"dir"})
    models_dir = Path(r.string(m, "models", "dir", "./models"))

    j = r.mapping(top.get("jobs"), "jobs")
    r.unknown(j, "jobs", {"workers", "timeout_s", "max_attempts", "engine", "broker"})
    engine = r.string(j, "jobs", "engine", "in-process")
    if engine not in JOB_ENGINES:
        r.problem("jobs.engine", f"must be one of {', '.join(JOB_ENGINES)}, got {engine!r}")
    broker = r.string(j, "jobs", "broker", "") or None if "broker" in j else None
    if engine == "celery" and broker is None:
        r.problem("jobs.broker", "engine celery needs a broker URL (redis://host:port/0 "
                  "or amqp://host)")
    elif broker is not None and not re.match(r"^(redis|rediss|amqp|amqps)://", broker):
        r.problem("jobs.broker", "expected a redis://, rediss://, amqp:// or amqps:// URL")
    jobs = JobSettings(
        workers=r.number(j, "jobs", "workers", 1, minimum=1, integer=True),
        timeout_s=float(r.number(j, "jobs", "timeout_s", 600.0, minimum=1)),
        max_attempts=r.number(j, "jobs", "max_attempts", 3, minimum=1, integer=True),
        engine=engine, broker=broker,
    )

    ld = r.mapping(top.get("ledger"), "ledger")
    r.unknown(ld, "ledger", {"url"})
    ledger_url = r.string(ld, "ledger", "url", "") or None if "url" in ld else None
    if ledger_url is not None:
        ledger_url = _ledger_url(r, ledger_url)

    o = r.mapping(top.get("outbox"), "outbox")
    r.unknown(o, "outbox", {"max_attempts", "backoff_initial_s", "backoff_max_s", "interval_s",
                            "timeout_s"})
    outbox = OutboxSettings(
        max_attempts=r.number(o, "outbox", "max_attempts", 12, minimum=1, integer=True),
        backoff_initial_s=float(r.number(o, "outbox", "backoff_initial_s", 2.0)),
        backoff_max_s=float(r.number(o, "outbox", "backoff_max_s", 300.0)),
        interval_s=float(r.number(o, "outbox", "interval_s", 1.0, minimum=0.05)),
        timeout_s=float(r.number(o, "outbox", "timeout_s", 30.0, minimum=1)),
    )

    lg = r.mapping(top.get("logging"), "logging")
    r.unknown(lg, "logging", {"level"})
    level = str(lg.get("level", "INFO")).upper()
    if level not in ("DEBUG", "INFO", "WARNING", "ERROR"):
        r.problem("logging.level", f"must be DEBUG, INFO, WARNING or ERROR, got {level!r}")
        level = "INFO"

    web = _parse_web(r, top.get("web"))

    au = r.mapping(top.get("audit"), "audit")
    r.unknown(au, "audit", {"syslog"})
    audit = AuditSettings(_parse_syslog(r, au.get("syslog")))

    if r.problems:
        raise ConfigError(r.problems)
    return Settings(node, security, completion, destinations, tuple(routes), jobs, outbox,
                    query_source, models_dir, level, source, plugins, query, web,
                    LedgerSettings(ledger_url), audit)


def _ledger_url(r: _Reader, url: str) -> str | None:
    """A SQLAlchemy URL naming SQLite or PostgreSQL (the problem never repeats a password)."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError

    try:
        parsed = make_url(url)
    except ArgumentError:
        r.problem("ledger.url", "not a database URL (expected e.g. "
                  "postgresql+psycopg://user@host:5432/dicomnode)")
        return None
    backend, driver = parsed.get_backend_name(), parsed.get_driver_name()
    if backend == "sqlite" and parsed.database:
        return url
    if backend == "postgresql" and driver == "psycopg" and parsed.database:
        return url
    r.problem("ledger.url", f"expected postgresql+psycopg://user@host:port/database or "
              f"sqlite:///path, got a {backend}+{driver} URL"
              + ("" if parsed.database else " without a database name"))
    return None

