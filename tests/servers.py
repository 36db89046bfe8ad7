"""Database and broker servers for the scale-out tests: Debian's PostgreSQL, Redis and
RabbitMQ, each started by the test itself in a temporary folder on a free loopback port.

Under CI=true a missing server is a failure, never a skip (``tests.peers.require_tool``).
PostgreSQL refuses to run as root, so as root it runs as the ``postgres`` user that
Debian's package creates (``runuser``).
"""

from __future__ import annotations

import contextlib
import glob
import itertools
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.peers import REPO, free_port, in_ci, node_config, port_open, wait_for


def _missing(message: str) -> None:
    if in_ci():
        pytest.fail(message)
    pytest.skip(message)


def _stop(proc: subprocess.Popen[Any], workdir: Path,
          *more: subprocess.Popen[Any]) -> None:
    """SIGTERM, SIGKILL after 30 s, for the server and then ``more`` (its helpers, in
    order); then remove the server's temporary folder."""
    for p in (proc, *more):
        if p.poll() is None:
            p.terminate()
            try:
                p.wait(30)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait(10)
    shutil.rmtree(workdir, ignore_errors=True)


def _pg_bin(name: str) -> str:
    """A PostgreSQL server program: Debian keeps them off PATH, under one version's bin."""
    found = shutil.which(name) or next(iter(sorted(
        glob.glob(f"/usr/lib/postgresql/*/bin/{name}"), reverse=True)), None)
    if found is None:
        _missing(f"{name} (Debian's postgresql) is not installed "
                 "(run scripts/setup.sh --test, which installs it)")
        raise AssertionError("unreachable")
    return found


@dataclass
class Postgres:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]
    user: str
    _names: Iterator[int]

    def url(self, database: str = "postgres") -> str:
        return f"postgresql+psycopg://{self.user}@127.0.0.1:{self.port}/{database}"

    def create_database(self) -> str:
        """A new empty database; returns its SQLAlchemy URL."""
        import psycopg

        name = f"ledger_{os.getpid()}_{next(self._names)}"
        with psycopg.connect(f"host=127.0.0.1 port={self.port} user={self.user} "
                             "dbname=postgres", autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def stop(self) -> None:
        _stop(self.proc, self.workdir)  # SIGTERM: PostgreSQL's smart shutdown


def _as_server_user(argv: list[str], user: str) -> list[str]:
    return argv if user == pwd.getpwuid(os.getuid()).pw_name else \
        ["runuser", "-u", user, "--", *argv]


def start_postgres(*, fsync: bool = False) -> Postgres:
    """A private PostgreSQL cluster on a free loopback port (``fsync`` off by default:
    the tests check semantics, not the disk)."""
    initdb, postgres = _pg_bin("initdb"), _pg_bin("postgres")
    user = pwd.getpwuid(os.getuid()).pw_name
    if os.getuid() == 0:
        user = "postgres"
        try:
            pwd.getpwnam(user)
        except KeyError:
            _missing("no 'postgres' user to run PostgreSQL as (Debian's postgresql creates it)")
    workdir = Path(tempfile.mkdtemp(prefix="dicomnode-pg-"))
    if os.getuid() == 0:
        entry = pwd.getpwnam(user)
        os.chown(workdir, entry.pw_uid, entry.pw_gid)
    data = workdir / "data"
    subprocess.run(_as_server_user([initdb, "-D", str(data), "-U", user, "--auth=trust",
                                    "-E", "UTF8", "--no-sync"], user),
                   check=True, capture_output=True)
    port = free_port()
    log = open(workdir / "postgres.log", "wb")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen(
        _as_server_user([postgres, "-D", str(data), "-p", str(port), "-k", str(workdir),
                         "-c", "listen_addresses=127.0.0.1",
                         "-c", f"fsync={'on' if fsync else 'off'}",
                         "-c", "max_connections=200", "-c", "shared_buffers=32MB"], user),
        stdout=log, stderr=subprocess.STDOUT)
    server = Postgres(port, workdir, proc, user, itertools.count())
    try:
        wait_for(lambda: proc.poll() is not None or port_open(port), 60, "PostgreSQL to listen")
        if proc.poll() is not None:
            raise RuntimeError("PostgreSQL exited at start: "
                               + (workdir / "postgres.log").read_text(errors="replace")[-2000:])
        import psycopg

        def ready() -> bool:
            try:
                psycopg.connect(f"host=127.0.0.1 port={port} user={user} dbname=postgres").close()
            except psycopg.OperationalError:
                return False
            return True

        wait_for(ready, 60, "PostgreSQL to accept connections")
    except BaseException:
        server.stop()
        raise
    return server


@dataclass
class Redis:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def stop(self) -> None:
        _stop(self.proc, self.workdir)


def start_redis() -> Redis:
    """A private Redis on a free loopback port, nothing persisted."""
    server = shutil.which("redis-server")
    if server is None:
        _missing("redis-server (Debian's redis-server) is not installed "
                 "(run scripts/setup.sh --test, which installs it)")
        raise AssertionError("unreachable")
    workdir = Path(tempfile.mkdtemp(prefix="dicomnode-redis-"))
    port = free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1",
                             "--dir", str(workdir), "--save", "", "--appendonly", "no",
                             "--protected-mode", "yes"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    redis = Redis(port, workdir, proc)
    try:
        wait_for(lambda: proc.poll() is not None or port_open(port), 30, "Redis to listen")
        if proc.poll() is not None:
            raise RuntimeError("redis-server exited at start")
    except BaseException:
        redis.stop()
        raise
    return redis


@dataclass
class RabbitMQ:
    port: int
    workdir: Path
    proc: subprocess.Popen[bytes]
    epmd: subprocess.Popen[bytes]

    @property
    def url(self) -> str:
        return f"amqp://guest:guest@127.0.0.1:{self.port}//"

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace")
                       for p in sorted((self.workdir / "log").glob("*.log")))

    def stop(self) -> None:
        _stop(self.proc, self.workdir, self.epmd)  # the broker first, then its epmd


_RABBITMQ_SERVER = "/usr/lib/rabbitmq/bin/rabbitmq-server"  # Debian's; /usr/sbin's runs su


def start_rabbitmq(*, consumer_timeout_ms: int | None = None,
                   channel_tick_ms: int | None = None) -> RabbitMQ:
    """A private RabbitMQ on a free loopback port: its own node name, Erlang cookie
    (``HOME``), data and log folders, config, and its own ``epmd`` on another free port,
    so it neither meets nor disturbs a RabbitMQ or Erlang node already on the machine.
    Nothing of Debian's ``/etc/rabbitmq`` is read. ``consumer_timeout_ms``: how long a
    consumer may hold a delivery (RabbitMQ's default 30 min), checked every
    ``channel_tick_ms`` (default once a minute)."""
    server = _RABBITMQ_SERVER if os.access(_RABBITMQ_SERVER, os.X_OK) else None
    epmd = shutil.which("epmd")
    if server is None or epmd is None:
        _missing("rabbitmq-server (Debian's rabbitmq-server) is not installed "
                 "(run scripts/setup.sh --test, which installs it)")
        raise AssertionError("unreachable")
    workdir = Path(tempfile.mkdtemp(prefix="dicomnode-rabbitmq-"))
    port, epmd_port, dist_port = free_port(), free_port(), free_port()
    (workdir / "rabbitmq.conf").write_text(
        f"listeners.tcp.default = 127.0.0.1:{port}\n"
        "loopback_users.guest = true\n"  # guest/guest, from loopback only (the default)
        "log.console = false\n"
        "log.file.level = info\n"
        + (f"consumer_timeout = {consumer_timeout_ms}\n" if consumer_timeout_ms else ""))
    if channel_tick_ms is not None:
        (workdir / "advanced.config").write_text(
            f"[{{rabbit, [{{channel_tick_interval, {int(channel_tick_ms)}}}]}}].\n")
    (workdir / "enabled_plugins").write_text("[].\n")
    (workdir / "rabbitmq-env.conf").write_text("")
    cookie = workdir / ".erlang.cookie"
    cookie.write_text(f"dicomnode{os.getpid()}{port}{epmd_port}")
    cookie.chmod(0o400)
    env = {**os.environ, "HOME": str(workdir),
           "ERL_EPMD_PORT": str(epmd_port), "ERL_EPMD_ADDRESS": "127.0.0.1",
           "RABBITMQ_CONF_ENV_FILE": str(workdir / "rabbitmq-env.conf"),
           "RABBITMQ_CONFIG_FILE": str(workdir / "rabbitmq.conf"),
           "RABBITMQ_ADVANCED_CONFIG_FILE": str(workdir / "advanced.config"),
           "RABBITMQ_ENABLED_PLUGINS_FILE": str(workdir / "enabled_plugins"),
           "RABBITMQ_NODENAME": f"dicomnode-test-{os.getpid()}-{port}@localhost",
           "RABBITMQ_NODE_IP_ADDRESS": "127.0.0.1", "RABBITMQ_NODE_PORT": str(port),
           "RABBITMQ_DIST_PORT": str(dist_port),
           "RABBITMQ_SERVER_ADDITIONAL_ERL_ARGS": "-kernel inet_dist_use_interface {127,0,0,1}",
           "RABBITMQ_MNESIA_BASE": str(workdir / "mnesia"),
           "RABBITMQ_LOG_BASE": str(workdir / "log"),
           "RABBITMQ_PID_FILE": str(workdir / "rabbitmq.pid")}
    # epmd in the foreground, ours to stop (Erlang would start a daemon that outlives it)
    epmd_proc = subprocess.Popen([epmd, "-port", str(epmd_port), "-address", "127.0.0.1"],
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = open(workdir / "startup.log", "wb")  # noqa: SIM115 - the server's lifetime
    proc = subprocess.Popen([server], cwd=workdir, env=env, stdout=out,
                            stderr=subprocess.STDOUT)
    broker = RabbitMQ(port, workdir, proc, epmd_proc)
    try:
        # the AMQP listener opens last in RabbitMQ's boot: listening is ready
        wait_for(lambda: proc.poll() is not None or port_open(port), 90, "RabbitMQ to listen")
        if proc.poll() is not None:
            raise RuntimeError("rabbitmq-server exited at start: "
                               + (workdir / "startup.log").read_text(errors="replace")[-2000:])
    except BaseException:
        broker.stop()
        raise
    return broker


@contextlib.contextmanager
def rabbitmq_running(**kwargs: int) -> Iterator[RabbitMQ]:
    server = start_rabbitmq(**kwargs)
    try:
        yield server
    finally:
        server.stop()


BROKERS = ("redis", "rabbitmq")


@contextlib.contextmanager
def broker_running(kind: str) -> Iterator[Redis | RabbitMQ]:
    """A Celery broker of one of :data:`BROKERS`."""
    if kind not in BROKERS:
        raise ValueError(f"unknown broker {kind!r}")
    with redis_running() if kind == "redis" else rabbitmq_running() as server:
        yield server


@contextlib.contextmanager
def postgres_running(**kwargs: bool) -> Iterator[Postgres]:
    server = start_postgres(**kwargs)
    try:
        yield server
    finally:
        server.stop()


@contextlib.contextmanager
def redis_running() -> Iterator[Redis]:
    server = start_redis()
    try:
        yield server
    finally:
        server.stop()


# -- fixtures (imported by tests/conftest.py) ------------------------------------------

@pytest.fixture(scope="session")
def pg_server() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the test session; each test gets its own database."""
    with postgres_running() as server:
        yield server


@pytest.fixture(scope="module", params=BROKERS)
def celery_broker(request: pytest.FixtureRequest) -> Iterator[Redis | RabbitMQ]:
    """Each Celery test once per broker, Redis and RabbitMQ, each started once per test
    module (RabbitMQ takes seconds to boot)."""
    with broker_running(str(request.param)) as server:
        yield server


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest) -> str | None:
    """Run a ledger test on both databases: None is the embedded SQLite file, else the
    URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return None
    server: Postgres = request.getfixturevalue("pg_server")
    return server.create_database()


# -- a scaled-out node: receivers and workers sharing PostgreSQL, Redis and a spool -----

DAT_ROUTE = {"name": "dat-spect", "match": {"Modality": "NM",
                                            "ImageType": {"contains": ["RECON TOMO"]}},
             "pipeline": "dat_spect", "send_to": ["pacs"]}


def scale_config(storage: Path, port: int, *, ledger_url: str, broker: str, spool: Path,
                 pacs_port: int, timeout_s: float = 60, slots: int = 1) -> dict[str, Any]:
    """One machine's config: its own storage folder and port; the ledger, broker and
    spool that every machine shares."""
    return node_config(storage, port, routes=[DAT_ROUTE],
                       destinations={"pacs": {"ae_title": "ORTHANC", "host": "127.0.0.1",
                                              "port": pacs_port}},
                       extra={"node": {"spool": str(spool)},
                              "ledger": {"url": ledger_url},
                              "jobs": {"engine": "celery", "broker": broker,
                                       "workers": slots, "timeout_s": timeout_s,
                                       "max_attempts": 3}})


@dataclass
class WorkerProcess:
    proc: subprocess.Popen[bytes]
    log_path: Path

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace")

    def kill(self, sig: int = signal.SIGKILL) -> int:
        """Signal the worker and every process it started (its analysis children): a
        SIGKILL is a machine lost mid-job, a SIGTERM a graceful stop. Returns the
        worker's exit code."""
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, sig)
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # children that outlived a SIGTERM
        return int(self.proc.returncode)


def start_worker(workdir: Path, config: dict[str, Any]) -> WorkerProcess:
    """``dicomnode worker`` in its own process group, ready once Celery says so."""
    workdir.mkdir(parents=True, exist_ok=True)
    cfg = workdir / "worker.yaml"
    cfg.write_text(yaml.safe_dump(config))
    log_path = workdir / "worker.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")])
    with log_path.open("ab") as log:
        proc = subprocess.Popen([sys.executable, "-m", "dicomnode.cli", "worker", "--config",
                                 str(cfg)], stdout=log, stderr=subprocess.STDOUT, cwd=REPO,
                                env=env, start_new_session=True)
    worker = WorkerProcess(proc, log_path)

    def ready() -> bool:
        if proc.poll() is not None:
            raise AssertionError(f"worker exited with {proc.returncode}:\n{worker.log_text()}")
        return " ready." in worker.log_text()

    wait_for(ready, 90, "the worker to connect to the broker")
    return worker
