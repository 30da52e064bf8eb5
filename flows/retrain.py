"""The ``retrain`` flow: a new dated run, warm-started from the previous run's latest weights.

Meant for a schedule (``retrain-nightly`` in prefect.yaml). Each run gets its own directory
``<runs_dir>/<UTC date-time of the scheduled start>``, so a retry of the same scheduled run
lands in the same directory and resumes instead of starting over. The lineage (previous run,
checkpoint used for the warm start) is decided once, written to ``<run_dir>/lineage.json``
before training, and reused on resume: a resumed retrain warm-starts from exactly the same
weights. The first run ever starts from scratch.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.evaluate import DEFAULT_PARAMS as DEFAULT_EVAL
from flows.evaluate import evaluate
from flows.train import train
from tasks.naming import artifact_key, experiment, flow_run_namer
from tml_checkpointing import get_checkpoint, join_url
from tml_checkpointing.format.layout import LINEAGE
from tml_checkpointing.storage.filesystem import StorageOptions, replace_file, resolve
from training.config import RunParams, TrainConfig
from training.evaluation import EvalParams
from training.session import close_session
from training.start import check_run_start

LINEAGE_NAME = LINEAGE  # the name itself lives in tml_checkpointing.format.layout


class Lineage(BaseModel):
    run_dir: str
    previous_run: str | None
    warm_start_checkpoint: str | None
    flow_run_id: str | None = None
    created_at: str
    final_checkpoint: str | None = None
    metrics: dict[str, dict[str, float]] = {}


DEFAULT_RUN = RunParams()  # frozen: one shared default


@flow(name="retrain", flow_run_name=flow_run_namer("retrain", "runs_dir", "run.epochs"))
def retrain(
    runs_dir: str,
    run: RunParams = DEFAULT_RUN,
    eval_partitions: list[str] | None = None,
    eval_steps: int | None = None,
    run_name: str | None = None,
) -> Lineage:
    """Train a new run under ``runs_dir``, warm-started from the previous one, and evaluate it.

    Args:
        runs_dir: Directory (path or fsspec URL) holding one sub-directory per run; its
            filesystem takes ``run.storage_options``.
        run: The new run's parameters, as the ``train`` flow's ``config`` less ``save_dir``
            and ``initial_checkpoint``, which this flow decides (training/config.py).
        eval_partitions: Partitions evaluated on the new run's final checkpoint (default:
            ``validation``).
        eval_steps: Batches evaluated per partition (empty: the ``evaluate`` flow's default).
        run_name: Name of the new run's directory (default: the scheduled start, UTC, e.g.
            ``2026-11-30T0200``); a rerun with the same name resumes that run.
    """
    storage_options = run.storage_options
    logger = get_run_logger()
    partitions = [DEFAULT_EVAL.partition] if eval_partitions is None else eval_partitions
    name = run_name or dated_run_name(flow_run.get_scheduled_start_time())
    run_dir = join_url(runs_dir, name)
    lineage = read_lineage(run_dir, storage_options)
    if lineage is None:
        previous = previous_run(runs_dir, name, storage_options)
        lineage = Lineage(
            run_dir=run_dir,
            previous_run=previous,
            warm_start_checkpoint=get_checkpoint(
                previous, missing_ok=True, storage_options=storage_options
            )
            or None
            if previous
            else None,
            flow_run_id=str(flow_run.get_id()),
            created_at=datetime.now(UTC).isoformat(),
        )
        # A start train would refuse (a recipe that does not import, ...) writes nothing at all.
        config = train_config(run, run_dir, lineage.warm_start_checkpoint)
        try:
            check_run_start(config)
        except BaseException:
            close_session(config)
            raise
        write_lineage(lineage, storage_options)
    logger.info(
        "Run %s: %s", run_dir, f"warm start from {lineage.warm_start_checkpoint}"
        if lineage.warm_start_checkpoint else "first run, from scratch"
    )  # fmt: skip
    trained = train(train_config(run, run_dir, lineage.warm_start_checkpoint))
    lineage.final_checkpoint = trained.checkpoint
    for partition in partitions:
        # The run has ended: its final checkpoint is there, so no long wait and fast polls.
        given: dict[str, Any] = {} if eval_steps is None else {"eval_steps": eval_steps}
        params = EvalParams(
            partition=partition,
            timeout=60,
            poll_seconds=1,
            storage_options=storage_options,
            **given,
        )
        summary = evaluate(run_dir, params)
        final = [r for r in summary.results if r.checkpoint == trained.checkpoint]
        if final:
            lineage.metrics[partition] = final[0].metrics
    write_lineage(lineage, storage_options)
    before = read_lineage(lineage.previous_run, storage_options) if lineage.previous_run else None
    create_markdown_artifact(
        key=artifact_key("retrain-lineage", experiment(runs_dir)),
        markdown=lineage_markdown(lineage, before),
        description="Retraining lineage, and how this run compares with the previous one",
    )
    return lineage


def train_config(run: RunParams, run_dir: str, warm_start: str | None) -> TrainConfig:
    """The ``train`` flow's config of the new run: ``run``, stored in ``run_dir``."""
    return TrainConfig(**run.model_dump(), save_dir=run_dir, initial_checkpoint=warm_start)


def lineage_markdown(lineage: Lineage, previous: Lineage | None) -> str:
    """The lineage artifact: where this run came from, and each metric beside the previous
    run's (what a person checks every morning: did the nightly model get better?)."""
    lines = [
        f"# Retraining `{lineage.run_dir}`\n",
        f"- previous run: `{lineage.previous_run or 'none (first run)'}`",
        f"- warm start from: `{lineage.warm_start_checkpoint or 'scratch'}`",
        f"- final checkpoint: `{lineage.final_checkpoint}`\n",
    ]
    if lineage.metrics:
        lines += ["| metric | this run | previous run | change |", "|---|---|---|---|"]
        for partition, metrics in sorted(lineage.metrics.items()):
            before = previous.metrics.get(partition, {}) if previous else {}
            for name, value in sorted(metrics.items()):
                old = before.get(name)
                change = "" if old is None else f"{value - old:+.4f}"
                shown = "n/a" if old is None else f"{old:.4f}"
                lines.append(f"| {partition}/{name} | {value:.4f} | {shown} | {change} |")
    return "\n".join(lines) + "\n"


def dated_run_name(when: datetime | None) -> str:
    """Sortable UTC name of a run, from its scheduled start (stable across retries)."""
    moment = (when or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y%m%dT%H%M%SZ")


def previous_run(
    runs_dir: str, current_name: str, storage_options: StorageOptions | None = None
) -> str | None:
    """The newest run before ``current_name`` that has a committed checkpoint."""
    fs, root = resolve(runs_dir, storage_options)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return None
    names = sorted(
        entry["name"].rstrip("/").rsplit("/", 1)[-1]
        for entry in entries
        if entry["type"] == "directory"
    )
    for name in reversed([n for n in names if n < current_name]):
        candidate = join_url(runs_dir, name)
        if get_checkpoint(candidate, missing_ok=True, storage_options=storage_options):
            return candidate
    return None


def read_lineage(run_dir: str, storage_options: StorageOptions | None = None) -> Lineage | None:
    fs, path = resolve(join_url(run_dir, LINEAGE_NAME), storage_options)
    try:
        return Lineage.model_validate(json.loads(fs.cat_file(path)))
    except FileNotFoundError:
        return None


def write_lineage(lineage: Lineage, storage_options: StorageOptions | None = None) -> None:
    fs, path = resolve(join_url(lineage.run_dir, LINEAGE_NAME), storage_options)
    replace_file(fs, path, lineage.model_dump_json(indent=2).encode())
