"""Per-partition "evaluated" markers, so trainers and evaluators coordinate through storage.

An evaluator that finished checkpoint ``<save_dir>/100`` on partition ``validation`` leaves the
empty file ``<save_dir>/100/evaled_by/validation_DONE`` (the original tml layout). The markers
live inside the checkpoint, so they move and get deleted with it.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import CheckpointNotFoundError, InvalidArgumentError, InvalidPartitionNameError
from ..format.layout import (
    DONE_SUFFIX,
    EVALUATED_BY_DIR,
    METRICS_FILE,
    done_marker_name,
    partition_metrics_name,
)
from ..storage.faults import reading, writing
from ..storage.filesystem import StorageOptions, invalidate_listing, join_url, replace_file, resolve
from .discovery import get_checkpoint, is_committed, step_from_checkpoint

logger = logging.getLogger(__name__)


def _validated_partition(partition: str) -> str:
    if (
        not isinstance(partition, str)
        or not partition
        or "/" in partition
        or partition
        in {
            ".",
            "..",
        }
    ):
        raise InvalidPartitionNameError(
            f"evaluation partition name must be a non-empty string without '/', got {partition!r}"
        )
    return partition


def done_marker_path(checkpoint: str, partition: str) -> str:
    """Where the done-marker of ``partition`` for ``checkpoint`` lives."""
    return join_url(checkpoint, done_marker_name(_validated_partition(partition)))


def mark_done_eval(
    checkpoint: str, partition: str, *, storage_options: StorageOptions | None = None
) -> None:
    """Record that ``partition`` has been evaluated on ``checkpoint``."""
    marker = done_marker_path(checkpoint, partition)
    fs, fs_marker = resolve(marker, storage_options)
    step_from_checkpoint(checkpoint)  # refuse paths that cannot be checkpoints
    if not is_committed(checkpoint, storage_options):
        raise CheckpointNotFoundError(
            f"cannot mark {checkpoint!r} as evaluated on {partition!r}: it is not a committed "
            "checkpoint"
        )
    with writing(f"the {partition} done-marker of {checkpoint}"):
        replace_file(fs, fs_marker, b"")


def is_done_eval(
    checkpoint: str, partition: str, *, storage_options: StorageOptions | None = None
) -> bool:
    """Whether ``partition`` has been evaluated on ``checkpoint``."""
    fs, fs_marker = resolve(done_marker_path(checkpoint, partition), storage_options)
    invalidate_listing(fs, fs_marker.rsplit("/", 1)[0])
    with reading(f"the {partition} done-marker of {checkpoint}"):
        try:
            fs.info(fs_marker)
        except FileNotFoundError:
            return False
    return True


def evaluated_partitions(
    checkpoint: str, *, storage_options: StorageOptions | None = None
) -> list[str]:
    """Names of the partitions that have marked ``checkpoint`` as evaluated, sorted."""
    fs, directory = resolve(join_url(checkpoint, EVALUATED_BY_DIR), storage_options)
    invalidate_listing(fs, directory)
    with reading(f"the done-markers of {checkpoint}"):
        try:
            names = fs.ls(directory, detail=False)
        except FileNotFoundError:
            return []
    return sorted(
        name.rsplit("/", 1)[-1][: -len(DONE_SUFFIX)] for name in names if name.endswith(DONE_SUFFIX)
    )


@dataclass(frozen=True)
class EvaluatorWaitResult:
    """What :func:`wait_for_evaluators` saw when it returned."""

    checkpoint: str
    finished: tuple[str, ...]
    pending: tuple[str, ...]

    @property
    def all_done(self) -> bool:
        return not self.pending

    def __bool__(self) -> bool:
        return self.all_done


def wait_for_evaluators(
    save_dir: str,
    partition_names: Iterable[str],
    global_step: int,
    timeout: float,
    *,
    poll_seconds: float = 10,
    storage_options: StorageOptions | None = None,
) -> EvaluatorWaitResult:
    """Wait until every partition has marked the checkpoint at ``global_step`` evaluated.

    Returns on success or after ``timeout`` seconds, with which partitions finished and
    which did not. The caller's ``partition_names`` is never modified (the original popped
    from it).
    """
    partitions = tuple(dict.fromkeys(_validated_partition(p) for p in partition_names))
    deadline = time.monotonic() + timeout
    checkpoint = ""
    finished: set[str] = set()
    while True:
        if not checkpoint:
            checkpoint = get_checkpoint(
                save_dir, global_step, missing_ok=True, storage_options=storage_options
            )
        if checkpoint:
            for partition in partitions:
                if partition not in finished and is_done_eval(
                    checkpoint, partition, storage_options=storage_options
                ):
                    logger.info("Partition %s finished evaluating %s.", partition, checkpoint)
                    finished.add(partition)
        pending = tuple(p for p in partitions if p not in finished)
        if not pending or time.monotonic() + poll_seconds > deadline:
            break
        time.sleep(poll_seconds)
    result = EvaluatorWaitResult(
        checkpoint=checkpoint or join_url(save_dir, str(global_step)),
        finished=tuple(p for p in partitions if p in finished),
        pending=pending,
    )
    if pending:
        logger.warning(
            "Evaluators not finished on step %s after %ss: %s", global_step, timeout, pending
        )
    return result


def metrics_path(checkpoint: str, partition: str | None = None) -> str:
    """``<checkpoint>/metrics.json``, or ``<checkpoint>/eval/<partition>.json`` for a partition.

    One file per partition: evaluators of different partitions never write the same file,
    so they cannot lose each other's updates.
    """
    if partition is None:
        return join_url(checkpoint, METRICS_FILE)
    return join_url(checkpoint, partition_metrics_name(_validated_partition(partition)))


def write_checkpoint_metrics(
    checkpoint: str,
    metrics: Mapping[str, float],
    *,
    partition: str | None = None,
    storage_options: StorageOptions | None = None,
) -> dict[str, float]:
    """Merge ``metrics`` into the checkpoint's metrics file (what ``keep_best`` ranks by).

    With ``partition``, into ``eval/<partition>.json`` (what the evaluate flow writes; read
    back by :func:`read_checkpoint_metrics` as ``"<partition>/<name>"``), else into
    ``metrics.json``. Written after commit by evaluators, like done-markers, so not covered by
    the integrity sidecar. The file is replaced whole (temp + rename on local disk, one PUT on
    object stores), so readers never see half a file. Merging is read-modify-write: two writers
    of the same file at the same instant may lose one update (one writer per partition avoids
    that). Returns the merged metrics of that file.
    """
    step_from_checkpoint(checkpoint)
    if not is_committed(checkpoint, storage_options):
        raise CheckpointNotFoundError(
            f"cannot write metrics for {checkpoint!r}: it is not a committed checkpoint"
        )
    fs, path = resolve(metrics_path(checkpoint, partition), storage_options)
    merged = _read_metrics_file(fs, path)
    for name, value in metrics.items():
        if not isinstance(name, str) or not name:
            raise InvalidArgumentError(f"metric names must be non-empty strings, got {name!r}")
        try:
            merged[name] = float(value)
        except (TypeError, ValueError):
            raise InvalidArgumentError(
                f"metric {name!r} must be a number, got {type(value).__name__} {value!r}"
            ) from None
    with writing(f"the metrics of {checkpoint}"):
        replace_file(fs, path, json.dumps(merged, sort_keys=True).encode())
    return merged


def read_checkpoint_metrics(
    checkpoint: str,
    *,
    partition: str | None = None,
    storage_options: StorageOptions | None = None,
) -> dict[str, float]:
    """The metrics evaluators recorded for ``checkpoint`` (``{}`` when none or unreadable).

    With ``partition``: that partition's metrics. Without: ``metrics.json`` merged with every
    partition's metrics under ``"<partition>/<name>"`` (e.g. ``"validation/loss"``).
    """
    fs, path = resolve(metrics_path(checkpoint, partition), storage_options)
    invalidate_listing(fs, path.rsplit("/", 1)[0])
    if partition is not None:
        return _read_metrics_file(fs, path)
    merged = _read_metrics_file(fs, path)
    directory = metrics_path(checkpoint, "_").rsplit("/", 1)[0]
    _, directory = resolve(directory, storage_options)
    with reading(f"the metrics of {checkpoint}"):
        try:
            names = fs.ls(directory, detail=False)
        except FileNotFoundError:
            names = []
    for name in sorted(names):
        base = name.rstrip("/").rsplit("/", 1)[-1]
        if base.endswith(".json"):
            prefix = base[: -len(".json")]
            for key, value in _read_metrics_file(fs, name).items():
                merged[f"{prefix}/{key}"] = value
    return merged


def _read_metrics_file(fs: Any, path: str) -> dict[str, float]:
    try:
        with reading(f"metrics file {path}"):
            raw = fs.cat_file(path)
        body = json.loads(raw)
    except FileNotFoundError:
        return {}
    except (ValueError, UnicodeDecodeError) as error:
        logger.warning("Ignoring unreadable %s: %s", path, error)
        return {}
    if not isinstance(body, dict):
        logger.warning("Ignoring %s: expected a JSON object of metrics", path)
        return {}
    return {
        str(k): float(v)
        for k, v in body.items()
        if isinstance(v, int | float) and not isinstance(v, bool)
    }
