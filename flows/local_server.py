"""A private Prefect API server for one ``tml`` run, tied to the life of that run.

Why not Prefect's own temporary server (what Prefect starts when ``PREFECT_API_URL`` is unset):
it is a ``uvicorn`` child in the CLI's process group, so a signal to the group (Ctrl-C in a
terminal, ``kill -- -PGID`` from systemd, Kubernetes or a Prefect worker) kills the server
first; the CLI then spends minutes retrying its final state and log calls against a dead API
(142 s, and 190 lines of connection-refused tracebacks after Ctrl-C). And a CLI killed with
SIGKILL, or by SIGTERM while Prefect starts, leaves that server running, re-parented to PID 1.

This server is the same app (``prefect.server.api.server:create_app``, ephemeral mode: no UI,
only the services a temporary server runs, SQLite under ``PREFECT_HOME``), but:

* it runs in its own session, so signals meant for the CLI's group do not reach it: it stays
  up while the CLI reports its final state, then the CLI stops it (at exit, after Prefect has
  drained its log and event queues);
* it dies with the CLI whatever way the CLI ends: ``PR_SET_PDEATHSIG`` (Linux) kills it when
  the CLI dies, even by SIGKILL, and everywhere it watches a pipe from the CLI and stops when
  that pipe closes (the kernel closes it when the CLI dies);
* the CLI binds the listening socket (port 0, loopback) and hands it down, so there is no port
  race and no polling: a health request made while the server starts waits in the socket's
  backlog and is answered once the server serves (or refused at once if it died).

Started first thing (before torch and Prefect are imported), its start overlaps the CLI's own
imports: a warm start takes ~3-5 s on 2 cores, Prefect's temporary server ~5-7 s after the
CLI has imported Prefect's server modules (~2 s) itself.
"""

from __future__ import annotations

import argparse
import atexit
import http.client
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Sequence
from typing import IO

# What Prefect's own temporary server sets (prefect.server.api.server.SubprocessASGIServer).
_SERVER_ENV = {
    "PREFECT_UI_ENABLED": "0",
    "PREFECT__SERVER_EPHEMERAL": "1",
    "PREFECT__SERVER_FINAL": "1",
}
DEFAULT_STARTUP_TIMEOUT_S = 90.0
STOP_GRACE_S = 3.0  # then SIGKILL: the server is private and its database is crash-safe
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class LocalServerError(RuntimeError):
    """The private Prefect API server did not start (the message has the end of its log)."""


class LocalPrefectServer:
    """One private Prefect API server; :meth:`start`, then :meth:`wait_until_ready`.

    Start it from the main thread: on Linux the kernel's parent-death signal is tied to the
    thread that started the server, so a server started from a thread that ends is killed.
    """

    def __init__(self, startup_timeout_s: float = DEFAULT_STARTUP_TIMEOUT_S) -> None:
        self.startup_timeout_s = startup_timeout_s
        self.port: int | None = None
        self.process: subprocess.Popen[bytes] | None = None
        self._lifeline: int | None = None  # write end of the pipe the server watches
        self._log: IO[bytes] | None = None
        self.started_at: float | None = None
        self.ready_after_s: float | None = None

    @property
    def api_url(self) -> str:
        if self.port is None:
            raise LocalServerError("the private Prefect server has not been started")
        return f"http://127.0.0.1:{self.port}/api"

    def start(self) -> str:
        """Spawn the server and return its API URL at once (it may still be starting)."""
        if self.process is not None:
            return self.api_url
        atexit.register(self.stop)  # first: whatever happens below, exit stops what started
        listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        try:
            self.port = int(listener.getsockname()[1])
            lifeline_read, self._lifeline = os.pipe()
            # Its output goes to an anonymous file, shown only if it fails to start.
            self._log = tempfile.TemporaryFile(prefix="tml-prefect-server-")  # noqa: SIM115
            env = {**os.environ, **_SERVER_ENV}
            env.pop("PREFECT_API_URL", None)
            # This file as a script, -P: nothing but the standard library, uvicorn and Prefect
            # on its path (no "flows" package of whatever directory the command runs in).
            command = [
                sys.executable, "-P", os.path.abspath(__file__),
                "--listen-fd", str(listener.fileno()), "--parent-pid", str(os.getpid()),
            ]  # fmt: skip
            self.started_at = time.monotonic()
            try:
                self.process = subprocess.Popen(
                    command,
                    stdin=lifeline_read,
                    stdout=self._log,
                    stderr=subprocess.STDOUT,
                    pass_fds=(listener.fileno(),),
                    start_new_session=True,
                    env=env,
                )
            finally:
                os.close(lifeline_read)
        finally:
            # Only the server holds the socket now: if it dies, waiting clients are refused.
            listener.close()
        return self.api_url

    def wait_until_ready(self) -> float:
        """Block until the server answers its health check; returns seconds since start.

        Raises :class:`LocalServerError` (with the end of the server's log) if it exits or
        does not answer within ``startup_timeout_s``.
        """
        if self.process is None or self.started_at is None:
            raise LocalServerError("the private Prefect server has not been started")
        if self.ready_after_s is not None:
            return self.ready_after_s
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback only
        try:
            # One request: it waits in the listening socket's backlog until the server serves.
            with opener.open(f"{self.api_url}/health", timeout=self.startup_timeout_s) as reply:
                if reply.status != 200:
                    raise LocalServerError(self._failure(f"health check answered {reply.status}"))
        except (OSError, http.client.HTTPException) as error:  # URLError is an OSError
            reason = "did not answer in time" if isinstance(error, TimeoutError) else str(error)
            raise LocalServerError(self._failure(reason)) from None
        self.ready_after_s = time.monotonic() - self.started_at
        return self.ready_after_s

    def _failure(self, reason: str) -> str:
        self.stop()
        tail = ""
        if self._log is not None:
            self._log.seek(0)
            tail = self._log.read().decode(errors="replace")[-2000:].strip()
            self._log.close()
            self._log = None
        return (
            f"the private Prefect API server for this run did not start ({reason}). "
            "Set PREFECT_API_URL to a running Prefect server to use that instead."
            + (f"\nserver log:\n{tail}" if tail else "")
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM, then SIGKILL after a short grace); idempotent."""
        if self._lifeline is not None:
            os.close(self._lifeline)
            self._lifeline = None
        process = self.process
        if process is not None and process.poll() is None:
            process.terminate()
            try:
                process.wait(timeout=STOP_GRACE_S)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def startup_timeout_s() -> float:
    """Prefect's own setting for its temporary server, read from the environment."""
    value = os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS")
    return float(value) if value else DEFAULT_STARTUP_TIMEOUT_S


def start_unless_api_in_environment() -> LocalPrefectServer | None:
    """Start a server now if the environment names no API (cheap: Prefect is not imported).

    Call it first thing, so the server's start overlaps the CLI's own imports; then
    :func:`ensure_prefect_api` decides (Prefect's profile may name an API after all).
    """
    if os.environ.get("PREFECT_API_URL"):
        return None
    server = LocalPrefectServer(startup_timeout_s=startup_timeout_s())
    server.start()
    return server


def configured_api_url() -> str | None:
    """The API URL Prefect would use (environment, profile, prefect.toml), if any.

    The environment is read here, now: Prefect reads it once, when its settings context is
    made, which in a process that imported Prefect earlier (a test session, a notebook calling
    ``flows.cli.main``) was before the variable was set; trusting that stale context started
    a private server next to the API the caller named.
    """
    from_environment = os.environ.get("PREFECT_API_URL")
    if from_environment:
        return from_environment
    from prefect.settings import PREFECT_API_URL

    return PREFECT_API_URL.value() or None


def ensure_prefect_api(server: LocalPrefectServer | None = None) -> LocalPrefectServer | None:
    """Point Prefect at a private server for this process unless an API URL is configured.

    ``server``: one already started (:func:`start_unless_api_in_environment`); it is stopped
    if Prefect's settings name an API. Otherwise one is started if needed, ``PREFECT_API_URL``
    is set in the environment and in Prefect's settings, and the server is stopped at exit.
    Call it once, then :meth:`LocalPrefectServer.wait_until_ready` before the first flow.
    """
    if configured_api_url():
        if server is not None:
            server.stop()
        return None
    if server is None:
        server = LocalPrefectServer(startup_timeout_s=startup_timeout_s())
    os.environ["PREFECT_API_URL"] = server.start()
    # No "View at <url>" links: this server has no UI and is gone when the run ends.
    os.environ.setdefault("PREFECT_UI_URL", "")
    from prefect.context import refresh_global_settings_context

    refresh_global_settings_context()  # settings were read when prefect was imported
    print(
        f"tml: started a private Prefect API server for this run at {server.api_url} "
        "(set PREFECT_API_URL to use a shared one)",
        file=sys.stderr,
        flush=True,
    )
    return server


# --- the server process ---------------------------------------------------------------


def _die_with_parent(parent_pid: int) -> None:
    """End this process when the CLI that started it ends, however it ends."""
    if sys.platform.startswith("linux"):
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:  # the CLI died before the line above took effect
        os._exit(0)

    def watch_lifeline() -> None:
        sys.stdin.buffer.read()  # returns at EOF: the CLI closed the pipe or died
        os.kill(os.getpid(), signal.SIGTERM)  # uvicorn's graceful shutdown
        time.sleep(STOP_GRACE_S)
        os._exit(0)

    threading.Thread(target=watch_lifeline, name="lifeline", daemon=True).start()


def _serve(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="local_server.py")
    parser.add_argument("--listen-fd", type=int, required=True)
    parser.add_argument("--parent-pid", type=int, required=True)
    args = parser.parse_args(argv)
    _die_with_parent(args.parent_pid)
    listener = socket.socket(fileno=args.listen_fd)
    import uvicorn

    config = uvicorn.Config(
        "prefect.server.api.server:create_app",
        factory=True,
        log_level="error",
        lifespan="on",
    )
    uvicorn.Server(config).run(sockets=[listener])
    return 0


if __name__ == "__main__":
    sys.exit(_serve(sys.argv[1:]))
