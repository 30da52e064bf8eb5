"""Shared fixtures: a real S3-protocol server (moto) on loopback, and save_dir on every backend."""

from __future__ import annotations

import atexit
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hypothesis  # noqa: F401  (see below)
import pytest

# Prefect reads these when first imported (test modules import flows at collection): one
# private PREFECT_HOME per test session, no analytics (no internet here), generous startup.
_PREFECT_HOME = tempfile.mkdtemp(prefix="tml-tests-prefect-")
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ.update(
    PREFECT_HOME=_PREFECT_HOME,
    PREFECT_SERVER_ANALYTICS_ENABLED="false",
    PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="90",
    PREFECT_LOGGING_TO_API_BATCH_INTERVAL="0.3",
)

# Imported here, before any test starts a background thread: CPython 3.11.7's AST validator
# keeps its recursion counter per interpreter, and pytest's assertion rewriting of hypothesis
# (a pytest plugin, imported lazily at session end otherwise) can then fail with
# "SystemError: AST constructor recursion depth mismatch".


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class S3Server:
    """moto's S3 server in its own process; its log has one line per HTTP request."""

    endpoint: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def request_count(self) -> int:
        return sum(1 for line in self.log_path.read_text().splitlines() if ' HTTP/1.1" ' in line)

    def new_bucket(self) -> str:
        import s3fs

        name = f"test-{uuid.uuid4().hex[:12]}"
        s3fs.S3FileSystem(endpoint_url=self.endpoint).mkdir(name)
        return name


def _wait_until_serving(url: str, process: subprocess.Popen[bytes], limit_s: float = 60) -> None:
    deadline = time.monotonic() + limit_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"moto server exited with {process.returncode}")
        try:
            with urllib.request.urlopen(f"{url}/moto-api/", timeout=2):
                return
        except OSError:
            time.sleep(0.1)  # polling a readiness endpoint: there is no event to await
    raise RuntimeError(f"moto server at {url} not ready after {limit_s}s")


def start_moto(port: int, output: Any) -> subprocess.Popen[Any]:
    """moto's S3 server on 127.0.0.1:``port``, its request log (a line per request) to
    ``output`` (a file, or ``subprocess.PIPE`` to read it as text)."""
    return subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=output,
        stderr=subprocess.STDOUT,
        text=output is subprocess.PIPE,
    )


def stop_process(process: subprocess.Popen[Any], grace_s: float = 30) -> None:
    """Terminate, wait ``grace_s``, then kill: a test's server never outlives it."""
    process.terminate()
    try:
        process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = tmp_path_factory.mktemp("moto") / "moto.log"
    with log_path.open("wb") as log:
        process = start_moto(port, log)
    saved = {k: os.environ.get(k) for k in _S3_ENV}
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )
    try:
        _wait_until_serving(endpoint, process)
        yield S3Server(endpoint=endpoint, log_path=log_path, process=process)
    finally:
        stop_process(process, grace_s=10)
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


_S3_ENV = ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")


@pytest.fixture
def s3_save_dir(s3_server: S3Server) -> str:
    return f"s3://{s3_server.new_bucket()}/run"


@pytest.fixture
def memory_save_dir() -> Iterator[str]:
    import fsspec

    name = f"memory://test-{uuid.uuid4().hex[:12]}/run"
    yield name
    fs = fsspec.filesystem("memory")
    if fs.exists(name):
        fs.rm(name, recursive=True)


@pytest.fixture(params=["local", "memory", "s3"])
def save_dir(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """The same test on local disk, memory:// and s3:// (moto)."""
    if request.param == "local":
        return str(tmp_path / "run")
    if request.param == "memory":
        return request.getfixturevalue("memory_save_dir")
    return request.getfixturevalue("s3_save_dir")


@dataclass
class PrefectServer:
    """One real ``prefect server start`` on loopback for the whole test session."""

    api_url: str
    process: subprocess.Popen[bytes]

    def env(self) -> dict[str, str]:
        """Environment for subprocesses (CLI runs, workers) that should use this server."""
        return {**os.environ, "PREFECT_API_URL": self.api_url}


@contextlib.contextmanager
def started_prefect_server(settings: dict[str, str], log_path: Path) -> Iterator[PrefectServer]:
    """``prefect server start`` on a free loopback port with ``settings`` in its environment
    (a database URL...), its output in ``log_path``; its whole process group killed at the
    end, whatever happens."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    env = {**os.environ, "PREFECT_UI_API_URL": api_url, **settings}
    env.pop("PREFECT_API_URL", None)
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "prefect",
                "server",
                "start",
                "--host",
                "127.0.0.1",
                "--port",
                str(port),
                "--analytics-off",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,  # its uvicorn children share the group: one killpg ends all
        )
    try:
        _wait_until_healthy(f"{api_url}/health", process, log_path)
        yield PrefectServer(api_url=api_url, process=process)
    finally:
        _stop_group(process)


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    settings = {
        "PREFECT_SERVER_UI_ENABLED": "true",
        # The scheduler service creates a cron deployment's runs on its loop (60 s by default);
        # the deployment test waits for them, so loop often.
        "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "2",
    }
    with started_prefect_server(
        settings, tmp_path_factory.mktemp("prefect") / "server.log"
    ) as server:
        try:
            yield server
        finally:
            _drain_prefect_workers()


def _drain_prefect_workers() -> None:
    """Send the logs and events still queued in this process while the server is up (else
    Prefect prints "Error logging to API" at exit, when it tries after the server stopped)."""
    if "prefect" not in sys.modules:
        return
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    EventsWorker.drain_all(timeout=10)
    APILogWorker.drain_all(timeout=10)


def _wait_until_healthy(url: str, process: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"prefect server exited early:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(url, timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.2)  # polling a readiness endpoint: there is no event to await
    raise RuntimeError(f"prefect server not healthy after 120s:\n{log.read_text()[-3000:]}")


def _stop_group(process: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=20)
    except ProcessLookupError:
        pass
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    with contextlib.suppress(ProcessLookupError):  # nothing of the group may survive
        os.killpg(process.pid, signal.SIGKILL)


@pytest.fixture
def prefect_api(
    prefect_server: PrefectServer, monkeypatch: pytest.MonkeyPatch
) -> Iterator[PrefectServer]:
    """Run flows in this process against the session's server, without heartbeat waits.

    The environment names the server too: ``tml`` called in-process (``flows.cli.main``)
    decides from the environment, before importing Prefect, whether to start a private server.
    """
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        temporary_settings,
    )

    monkeypatch.setenv("PREFECT_API_URL", prefect_server.api_url)
    with temporary_settings(
        updates={PREFECT_API_URL: prefect_server.api_url, PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}
    ):
        yield prefect_server


_TEST_WINDOWS: list[tuple[float, float, str]] = []  # (start, end, node id) of each test run


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    started = time.time()
    yield
    _TEST_WINDOWS.append((started, time.time(), item.nodeid))


def _started_during(created: float) -> str:
    """The test that was running when a process was created (what left it behind)."""
    for start, end, nodeid in _TEST_WINDOWS:
        if start <= created <= end:
            return nodeid
    return "outside any test (a fixture's setup or teardown)"


def _leftover_processes() -> list[str]:
    """Processes started by this test session (they inherit its PREFECT_HOME) still alive.

    Not counted: multiprocessing's resource tracker of this very process (it unlinks leaked
    shared memory when the process dies, and ends with it).
    """
    import psutil

    me = os.getpid()
    found = []
    for process in psutil.process_iter(["pid", "ppid", "cmdline", "create_time"]):
        if process.info["pid"] == me:
            continue
        command = " ".join(process.info["cmdline"] or [])
        if process.info["ppid"] == me and "multiprocessing.resource_tracker" in command:
            continue
        try:
            if process.environ().get("PREFECT_HOME") == _PREFECT_HOME:
                found.append(
                    f"{process.info['pid']} (parent {process.info['ppid']}, started during "
                    f"{_started_during(process.info['create_time'])}): {command}"
                )
        except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess):
            continue
    return found


_WORKER_LEFTOVERS: list[str] = []  # pytest-xdist controller: what its workers found


@pytest.hookimpl(optionalhook=True)
def pytest_testnodedown(node: Any, error: object) -> None:
    """pytest-xdist controller: a worker ended; keep the leftovers its session found."""
    _WORKER_LEFTOVERS.extend(getattr(node, "workeroutput", {}).get("leftover_processes", []))


@pytest.hookimpl(trylast=True)  # under pytest-xdist: after the controller ended its workers
def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Tests never leave processes running (servers, workers, orphaned uvicorns).

    Each pytest-xdist worker has a PREFECT_HOME of its own (this file, imported there, made
    it), which every process it starts inherits: it checks its own and hands what it found
    to the controller (``workeroutput``), which reports them all and fails the run."""
    from tml_checkpointing.writing.writer_process import close_shared_writer

    close_shared_writer()  # this process's checkpoint writer: ours to stop, not a leak
    deadline = time.monotonic() + 15
    leftovers = _leftover_processes()
    while leftovers and time.monotonic() < deadline:
        time.sleep(0.2)  # give terminated children a moment to be reaped
        leftovers = _leftover_processes()
    workeroutput = getattr(session.config, "workeroutput", None)
    if workeroutput is not None:  # a pytest-xdist worker
        workeroutput["leftover_processes"] = leftovers
        return
    leftovers += _WORKER_LEFTOVERS
    if leftovers:
        print(
            f"\nERROR: processes left running by the tests (this session is pid {os.getpid()}):"
            + "".join(f"\n  {leftover}" for leftover in leftovers)
        )
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


# -- tiers -------------------------------------------------------------------------------------

_SLOW_FIXTURES = {"prefect_server", "prefect_api"}
_SLOW_MODULES = {
    "test_crash",
    "test_kill_resume",
    "test_signals",
    "test_deployment",
    "test_deployment_postgres",
    "test_distributed",
    "test_ranks",
    "test_rank_kills",
    "test_sharded_chains",
    "test_sharded_restore",
}


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "slow: starts processes or a Prefect server (left out by `make quick`)"
    )


# The longest modules, longest first: seconds of one module on a pytest-xdist worker, measured
# with 3 workers on a 2-core machine under a load of 7-10. Under pytest-xdist (`make test`:
# 4 workers, whole modules per worker, `--dist loadscope`) they start first, one per worker,
# so that no worker begins one of them when the others are nearly done. (xdist hands a worker
# its next module once it has at most 2 tests left: with 3 workers, two of the four longest
# shared one, ~1050 s; with 4, the longest worker took ~600 s.)
_LONGEST_FIRST = (
    "test_ranks",  # ~760 s (one worker: its tests find rank processes by command line)
    "test_incremental_crash",  # ~560 s
    "test_crash",  # ~545 s
    "test_kill_resume",  # ~505 s
    "test_rank_kills",  # ~250 s loaded
    "test_distributed",  # ~125 s
    "test_sharded_chains",  # ~120 s loaded
    "test_sharded_restore",  # ~90 s loaded
    "test_signals",  # ~120 s
    "test_s3_faults",  # ~115 s
    "test_packaging",  # ~115 s
    "test_deployment_postgres",  # ~95-110 s (idle or beside 2 busy loops, 2 cores)
    "test_cli",  # ~90 s
    "test_evaluate_retrain",  # ~90 s
    "test_s3",  # ~60 s
    "test_preemption",  # ~55 s
    "test_deployment",  # ~50 s
    "test_training_loop",  # ~35 s
    "test_run_identity",  # ~35 s
    "test_read_faults",  # ~25 s
)


def _module_of(item: pytest.Item) -> str:
    return item.nodeid.split("::", 1)[0].rsplit("/", 1)[-1].removesuffix(".py")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests that need a Prefect server or kill processes are `slow`; the rest is `make quick`."""
    for item in items:
        fixtures = set(getattr(item, "fixturenames", ()))
        if _module_of(item) in _SLOW_MODULES or fixtures & _SLOW_FIXTURES:
            item.add_marker(pytest.mark.slow)
    if os.environ.get("PYTEST_XDIST_WORKER"):  # every worker sorts alike: same collection
        rank = {module: index for index, module in enumerate(_LONGEST_FIRST)}
        items.sort(key=lambda item: rank.get(_module_of(item), len(rank)))  # stable
