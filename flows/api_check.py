"""Is the Prefect API that ``PREFECT_API_URL`` names up? Asked once, before a flow starts.

Why: with an unreachable API, Prefect's engine retries for ~6 s and then ends the command with
a 113-line traceback ("Failed to reach API"), exit status 1 -- the status ``tml`` reserves for
a corrupt checkpoint. One GET of ``<api_url>/health`` (the request Prefect's engine makes
itself before a flow, so a server that passes here passes there) answers the same question
in milliseconds when the port is closed, and in at most :data:`HEALTH_TIMEOUT_S` when the
host does not answer; the CLI turns a failure into one line and :data:`EXIT_PREFECT_API`.

Only for an API that the user named (environment, profile or Prefect settings file): the
private server that ``tml`` starts itself has its own readiness check
(:meth:`flows.local_server.LocalPrefectServer.wait_until_ready`).
"""

from __future__ import annotations

import base64
import os
import re
import ssl
from urllib.parse import urlsplit, urlunsplit

# The ``tml`` exit status when the Prefect API that PREFECT_API_URL names cannot be reached or
# is not healthy (docs/cli.md). Not 3 (storage error): nothing is wrong with the save_dir, and
# the remedy (start that server, or unset the variable) is another one.
EXIT_PREFECT_API = 4
HEALTH_TIMEOUT_S = 5.0


class PrefectApiUnreachableError(RuntimeError):
    """The configured Prefect API did not answer its health check; the message is one line."""

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


def _reason(error: Exception) -> str:
    """``[Errno 111] Connection refused`` -> ``connection refused``; timeouts say how long."""
    import httpx

    if isinstance(error, httpx.TimeoutException):
        return f"no answer within {HEALTH_TIMEOUT_S:g} s"
    text = re.sub(r"^\[Errno -?\d+\]\s*", "", str(error).strip()) or type(error).__name__
    text = " ".join(text.split())  # one line, whatever the library put in its message
    return text[:1].lower() + text[1:]


def health_problem(api_url: str) -> str | None:
    """Why ``<api_url>/health`` did not answer 2xx (one phrase), or None when it did."""
    import httpx

    try:
        with httpx.Client(timeout=HEALTH_TIMEOUT_S, **_client_options()) as client:  # type: ignore[arg-type]
            reply = client.get(f"{api_url.rstrip('/')}/health")
    except (httpx.HTTPError, httpx.InvalidURL, ValueError, OSError) as error:
        return _reason(error)
    if not reply.is_success:
        return f"its health check answered HTTP {reply.status_code} {reply.reason_phrase}".strip()
    return None


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
    return (
        f"the Prefect API at {_redact(url)} (PREFECT_API_URL, {source}) stopped answering "
        f"during this run: {problem}. Checkpoints already written are kept: start that server "
        "again and rerun the command (train resumes from its last checkpoint)."
    )
