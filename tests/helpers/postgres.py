"""A private PostgreSQL server on loopback, and a ``prefect server`` that keeps its state in it.

Why: Prefect's default database, SQLite, logs "database is locked" when a burst of
event-started flow runs hits one server (docs/deploy.md "In production"); the production
answer is PostgreSQL, and tests/test_deployment_postgres.py checks that the project's
deployments run on it without a server error. Each test session starts its own server: a
fresh data directory (``initdb``), a free port on 127.0.0.1, TCP only (no Unix socket), a
password, and the process group killed at the end whatever happens.

Where the binaries come from: ``$TML_PG_BIN`` if set, else Debian's
``/usr/lib/postgresql/<version>/bin`` (newest first), else ``initdb`` on ``PATH``. CI
(``.ci/run``) installs Debian's ``postgresql`` package when they are missing. Without them
the test fails under ``CI=true`` and is skipped elsewhere, saying how to install them.

PostgreSQL refuses to run as root. Running as root (CI does), its processes run as the
``postgres`` user that Debian's package creates (``subprocess.Popen(user=...)``: no ``su``
process in between, so the server is our direct child and its process group ours to kill),
in a data directory under the system's temporary directory owned by that user (pytest's own
temporary directories are private to root).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import PrefectServer, free_port, started_prefect_server

PG_SUPERUSER = "tml"
PG_DATABASE = "prefect"
PG_OS_USER = "postgres"  # who runs the server when we are root (Debian's package creates it)
STARTUP_LIMIT_S = 120  # initdb and the first start take a few seconds; much longer under load
INSTALL_HINT = (
    "install PostgreSQL's server binaries (Debian: apt-get install -y postgresql; the "
    "pg_trgm extension Prefect needs is in that package) or point TML_PG_BIN at the folder "
    "holding initdb and postgres"
)


def find_pg_bin() -> Path | None:
    """The folder holding ``initdb``, ``postgres`` and ``pg_isready`` (None: not installed)."""
    candidates: list[Path] = []
    if configured := os.environ.get("TML_PG_BIN"):
        candidates.append(Path(configured))
    debian = Path("/usr/lib/postgresql")
    if debian.is_dir():
        versions = [p for p in debian.iterdir() if p.name.isdigit()]
        candidates += [p / "bin" for p in sorted(versions, key=lambda p: -int(p.name))]
    if on_path := shutil.which("initdb"):
        candidates.append(Path(on_path).resolve().parent)
    for folder in candidates:
        if all((folder / name).is_file() for name in ("initdb", "postgres", "pg_isready")):
            return folder
    return None


def require_pg_bin() -> Path:
    """The binaries' folder; without them a failure under CI (where .ci/run installs them, so
    missing means a broken setup, never a silently skipped test) and a skip elsewhere."""
    folder = find_pg_bin()
    if folder is not None:
        return folder
    message = f"PostgreSQL not found: {INSTALL_HINT}"
    if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass(frozen=True)
class PostgresServer:
    """A running server: its address, superuser and the database Prefect uses."""

    port: int
    password: str
    log_path: Path
    process: subprocess.Popen[bytes]
    host: str = "127.0.0.1"
    user: str = PG_SUPERUSER
    database: str = PG_DATABASE

    def url(self, driver: str = "postgresql+asyncpg") -> str:
        """SQLAlchemy URL (Prefect's ``PREFECT_API_DATABASE_CONNECTION_URL``); with driver
        ``postgresql`` a libpq/asyncpg DSN."""
        return f"{driver}://{self.user}:{self.password}@{self.host}:{self.port}/{self.database}"

    def query(self, sql: str) -> list[dict[str, Any]]:
        """Rows of one query on the Prefect database (asyncpg: Prefect's own driver)."""
        return asyncio.run(_fetch(self.url("postgresql"), sql))


async def _fetch(dsn: str, sql: str, *more: str) -> list[dict[str, Any]]:
    import asyncpg

    connection = await asyncpg.connect(dsn, timeout=30)
    try:
        rows = [dict(row) for row in await connection.fetch(sql)]
        for statement in more:
            await connection.execute(statement)
        return rows
    finally:
        await connection.close()


def _os_user() -> pwd.struct_passwd | None:
    """Whom to run PostgreSQL as: None (ourselves) unless we are root."""
    if os.geteuid() != 0:
        return None
    try:
        return pwd.getpwnam(PG_OS_USER)
    except KeyError:
        message = (
            f"running as root, PostgreSQL needs a non-root user and there is no "
            f"{PG_OS_USER!r} user: {INSTALL_HINT}"
        )
        if os.environ.get("CI", "").lower() in {"1", "true", "yes"}:
            pytest.fail(message, pytrace=False)
        pytest.skip(message)


def _as_user(user: pwd.struct_passwd | None) -> dict[str, Any]:
    """``Popen`` arguments that drop to ``user`` in the child (none when not root)."""
    if user is None:
        return {}
    return {"user": user.pw_uid, "group": user.pw_gid, "extra_groups": []}


@contextlib.contextmanager
def postgres_server(log_dir: Path) -> Iterator[PostgresServer]:
    """``initdb`` a fresh cluster, start ``postgres`` on a free loopback port, create the
    ``prefect`` database with ``pg_trgm``; on exit stop it (fast shutdown, then SIGKILL of
    its whole process group) and delete its data, whatever happened."""
    bin_dir = require_pg_bin()
    user = _os_user()
    work = Path(tempfile.mkdtemp(prefix="tml-pg-"))  # /tmp: reachable by the postgres user
    log_path = log_dir / "postgres.log"
    process: subprocess.Popen[bytes] | None = None
    try:
        data = work / "data"
        password = secrets.token_hex(16)
        (work / "pwfile").write_text(password + "\n")
        if user is not None:
            for path in (work, work / "pwfile"):
                os.chown(path, user.pw_uid, user.pw_gid)
        env = {**os.environ, "LC_ALL": "C", "LANG": "C"}
        with log_path.open("ab") as log:
            subprocess.run(
                [
                    str(bin_dir / "initdb"),
                    "--pgdata",
                    str(data),
                    "--username",
                    PG_SUPERUSER,
                    "--pwfile",
                    str(work / "pwfile"),
                    "--auth",
                    "scram-sha-256",  # a password even on loopback
                    "--encoding",
                    "UTF8",
                    "--no-locale",
                    "--no-sync",  # a throwaway cluster
                ],
                check=True,
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=work,
                env=env,
                timeout=STARTUP_LIMIT_S,
                **_as_user(user),
            )
            port = free_port()
            process = subprocess.Popen(
                [
                    str(bin_dir / "postgres"),
                    "-D",
                    str(data),
                    "-p",
                    str(port),
                    "-c",
                    "listen_addresses=127.0.0.1",
                    "-c",
                    "unix_socket_directories=",  # TCP on loopback only
                    "-c",
                    "log_min_messages=warning",
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=work,
                env=env,
                start_new_session=True,  # not in pytest's group: a Ctrl-C reaches us, not it
                **_as_user(user),
            )
        server = PostgresServer(port=port, password=password, log_path=log_path, process=process)
        _wait_until_accepting(bin_dir, server)
        asyncio.run(_create_database(server))
        yield server
    finally:
        if process is not None:
            _stop_postgres(process)
        shutil.rmtree(work, ignore_errors=True)


def _wait_until_accepting(bin_dir: Path, server: PostgresServer) -> None:
    deadline = time.monotonic() + STARTUP_LIMIT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            raise RuntimeError(
                f"postgres exited with {server.process.returncode}:\n"
                f"{server.log_path.read_text()[-3000:]}"
            )
        ready = subprocess.run(
            [str(bin_dir / "pg_isready"), "-q", "-h", server.host, "-p", str(server.port)],
            check=False,
        )
        if ready.returncode == 0:
            return
        time.sleep(0.2)  # polling readiness: there is no event to await across processes
    raise RuntimeError(f"postgres not accepting connections after {STARTUP_LIMIT_S}s")


async def _create_database(server: PostgresServer) -> None:
    """The ``prefect`` database with ``pg_trgm`` (Prefect's migrations use it): created here
    so that a PostgreSQL without its contrib extensions fails with a plain message."""
    admin = server.url("postgresql").rsplit("/", 1)[0] + "/postgres"
    await _fetch(admin, "SELECT 1", f"CREATE DATABASE {PG_DATABASE}")
    try:
        await _fetch(server.url("postgresql"), "SELECT 1", "CREATE EXTENSION IF NOT EXISTS pg_trgm")
    except Exception as error:
        raise RuntimeError(f"PostgreSQL lacks pg_trgm ({error}): {INSTALL_HINT}") from error


def _stop_postgres(process: subprocess.Popen[bytes]) -> None:
    """SIGINT is PostgreSQL's fast shutdown (ends sessions, checkpoints, exits); whatever is
    left after 30 s is killed. Each backend calls ``setsid()`` (a process group of its own),
    so the postmaster's children are looked up and killed one by one, not by group."""
    import psutil

    def children() -> list[psutil.Process]:
        found: list[psutil.Process] = []
        with contextlib.suppress(psutil.NoSuchProcess):
            found = psutil.Process(process.pid).children(recursive=True)
        return found

    seen = children()
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGINT)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=30)
    for child in [*seen, *children()]:  # nothing of it may survive the test
        with contextlib.suppress(psutil.NoSuchProcess):
            child.kill()
    with contextlib.suppress(ProcessLookupError):
        os.kill(process.pid, signal.SIGKILL)
    process.wait()


@contextlib.contextmanager
def prefect_server_on(database: PostgresServer, log_path: Path) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free loopback port with its state in ``database``; its
    output (uvicorn and every server service) to ``log_path``; started and stopped as the
    session's SQLite-backed server in tests/conftest.py."""
    settings = {
        "PREFECT_API_DATABASE_CONNECTION_URL": database.url(),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    with started_prefect_server(settings, log_path) as server:
        yield server


# What a server log must not contain: Prefect logs failed requests and service errors at
# ERROR with a traceback; SQLite's lock contention and PostgreSQL's deadlocks by name.
SERVER_ERRORS = re.compile(r"ERROR|Traceback|(?i:database is locked|deadlock)")


def server_errors(log_text: str) -> list[str]:
    """The lines of a server log that report an error (empty: none)."""
    return [line for line in log_text.splitlines() if SERVER_ERRORS.search(line)]
