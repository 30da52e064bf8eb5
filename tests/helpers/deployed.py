"""Deploying ``prefect.yaml`` on loopback as a user does, for the deployment tests.

Every CLI process runs the repository's code (``cwd`` and ``PYTHONPATH`` = the repository
root) in its own process group, killed whatever happens; workers are killed with every flow-run
process they started (each in a session of its own).
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar
from uuid import UUID

import psutil
import pytest
import yaml
from prefect.client.orchestration import get_client

from tests.conftest import PrefectServer

REPO_ROOT = Path(__file__).resolve().parents[2]
POOL = "tml-process"  # the work pool named in prefect.yaml
HOOKS = Path(__file__).resolve().parent / "deployed_hooks"  # sitecustomize: events of a run
T = TypeVar("T")


def cli_env(server: PrefectServer) -> dict[str, str]:
    """The session server's API, and this checkout's code first on the path."""
    path = os.environ.get("PYTHONPATH")
    return {
        **server.env(),
        "PYTHONPATH": f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def prefect(
    args: Sequence[str], env: dict[str, str], *, cwd: Path = REPO_ROOT, timeout: float = 90
) -> str:
    """Run ``prefect ARGS`` like a user would; return its output, fail on a non-zero exit."""
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", *args],
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its children (a worker's flow run) share the group
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        output, _ = process.communicate()
        pytest.fail(f"`prefect {' '.join(args)}` still running after {timeout}s:\n{output}")
    finally:
        kill_group(process)
    assert process.returncode == 0, f"`prefect {' '.join(args)}` failed:\n{output}"
    return output


def deploy_all(env: dict[str, str]) -> None:
    """The README's deploy commands: the work pool, then every deployment of prefect.yaml
    (whose build step also applies automations.yaml)."""
    prefect(["work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
    prefect(["--no-prompt", "deploy", "--all"], env)


def run_deployment(env: dict[str, str], name: str, *params: str) -> UUID:
    """``prefect deployment run NAME ...``; the new flow run's id."""
    output = prefect(["deployment", "run", name, *params], env)
    match = re.search(r"UUID: ([0-9a-f-]{36})", output)
    assert match, output
    return UUID(match.group(1))


def start_worker(env: dict[str, str], cwd: Path, log_path: Path) -> subprocess.Popen[str]:
    """A process worker of the pool, started in ``cwd`` (not the repository: only the
    deployments' pull step leads its flow runs to the code), polling every second."""
    cwd.mkdir(parents=True, exist_ok=True)
    with log_path.open("a") as log:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
            cwd=cwd,
            env={**env, "PREFECT_WORKER_QUERY_SECONDS": "1"},
            stdout=log,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,
        )


def kill_group(process: subprocess.Popen[str]) -> None:
    with contextlib.suppress(ProcessLookupError):  # nothing of the group may survive
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10)


def kill_tree(process: subprocess.Popen[str]) -> None:
    """The worker, and the flow-run processes it started (each in a session of its own)."""
    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    kill_group(process)


def poll(read: Callable[[], T], done: Callable[[T], bool], what: str, limit_s: float = 30) -> T:
    """Read through the API until ``done`` (no event to await across processes)."""
    deadline = time.monotonic() + limit_s
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not reached after {limit_s}s, last {value!r}")
        time.sleep(0.2)


def remove_project_automations() -> None:
    """What deploying created that would act on later tests' runs: the evaluate deployment's
    trigger and the automations of automations.yaml."""
    specs = yaml.safe_load((REPO_ROOT / "automations.yaml").read_text())["automations"]
    with get_client(sync_client=True) as client:
        with contextlib.suppress(Exception):  # not deployed: nothing to remove
            evaluate = client.read_deployment_by_name("evaluate/evaluate")
            client.delete_resource_owned_automations(f"prefect.deployment.{evaluate.id}")
        for name in (spec["name"] for spec in specs):
            for automation in client.read_automations_by_name(name):
                client.delete_automation(automation.id)
