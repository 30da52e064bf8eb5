"""Is the Prefect API that ``PREFECT_API_URL`` names up? Asked once, before a flow starts.

Why: with an unreachable API, Prefect's engine retries for ~6 s and then ends the command with
a 113-line traceback ("Failed to reach API"), exit status 1 -- the status ``tml`` reserves for
a corrupt checkpoint. One GET of ``<api_url>/health`` (the request Prefect's engine makes
itself before a flow, so a server that passes here passes there) answers the same question
in milliseconds when the port is closed, and in at most :data:`HEALTH_TIMEOUT_S` when the
host does not answer; the CLI turns a failure into one line and :data:`EXIT_PREFECT_API`.

A server that answers ``/health`` with 2xx but not as Prefect does (its body is not ``true``:
another service on that port, a catch-all proxy) is refused the same way: Prefect's engine
would otherwise fail on its version check with ``InvalidVersion``, in a traceback.

While a flow runs, :class:`ApiWatch` keeps asking: an API that has not answered for
:data:`API_GONE_AFTER_S` is gone. Training is then asked to stop at its next step (which is
checkpointed, as on SIGTERM) and ``tml`` exits with :data:`EXIT_PREFECT_API`, at most
:data:`API_GONE_GRACE_S` after training stopped: without it, Prefect's next call (the progress
artifact at the end of an epoch, the flow's final state) retried for minutes, and meanwhile
nothing trained.

Only for an API that the user named (environment, profile or Prefect settings file): the
private server that ``tml`` starts itself has its own readiness check
(:meth:`flows.local_server.LocalPrefectServer.wait_until_ready`).
"""

from __future__ import annotations

import base64
import json
import os
import re
import ssl
import threading
import time
from collections.abc import Callable
from urllib.parse import urlsplit, urlunsplit

# The ``tml`` exit status when the Prefect API that PREFECT_API_URL names cannot be reached or
# is not healthy (docs/cli.md). Not 3 (storage error): nothing is wrong with the save_dir, and
# the remedy (start that server, or unset the variable) is another one.
EXIT_PREFECT_API = 4
HEALTH_TIMEOUT_S = 5.0
# While a flow runs (ApiWatch): ask every API_POLL_S; gone when nothing answered for
# API_GONE_AFTER_S (at least two probes in a row failed); tml then exits at most
# API_GONE_GRACE_S after training stopped. Noticed within ~15 s of the server's death
# (API_GONE_AFTER_S plus one probe's timeout), documented in docs/cli.md.
API_POLL_S = 2.0
API_GONE_AFTER_S = 10.0
API_PROBE_TIMEOUT_S = 4.0
API_GONE_GRACE_S = 8.0


class PrefectApiUnreachableError(RuntimeError):
    """The configured Prefect API did not answer its health check (or answered it, but not as
    a Prefect server does); the message is one line."""

    exit_code = EXIT_PREFECT_API


def configured_api(environ: dict[str, str] | None = None) -> tuple[str, str] | None:
    """``(api_url, where it was set)`` if Prefect's settings name an API, else None.

    The environment is read first and now: Prefect's settings context is made when Prefect is
    imported, which in a long-lived process (tests, a notebook) may be before the variable was
    set (the same reason as :func:`flows.local_server.configured_api_url`).
    """
    environ = dict(os.environ) if environ is None else environ
    if environ.get("PREFECT_API_URL"):
        return environ["PREFECT_API_URL"], "from the environment"
    from prefect.settings import get_current_settings
    from prefect.settings.profiles import load_current_profile

    url = get_current_settings().api.url
    if not url:
        return None
    profile = load_current_profile()
    if any(setting.name == "PREFECT_API_URL" for setting in profile.settings):
        return url, f"from profile '{profile.name}'"
    return url, "from a Prefect settings file (prefect.toml, pyproject.toml or .env)"


def _redact(url: str) -> str:
    """The URL without ``user:password@``: the message is printed and may end up in logs."""
    try:
        parts = urlsplit(url)
        netloc = parts.netloc.rpartition("@")[2]
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return url


def _client_options() -> dict[str, object]:
    """TLS and auth as Prefect's own client sets them, so a secured server is asked as the
    flow will ask it (``/health`` itself needs no auth on a Prefect server; Cloud may)."""
    from prefect.settings import get_current_settings

    settings = get_current_settings()
    if settings.api.tls_insecure_skip_verify:
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    else:
        import certifi

        context = ssl.create_default_context(cafile=settings.api.ssl_cert_file or certifi.where())
    headers = dict(settings.client.custom_headers)
    if settings.api.auth_string:
        token = base64.b64encode(settings.api.auth_string.get_secret_value().encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    elif settings.api.key and "Authorization" not in headers:
        headers["Authorization"] = f"Bearer {settings.api.key.get_secret_value()}"
    return {"verify": context, "headers": headers}


def _reason(error: Exception, timeout_s: float = HEALTH_TIMEOUT_S) -> str:
    """``[Errno 111] Connection refused`` -> ``connection refused``; timeouts say how long."""
    import httpx

    if isinstance(error, httpx.TimeoutException):
        return f"no answer within {timeout_s:g} s"
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(error).strip()) or type(error).__name__
    text = " ".join(text.split())  # one line, whatever the library put in its message
    return text[:1].lower() + text[1:]


def health_problem(api_url: str, timeout_s: float = HEALTH_TIMEOUT_S) -> str | None:
    """Why ``<api_url>/health`` did not answer as a Prefect server does -- 2xx with the JSON
    body ``true`` -- (one phrase), or None when it did."""
    import httpx

    try:
        with httpx.Client(timeout=timeout_s, **_client_options()) as client:  # type: ignore[arg-type]
            reply = client.get(f"{api_url.rstrip('/')}/health")
            body = reply.content[:200]
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, OSError) as error:
        return _reason(error, timeout_s)
    if not reply.is_success:
        return f"its health check answered HTTP {reply.status_code} {reply.reason_phrase}".strip()
    if not _is_prefect_health(body):
        shown = body.decode(errors="replace")
        shown = " ".join(shown.split())[:60] or "an empty body"
        return (
            f"its health check answered HTTP {reply.status_code} with {shown!r} where a Prefect "
            "server answers true: this is not a Prefect API (another service on that address?)"
        )
    return None


def _is_prefect_health(body: bytes) -> bool:
    try:
        return json.loads(body) is True
    except ValueError:  # not JSON (UnicodeDecodeError is a ValueError)
        return False


def _remedy(source: str) -> str:
    """How to go back to a private server per run (docs/deploy.md), for where the URL is set."""
    if source == "from the environment":
        how = "unset PREFECT_API_URL"
    elif source.startswith("from profile"):
        how = "run `prefect config unset PREFECT_API_URL`"
    else:
        how = "remove PREFECT_API_URL from that file"
    return f"Start that server, or {how} to let tml start a private one for each run."


def require_reachable_api() -> None:
    """Raise :class:`PrefectApiUnreachableError` unless the configured API (if any) is healthy.

    Call it before a flow command imports and starts its flow; nothing has been written yet.
    """
    configured = configured_api()
    if configured is None:
        return
    url, source = configured
    problem = health_problem(url)
    if problem is not None:
        raise PrefectApiUnreachableError(
            f"cannot reach the Prefect API at {_redact(url)} (PREFECT_API_URL, {source}): "
            f"{problem}. {_remedy(source)}"
        )


def not_a_prefect_api(error: BaseException) -> str | None:
    """One line if ``error`` (a flow command's failure) is Prefect's client finding that the
    configured API is not a Prefect server (its version check got no version), else None."""
    from packaging.version import InvalidVersion

    seen: BaseException | None = error
    while seen is not None and not isinstance(seen, InvalidVersion):
        seen = seen.__cause__ or seen.__context__
    configured = configured_api()
    if seen is None or configured is None:
        return None
    url, source = configured
    return (
        f"the server at {_redact(url)} (PREFECT_API_URL, {source}) is not a Prefect API: its "
        f"version check answered no version ({' '.join(str(seen).split())}). "
        f"{_remedy(source)}"
    )


def _gone_message(url: str, source: str, problem: str) -> str:
    return (
        f"the Prefect API at {_redact(url)} (PREFECT_API_URL, {source}) stopped answering "
        f"during this run: {problem}. Checkpoints already written are kept: start that server "
        "again and rerun the command (train resumes from its last checkpoint)."
    )


def api_down_during_run() -> str | None:
    """After a flow command failed: one line if the configured API stopped answering, else
    None (then the failure had another cause and its own traceback is the useful report)."""
    configured = configured_api()
    if configured is None:
        return None
    url, source = configured
    problem = health_problem(url)
    if problem is None:
        return None
    return _gone_message(url, source, problem)


class ApiWatch:
    """Asks the configured API every :data:`API_POLL_S` while a flow runs; see the module
    docstring. Once the API is gone (:attr:`gone` is its one-line message):

    * ``stop_training()`` is called every ~0.2 s; it asks a running training loop to stop at
      its next step and returns True while that loop is still running (then nothing more
      happens: the step in progress and its checkpoint finish first);
    * once it returns False (no training, or training has stopped), ``give_up(message)`` is
      called after :data:`API_GONE_GRACE_S`, unless :meth:`stop` came first: the command's
      own error handling ends it sooner; ``give_up`` ends the process (exit 4) if that hangs.
    """

    def __init__(
        self,
        api_url: str,
        source: str,
        *,
        stop_training: Callable[[], bool],
        give_up: Callable[[str], object],
    ) -> None:
        self.api_url = api_url
        self.source = source
        self.gone: str | None = None
        self._stop_training = stop_training
        self._give_up = give_up
        self._halt = threading.Event()
        self._thread = threading.Thread(target=self._run, name="tml-api-watch", daemon=True)

    @classmethod
    def for_configured_api(
        cls, *, stop_training: Callable[[], bool], give_up: Callable[[str], object]
    ) -> ApiWatch | None:
        """A started watch of the API the user named, or None when none is named."""
        configured = configured_api()
        if configured is None:
            return None
        watch = cls(*configured, stop_training=stop_training, give_up=give_up)
        watch._thread.start()
        return watch

    def stop(self) -> None:
        """The flow has ended (either way): watch no more, and never call ``give_up``."""
        self._halt.set()

    def _run(self) -> None:
        last_answer = time.monotonic()
        failures = 0
        while not self._halt.wait(API_POLL_S):
            problem = health_problem(self.api_url, timeout_s=API_PROBE_TIMEOUT_S)
            if problem is None:
                last_answer, failures = time.monotonic(), 0
                continue
            failures += 1
            if failures >= 2 and time.monotonic() - last_answer >= API_GONE_AFTER_S:
                self.gone = _gone_message(self.api_url, self.source, problem)
                break
        settled_at: float | None = None  # when training was seen stopped (or not running)
        while self.gone is not None and not self._halt.is_set():
            if self._stop_training():
                settled_at = None
            elif settled_at is None:
                settled_at = time.monotonic()
            elif time.monotonic() - settled_at >= API_GONE_GRACE_S:
                self._give_up(self.gone)
                return
            self._halt.wait(0.2)
