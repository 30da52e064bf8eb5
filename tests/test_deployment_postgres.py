"""The deployments on the production setup: a Prefect server on PostgreSQL, two workers.

Why: on its default SQLite database, Prefect's server logs "database is locked" when a burst
of ``tml.checkpoint.committed`` events starts many ``evaluate`` runs at once (issue 20;
docs/deploy.md "In production"). Here the server keeps its state in a private PostgreSQL
(tests/helpers/postgres.py), the project is deployed as a user deploys it (work pool with a
concurrency limit, ``prefect --no-prompt deploy --all``), two process workers serve the pool,
and one ``train`` run commits a checkpoint every step: ten commits within seconds, each
starting an evaluate run through the deployment's trigger.

Checked, as outcomes (how many evaluate runs there are and what they are named is the
evaluate flow's business and may change): the train run Completed; every committed checkpoint
has its validation done-marker and metrics file, each evaluated exactly once (one task run
that really evaluated it, the metrics file never rewritten after it appeared); every
evaluate run ended Completed; the flow runs are rows of PostgreSQL; and the server's log has
no error, traceback, "database is locked" or deadlock.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from prefect.client.orchestration import SyncPrefectClient, get_client
from prefect.client.schemas.filters import (
    DeploymentFilter,
    DeploymentFilterId,
    TaskRunFilter,
    TaskRunFilterName,
)
from prefect.client.schemas.objects import FlowRun, StateType, TaskRun
from prefect.settings import PREFECT_API_URL, temporary_settings

from tml_checkpointing import get_checkpoints, is_done_eval, step_from_checkpoint

from .conftest import PrefectServer
from .helpers.deployed import (
    POOL,
    cli_env,
    deploy_all,
    kill_tree,
    poll,
    prefect,
    run_deployment,
    start_worker,
)
from .helpers.postgres import PostgresServer, postgres_server, prefect_server_on, server_errors

PARTITION = "validation"  # the evaluate deployment's partition (prefect.yaml)
# A checkpoint every step: 10 commits within a few seconds, each event starting a run.
CONFIG = {"epochs": 2, "steps_per_epoch": 5, "batch_size": 32, "seed": 7}
CHECKPOINT_EVERY_STEPS = 1
EXPECTED_CHECKPOINTS = 10
POOL_LIMIT = 4  # the train run and up to 3 evaluations at once (docs/deploy.md)
WORKERS = 2
# Event-started runs are created by the server's trigger service a moment after each event:
# "all finished" must hold this long, with no new run appearing, before it counts.
QUIET_S = 8.0


@dataclass(frozen=True)
class PostgresBackedPrefect:
    """A Prefect server on PostgreSQL: its API, its log, its database."""

    server: PrefectServer
    log_path: Path
    database: PostgresServer


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PostgresServer]:
    with postgres_server(tmp_path_factory.mktemp("postgres")) as server:
        yield server


@pytest.fixture(scope="module")
def prefect_on_postgres(
    postgres: PostgresServer, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[PostgresBackedPrefect]:
    log_path = tmp_path_factory.mktemp("prefect-postgres") / "server.log"
    with prefect_server_on(postgres, log_path) as server:
        # This process's client (the test's reads through the API) talks to it too.
        settings = temporary_settings(updates={PREFECT_API_URL: server.api_url})
        with settings:
            yield PostgresBackedPrefect(server=server, log_path=log_path, database=postgres)


@pytest.fixture
def workers(
    prefect_on_postgres: PostgresBackedPrefect, tmp_path: Path
) -> Iterator[list[subprocess.Popen[str]]]:
    """The project deployed (pool limited to POOL_LIMIT), then WORKERS process workers of the
    pool; each, with every flow-run process it started, killed after the test."""
    env = cli_env(prefect_on_postgres.server)
    deploy_all(env)
    prefect(["work-pool", "set-concurrency-limit", POOL, str(POOL_LIMIT)], env)
    started: list[subprocess.Popen[str]] = []
    try:
        for index in range(WORKERS):
            log = tmp_path / f"worker-{index}.log"
            started.append(start_worker(env, tmp_path / "worker-cwd", log))
        yield started
    finally:
        for worker in started:
            kill_tree(worker)


@pytest.mark.timeout(600)
def test_checkpoint_burst_on_postgres_with_two_workers(
    prefect_on_postgres: PostgresBackedPrefect,
    workers: list[subprocess.Popen[str]],
    tmp_path: Path,
) -> None:
    env = cli_env(prefect_on_postgres.server)
    save_dir = tmp_path / "run"
    config = {**CONFIG, "save_dir": str(save_dir), "checkpoint_every_steps": CHECKPOINT_EVERY_STEPS}
    started = time.monotonic()
    train_id = run_deployment(env, "train/train", "--param", f"config={json.dumps(config)}")

    def diagnostics() -> str:
        logs = sorted(tmp_path.glob("worker-*.log"))
        tails = "".join(f"\n--- {log.name}\n{log.read_text()[-4000:]}" for log in logs)
        server_log = prefect_on_postgres.log_path.read_text()[-4000:]
        return f"{tails}\n--- server.log\n{server_log}"

    with get_client(sync_client=True) as client:
        train = poll(
            lambda: client.read_flow_run(train_id),
            lambda run: run.state is not None and run.state.is_final(),
            "train run final",
            limit_s=300,
        )
        assert train.state is not None
        assert train.state.type == StateType.COMPLETED, f"{train.state!r}{diagnostics()}"
        trained_s = time.monotonic() - started

        checkpoints = get_checkpoints(str(save_dir))
        assert len(checkpoints) == EXPECTED_CHECKPOINTS, checkpoints
        metrics_seen: dict[str, tuple[int, int]] = {}  # path -> (inode, mtime) when first seen
        evaluate_runs = settled_evaluations(client, checkpoints, metrics_seen, diagnostics)
        print(
            f"postgres burst: train run {trained_s:.1f} s; every checkpoint evaluated and "
            f"every evaluate run ended (then {QUIET_S:.0f} s quiet) "
            f"{time.monotonic() - started:.1f} s after the run started; "
            f"{len(evaluate_runs)} evaluate runs"
        )

        for run in evaluate_runs:
            assert run.state is not None
            assert run.state.type == StateType.COMPLETED, f"{run.name}: {run.state!r}"

        # Exactly once: one task run per checkpoint really evaluated it (the others that
        # looked at it came back "Skipped"), and its metrics file was written once.
        task_runs = evaluation_task_runs(client)
        not_completed = [t for t in task_runs if t.state is None or not t.state.is_completed()]
        assert not not_completed, not_completed
        evaluated = Counter(
            t.name for t in task_runs if t.state is not None and t.state.name == "Completed"
        )
        steps = [step_from_checkpoint(c) for c in checkpoints]
        assert evaluated == {f"{PARTITION}-step-{step}": 1 for step in steps}, evaluated
        for checkpoint in checkpoints:
            assert is_done_eval(checkpoint, PARTITION), checkpoint
            metrics = Path(checkpoint) / "eval" / f"{PARTITION}.json"
            assert json.loads(metrics.read_text()), metrics
            assert identity(metrics) == metrics_seen[str(metrics)], f"{metrics} rewritten"

    # The runs are PostgreSQL's rows: the server really used it, not a SQLite file.
    rows = prefect_on_postgres.database.query("SELECT count(*) AS n FROM flow_run")
    assert rows[0]["n"] >= 1 + len(evaluate_runs), rows

    log = prefect_on_postgres.log_path.read_text()
    assert "prefect config set PREFECT_API_URL=" in log, log[-2000:]  # the server's own output
    assert server_errors(log) == [], "\n".join(server_errors(log))


def identity(path: Path) -> tuple[int, int]:
    """What changes when a file is written again (written by rename: a new inode)."""
    status = os.stat(path)
    return status.st_ino, status.st_mtime_ns


def settled_evaluations(
    client: SyncPrefectClient,
    checkpoints: list[str],
    metrics_seen: dict[str, tuple[int, int]],
    diagnostics: Callable[[], str],
) -> list[FlowRun]:
    """The evaluate runs once every checkpoint is done on the partition, every run has ended,
    and no new run appeared for QUIET_S seconds (runs are created by the server's trigger
    service after each event: no event of its own says the last one was created).

    Records each metrics file's identity the first time it is seen (``metrics_seen``)."""
    evaluate = client.read_deployment_by_name("evaluate/evaluate")
    last: dict[str, object] = {"key": None, "since": time.monotonic()}

    def read() -> tuple[list[FlowRun], bool, float]:
        for checkpoint in checkpoints:
            metrics = Path(checkpoint) / "eval" / f"{PARTITION}.json"
            if str(metrics) not in metrics_seen and is_done_eval(checkpoint, PARTITION):
                metrics_seen[str(metrics)] = identity(metrics)
        runs = client.read_flow_runs(
            deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[evaluate.id]))
        )
        finished = bool(runs) and all(r.state is not None and r.state.is_final() for r in runs)
        key = (frozenset(r.id for r in runs), finished)
        if key != last["key"]:
            last.update(key=key, since=time.monotonic())
        since = last["since"]
        assert isinstance(since, float)
        all_done = len(metrics_seen) == len(checkpoints)
        return runs, all_done and finished, time.monotonic() - since

    try:
        runs, _, _ = poll(
            read,
            lambda value: value[1] and value[2] >= QUIET_S,
            "every checkpoint evaluated and every evaluate run ended",
            limit_s=420,
        )
    except AssertionError as error:
        raise AssertionError(f"{error}{diagnostics()}") from None
    return runs


def evaluation_task_runs(client: SyncPrefectClient) -> list[TaskRun]:
    """Every task run of this server named ``<partition>-step-N``, page by page."""
    found: list[TaskRun] = []
    while True:
        page = client.read_task_runs(
            task_run_filter=TaskRunFilter(name=TaskRunFilterName(like_=f"{PARTITION}-step-")),
            limit=200,
            offset=len(found),
        )
        found += page
        if len(page) < 200:
            return found
