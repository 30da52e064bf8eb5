"""The ``retrain`` flow: a new dated run, warm-started from the previous run's latest weights.

Meant for a schedule (``retrain-nightly`` in prefect.yaml). Each run gets its own directory
``<runs_dir>/<UTC date-time of the scheduled start>``, so a retry of the same scheduled run
lands in the same directory and resumes instead of starting over. The lineage (previous run,
checkpoint used for the warm start) is decided once, written to ``<run_dir>/lineage.json``
before training, and reused on resume: a resumed retrain warm-starts from exactly the same
weights. The first run ever starts from scratch.

The warm start is the newest checkpoint of the previous run that *verifies* (every byte read
and checked against its integrity sidecar): a corrupt one -- a flipped byte, a truncated file --
is skipped with a warning naming it and why, and the one before is used; a previous run with
no valid checkpoint at all is skipped for the run before it, and with none anywhere the run
starts from scratch (also said in a warning). One bad checkpoint must not fail every later
nightly run. A warm start already recorded in ``lineage.json`` (a retry of the same dated run)
is kept, unless the run has no checkpoint of its own yet and the recorded one no longer
verifies: then it is chosen again the same way, and the lineage records the new choice.
"""

from __future__ import annotations

import json
import logging
from datetime import UTC, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact
from prefect.runtime import flow_run
from pydantic import BaseModel

from flows.comparison import publish_comparison
from flows.evaluate import DEFAULT_PARAMS as DEFAULT_EVAL
from flows.evaluate import evaluate
from flows.train import train
from tasks.naming import artifact_key
from tml_checkpointing import get_checkpoint, join_url
from tml_checkpointing.errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
)
from tml_checkpointing.format.layout import LINEAGE
from tml_checkpointing.reading.verify import get_latest_valid_checkpoint, verify_checkpoint
from tml_checkpointing.storage.faults import reading
from tml_checkpointing.storage.filesystem import StorageOptions, replace_file, resolve
from training.config import RunParams, TrainConfig, TrainOptions
from training.evaluation import EvalParams
from training.experiment import derived_experiment
from training.run_info import RunConfigChangedError, find_run_info, reconcile_run_info
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


def retrain_run_name() -> str:
    """``retrain · nightly-5e0b2f · 20261207T020000Z``: which runs root, and which dated run
    (the ``run_name`` given, else the scheduled start), readable in the runs list."""
    parameters = flow_run.parameters
    runs_dir = str(parameters.get("runs_dir") or "?")
    run = parameters.get("run")
    options = (
        run.get("storage_options")
        if isinstance(run, dict)
        else getattr(run, "storage_options", None)
    )
    try:
        root = derived_experiment(runs_dir, options)
    except CheckpointError:
        root = runs_dir.rstrip("/").rsplit("/", 1)[-1]
    name = parameters.get("run_name") or dated_run_name(flow_run.get_scheduled_start_time())
    return f"retrain · {root} · {name}"


@flow(name="retrain", flow_run_name=retrain_run_name)
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
            ``20261130T020000Z``); a rerun with the same name resumes that run.
    """
    storage_options = run.storage_options
    logger = get_run_logger()
    partitions = [DEFAULT_EVAL.partition] if eval_partitions is None else eval_partitions
    name = run_name or dated_run_name(flow_run.get_scheduled_start_time())
    run_dir = join_url(runs_dir, name)
    lineage = read_lineage(run_dir, storage_options)
    options = TrainOptions()
    if lineage is not None and not _warm_start_holds(lineage, storage_options, logger):
        # Retrying a run that never got a checkpoint of its own, whose recorded warm start
        # is now corrupt or gone: choose again. Its run.json (if the first try got that far)
        # records the old warm start; only that one difference is allowed to change.
        previous, warm_start = choose_warm_start(runs_dir, name, storage_options, logger)
        chosen = lineage.model_copy(
            update={"previous_run": previous, "warm_start_checkpoint": warm_start}
        )
        config = train_config(run, run_dir, chosen.warm_start_checkpoint)
        if _only_the_warm_start_changed(config):
            options = TrainOptions(allow_changed_config=True)
        _check_start(config, options)
        lineage = chosen
        write_lineage(lineage, storage_options)
    if lineage is None:
        previous, warm_start = choose_warm_start(runs_dir, name, storage_options, logger)
        lineage = Lineage(
            run_dir=run_dir,
            previous_run=previous,
            warm_start_checkpoint=warm_start,
            flow_run_id=str(flow_run.get_id()),
            created_at=datetime.now(UTC).isoformat(),
        )
        # A start train would refuse (a recipe that does not import, ...) writes nothing at all.
        _check_start(train_config(run, run_dir, lineage.warm_start_checkpoint), options)
        write_lineage(lineage, storage_options)
    logger.info(
        "Run %s: %s", run_dir, f"warm start from {lineage.warm_start_checkpoint}"
        if lineage.warm_start_checkpoint else "first run, from scratch"
    )  # fmt: skip
    trained = train(train_config(run, run_dir, lineage.warm_start_checkpoint), options)
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
        key=artifact_key("retrain-lineage", derived_experiment(runs_dir, storage_options)),
        markdown=lineage_markdown(lineage, before),
        description="Retraining lineage, and how this run compares with the previous one",
    )
    publish_comparison(
        runs_dir,
        storage_options,
        key_name=derived_experiment(runs_dir, storage_options),
        moment=f"after the retrain of {name}",
    )
    return lineage


def _check_start(config: TrainConfig, options: TrainOptions) -> None:
    """What ``train`` would refuse, refused before anything is written (lineage.json)."""
    try:
        check_run_start(config, allow_changed_config=options.allow_changed_config)
    except BaseException:
        close_session(config)
        raise


def choose_warm_start(
    runs_dir: str,
    current_name: str,
    storage_options: StorageOptions | None = None,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger] | None = None,
) -> tuple[str | None, str | None]:
    """``(previous run, its newest checkpoint that verifies)`` for the run ``current_name``.

    Runs before ``current_name`` are tried newest first; in each, committed checkpoints newest
    first, each verified in full (every byte read and checksummed: a same-size flipped byte
    is found too). Every checkpoint or run skipped is logged as a WARNING with the reason.
    ``(None, None)``: no earlier run has a checkpoint that verifies; the run starts fresh. A
    storage fault (unreadable, not judged corrupt) raises instead of skipping anything.
    """
    log = logger or logging.getLogger(__name__)
    for candidate in earlier_runs(runs_dir, current_name, storage_options):
        committed = get_checkpoint(candidate, missing_ok=True, storage_options=storage_options)
        if not committed:
            continue  # never trained a checkpoint: not a run to warm-start from
        valid = get_latest_valid_checkpoint(
            candidate, verify="full", storage_options=storage_options
        )
        if valid:
            if valid != committed:
                log.warning(
                    "Warm start from %s: the newer checkpoint(s) of %s do not verify (skipped, "
                    "see the warnings above; `tml checkpoints verify %s` shows why).",
                    valid,
                    candidate,
                    candidate,
                )
            return candidate, valid
        log.warning(
            "Previous run %s has no checkpoint that verifies (its newest, %s, and every older "
            "one are corrupt or gone); looking at the run before it.",
            candidate,
            committed,
        )
    return None, None


def _warm_start_holds(
    lineage: Lineage,
    storage_options: StorageOptions | None,
    logger: logging.Logger | logging.LoggerAdapter[logging.Logger],
) -> bool:
    """Whether a resumed run keeps its recorded warm start: yes once the run has a checkpoint
    of its own (it resumes from that, the warm start no longer matters), or while the
    recorded checkpoint still verifies in full."""
    recorded = lineage.warm_start_checkpoint
    if recorded is None or get_checkpoint(
        lineage.run_dir, missing_ok=True, storage_options=storage_options
    ):
        return True
    try:
        verify_checkpoint(recorded, level="full", storage_options=storage_options)
    except (CorruptCheckpointError, CheckpointNotFoundError) as error:
        logger.warning(
            "The recorded warm start of %s, %s, can no longer be used (%s); choosing again.",
            lineage.run_dir,
            recorded,
            error,
        )
        return False
    return True


def _only_the_warm_start_changed(config: TrainConfig) -> bool:
    """Whether ``config`` differs from the run's ``run.json`` in its warm start alone."""
    stored = find_run_info(config.save_dir, config.storage_options)
    try:
        reconcile_run_info(stored, config, 0)
    except RunConfigChangedError as changed:
        return set(changed.changes) == {"initial_checkpoint"}
    return False


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


def earlier_runs(
    runs_dir: str, current_name: str, storage_options: StorageOptions | None = None
) -> list[str]:
    """The run directories under ``runs_dir`` named before ``current_name``, newest first."""
    fs, root = resolve(runs_dir, storage_options)
    try:
        entries = fs.ls(root, detail=True)
    except FileNotFoundError:
        return []
    names = sorted(
        entry["name"].rstrip("/").rsplit("/", 1)[-1]
        for entry in entries
        if entry["type"] == "directory"
    )
    return [join_url(runs_dir, name) for name in reversed(names) if name < current_name]


def previous_run(
    runs_dir: str, current_name: str, storage_options: StorageOptions | None = None
) -> str | None:
    """The newest run before ``current_name`` that has a committed checkpoint (valid or not;
    :func:`choose_warm_start` picks the one to warm-start from)."""
    for candidate in earlier_runs(runs_dir, current_name, storage_options):
        if get_checkpoint(candidate, missing_ok=True, storage_options=storage_options):
            return candidate
    return None


class LineageInvalidError(CheckpointError, ValueError):
    """``<run_dir>/lineage.json`` exists but is not a lineage record (bad input: exit 2)."""


def read_lineage(run_dir: str, storage_options: StorageOptions | None = None) -> Lineage | None:
    fs, path = resolve(join_url(run_dir, LINEAGE_NAME), storage_options)
    try:
        with reading(f"{run_dir}/{LINEAGE_NAME}"):
            raw = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return Lineage.model_validate(json.loads(raw))
    except (ValueError, RecursionError) as error:  # ValidationError is a ValueError
        reason = " ".join(str(error).split())[:300]
        raise LineageInvalidError(
            f"{run_dir}/{LINEAGE_NAME} is not a lineage record ({reason}); retrain writes it "
            "when a run starts. Restore it, remove it to decide the warm start again, or give "
            "another --run-name."
        ) from None


def write_lineage(lineage: Lineage, storage_options: StorageOptions | None = None) -> None:
    fs, path = resolve(join_url(lineage.run_dir, LINEAGE_NAME), storage_options)
    replace_file(fs, path, lineage.model_dump_json(indent=2).encode())
