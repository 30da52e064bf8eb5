"""From a checkpoint's commit to its evaluation, deployed as a user deploys (issue 20).

Starts a private ``prefect server`` on loopback, ``prefect --no-prompt deploy --all`` from the
repository root, one process worker, and runs the ``train/train`` deployment with a checkpoint
every 2 steps (``--epochs`` x 4 steps: 6 commits in a burst of a few seconds). Each commit's
``tml.checkpoint.committed`` event starts an ``evaluate`` run through the deployment's trigger.
Per checkpoint it reports, from the commit (the event's ``occurred`` time):

* ``metrics``: the evaluation's metrics file ``<ckpt>/eval/<partition>.json`` on disk (mtime);
* ``table``: the first version of the ``checkpoints-<exp>`` table artifact with the step's
  ``<partition>/loss``;

and where the first evaluate run's time went (event -> flow run created by the automation ->
picked up by the worker (Pending) -> Running (process start, imports) -> metrics), how many
evaluate runs there were, what each did (its name), and the most that ran at once (which the
deployment's ``concurrency_limit`` bounds).

    .venv/bin/python benchmarks/bench_eval_latency.py            # a table and the medians
    .venv/bin/python benchmarks/bench_eval_latency.py --json     # one JSON object
    .venv/bin/python benchmarks/bench_eval_latency.py --follow-seconds 0 --query-seconds 10
        # each run evaluates what is pending and stops (no kept model), Prefect's default
        # worker poll: roughly the set-up before issue 20, less its unbounded processes

Not a timed test: it takes about a minute and its figures depend on the machine's load.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar, cast

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:  # run as a script from anywhere
    sys.path.insert(0, str(REPO))

POOL = "tml-process"
PARTITION = "validation"
T = TypeVar("T")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def until(read: Callable[[], T], done: Callable[[T], bool], what: str, limit_s: float) -> T:
    """Read until ``done`` (another process does the work: there is nothing to await)."""
    deadline = time.monotonic() + limit_s
    while True:
        value = read()
        if done(value):
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: not reached after {limit_s}s")
        time.sleep(0.2)


def start(
    args: list[str], env: dict[str, str], log: Path, cwd: Path = REPO
) -> subprocess.Popen[bytes]:
    with log.open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "prefect", *args],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


def prefect(args: list[str], env: dict[str, str]) -> str:
    done = subprocess.run(
        [sys.executable, "-m", "prefect", *args],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=180, check=False,
    )  # fmt: skip
    if done.returncode:
        raise RuntimeError(f"prefect {' '.join(args)} failed:\n{done.stdout}{done.stderr}")
    return done.stdout


def stop(process: subprocess.Popen[bytes]) -> None:
    """The process and everything it started (a worker's flow runs are sessions of their own)."""
    import psutil  # type: ignore[import-untyped]

    with contextlib.suppress(psutil.NoSuchProcess):
        for child in psutil.Process(process.pid).children(recursive=True):
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait(timeout=30)


def seconds(later: datetime | None, earlier: datetime | None) -> float | None:
    return None if later is None or earlier is None else (later - earlier).total_seconds()


def measure(args: argparse.Namespace, work: Path, env: dict[str, str]) -> dict[str, Any]:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import (
        ArtifactFilter,
        ArtifactFilterKey,
        DeploymentFilter,
        DeploymentFilterId,
    )
    from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
    from prefect.events.schemas.events import ResourceSpecification

    from tml_checkpointing import get_checkpoints, is_done_eval, step_from_checkpoint
    from tml_checkpointing.catalog.evaluation import metrics_path
    from training.run_info import experiment_of

    prefect(["work-pool", "create", POOL, "--type", "process", "--overwrite"], env)
    prefect(["--no-prompt", "deploy", "--all"], env)
    with get_client(sync_client=True) as client:
        evaluate = client.read_deployment_by_name("evaluate/evaluate")
        parameters = dict(evaluate.parameters)
        parameters["params"] = {
            **parameters.get("params", {}),
            "follow_seconds": args.follow_seconds,
        }
        from prefect.client.schemas.actions import DeploymentUpdate

        client.update_deployment(evaluate.id, DeploymentUpdate(parameters=parameters))
        limit = (
            evaluate.global_concurrency_limit.limit if evaluate.global_concurrency_limit else None
        )
    worker = start(
        ["worker", "start", "--pool", POOL],
        {**env, "PREFECT_WORKER_QUERY_SECONDS": str(args.query_seconds)},
        work / "worker.log",
        cwd=work,
    )
    try:
        with get_client(sync_client=True) as client:
            until(
                lambda: client.read_work_pool(POOL).status,
                lambda status: str(status).upper().endswith("READY"),
                "worker polling the pool",
                60,
            )
        time.sleep(args.idle_seconds)  # an idle machine: the worker's own start has settled
        save_dir = work / "run"
        config = {"save_dir": str(save_dir), "epochs": args.epochs, "steps_per_epoch": 4,
                  "batch_size": 32, "checkpoint_every_steps": 2}  # fmt: skip
        output = prefect(
            ["deployment", "run", "train/train", "--param", "config=" + json.dumps(config)], env
        )
        match = re.search(r"UUID: ([0-9a-f-]{36})", output)
        assert match, output
        expected = args.epochs * 2
        until(
            lambda: [c for c in get_checkpoints(str(save_dir)) if is_done_eval(c, PARTITION)],
            lambda done: len(done) >= expected,
            f"{expected} checkpoints evaluated",
            args.limit_s,
        )
        with get_client(sync_client=True) as client:
            runs = until(
                lambda: [
                    r
                    for r in client.read_flow_runs(
                        deployment_filter=DeploymentFilter(
                            id=DeploymentFilterId(any_=[evaluate.id])
                        )
                    )
                    if r.parameters.get("save_dir") == str(save_dir)
                ],
                lambda runs: (
                    len(runs) >= expected
                    and all(r.state is not None and r.state.is_final() for r in runs)
                ),
                "every evaluate run finished",
                args.limit_s,
            )
            experiment = experiment_of(str(save_dir))
            events = client.read_events(
                filter=EventFilter(
                    event=EventNameFilter(name=["tml.checkpoint.committed"]),
                    resource=EventResourceFilter(
                        labels=ResourceSpecification({"tml.save_dir": str(save_dir)})
                    ),
                ),
                limit=50,
            ).events
            committed = {int(e.resource["tml.step"]): e.occurred for e in events}
            versions = client.read_artifacts(
                artifact_filter=ArtifactFilter(
                    key=ArtifactFilterKey(any_=[f"checkpoints-{experiment}"])
                )
            )
            histories = {r.id: client.read_flow_run_states(r.id) for r in runs}
    finally:
        stop(worker)

    in_table: dict[int, datetime] = {}
    for version in sorted(versions, key=lambda a: a.created or datetime.max):
        data = version.data
        rows = cast(list[dict[str, Any]], json.loads(data) if isinstance(data, str) else data or [])
        for row in rows:
            step = int(row["step"])
            if (
                row.get(f"{PARTITION}/loss") is not None
                and step not in in_table
                and version.created
            ):
                in_table[step] = version.created
    checkpoints = []
    for checkpoint in get_checkpoints(str(save_dir)):
        step = step_from_checkpoint(checkpoint)
        commit = committed.get(step)
        on_disk = datetime.fromtimestamp(os.stat(metrics_path(checkpoint, PARTITION)).st_mtime)
        on_disk = on_disk.astimezone() if commit is None else on_disk.astimezone(commit.tzinfo)
        checkpoints.append(
            {
                "step": step,
                "metrics_s": seconds(on_disk, commit),
                "table_s": seconds(in_table.get(step), commit),
            }
        )

    def state_time(run_id: Any, name: str) -> datetime | None:
        times = [s.timestamp for s in histories[run_id] if s.type.value == name]
        return min(times) if times else None

    spans = []
    for run in runs:
        spans.append(
            (
                state_time(run.id, "RUNNING"),
                state_time(run.id, "COMPLETED") or state_time(run.id, "FAILED"),
            )
        )
    edges = sorted([(s, 1) for s, _ in spans if s] + [(e, -1) for _, e in spans if e])
    running = most = 0
    for _, change in edges:
        running += change
        most = max(most, running)
    # The run that ran first (not the one created first: a burst's runs may start in any
    # order once the deployment's limit lets them), its trigger's commit to its metrics.
    first = min(runs, key=lambda r: state_time(r.id, "RUNNING") or datetime.max.replace(tzinfo=UTC))
    first_step = step_from_checkpoint(first.parameters["checkpoint"])
    first_commit = committed.get(first_step)
    created, pending = first.created, state_time(first.id, "PENDING")
    running_at = state_time(first.id, "RUNNING")
    first_metrics = next((c["metrics_s"] for c in checkpoints if c["step"] == first_step), None)
    breakdown = {
        "event -> flow run created (automation)": seconds(created, first_commit),
        "created -> picked up by the worker (poll)": seconds(pending, created),
        "picked up -> Running (process start, imports)": seconds(running_at, pending),
        "Running -> metrics on disk (experiment, slot, model build, restore, eval)": (
            None
            if first_metrics is None or first_commit is None or running_at is None
            else first_metrics - (running_at - first_commit).total_seconds()
        ),
    }
    metric_values = [c["metrics_s"] for c in checkpoints if c["metrics_s"] is not None]
    table_values = [c["table_s"] for c in checkpoints if c["table_s"] is not None]
    return {
        "checkpoints": checkpoints,
        "median_metrics_s": round(statistics.median(metric_values), 2) if metric_values else None,
        "median_table_s": round(statistics.median(table_values), 2) if table_values else None,
        "first_run_breakdown_s": {
            k: None if v is None else round(v, 2) for k, v in breakdown.items()
        },
        "evaluate_runs": sorted(r.name for r in runs),
        "most_running_at_once": most,
        "deployment_concurrency_limit": limit,
        "follow_seconds": args.follow_seconds,
        "worker_query_seconds": args.query_seconds,
        "cpus": os.cpu_count(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--epochs", type=int, default=3, help="x 2 checkpoints (default: 6)")
    parser.add_argument("--follow-seconds", type=float, default=60)
    parser.add_argument(
        "--query-seconds", type=float, default=1, help="PREFECT_WORKER_QUERY_SECONDS"
    )
    parser.add_argument("--idle-seconds", type=float, default=5)
    parser.add_argument("--limit-s", type=float, default=180)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    work = Path(tempfile.mkdtemp(prefix="bench-eval-latency-"))
    port = free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = {
        **os.environ,
        "PREFECT_HOME": str(work / "prefect-home"),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PYTHONPATH": str(REPO),
    }
    env.pop("PREFECT_API_URL", None)
    server = start(
        ["server", "start", "--host", "127.0.0.1", "--port", str(port), "--analytics-off"],
        {**env, "PREFECT_UI_API_URL": api},
        work / "server.log",
    )
    try:
        until(lambda: _healthy(f"{api}/health"), bool, "prefect server healthy", 120)
        env["PREFECT_API_URL"] = api
        os.environ.update(PREFECT_API_URL=api, PREFECT_HOME=env["PREFECT_HOME"])
        report = measure(args, work, env)
    except BaseException:
        print(f"failed: logs in {work} (server.log, worker.log)", file=sys.stderr)
        raise
    else:
        shutil.rmtree(work, ignore_errors=True)
    finally:
        stop(server)
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{'step':>5} {'commit->metrics s':>18} {'commit->table s':>16}")
    for row in report["checkpoints"]:
        print(f"{row['step']:>5} {_fmt(row['metrics_s']):>18} {_fmt(row['table_s']):>16}")
    print(f"median {report['median_metrics_s']:>17} {report['median_table_s']:>16}")
    print("first evaluate run:")
    for what, value in report["first_run_breakdown_s"].items():
        print(f"  {_fmt(value):>6} s  {what}")
    print(
        f"evaluate runs: {len(report['evaluate_runs'])}, at most {report['most_running_at_once']} "
        f"running at once (deployment limit {report['deployment_concurrency_limit']})"
    )
    for name in report["evaluate_runs"]:
        print(f"  {name}")


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except OSError:
        return False


if __name__ == "__main__":
    main()
