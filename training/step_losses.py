"""``<checkpoint>/train_losses.json``: the training loss of every step since the checkpoint before.

Why: ``metrics.json`` holds one mean loss per checkpoint, so a curve drawn from it has a point
every few hundred steps and hides what happened between. The loop keeps each step's loss in
memory (a float per step, no I/O) and writes them once per committed checkpoint, next to it,
beside ``metrics.json``; readers join the files of a run's checkpoints into one step-level
curve. A resumed run finds the steps of its earlier attempts in their checkpoints; a pruned
checkpoint takes its steps with it (the curve has a gap there, nothing else breaks). One file
per checkpoint, written after commit (not covered by the integrity sidecar, like the metrics).

The format: ``{"first_step": 5, "losses": [0.61, 0.60, ...]}``, the steps being consecutive.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Iterable, Sequence

from tml_checkpointing import join_url
from tml_checkpointing.format.layout import STEP_LOSSES_FILE
from tml_checkpointing.storage.faults import reading, writing
from tml_checkpointing.storage.filesystem import StorageOptions, replace_file, resolve

logger = logging.getLogger(__name__)


def write_step_losses(
    checkpoint: str,
    first_step: int,
    losses: Sequence[float],
    storage_options: StorageOptions | None = None,
) -> None:
    """Replace the checkpoint's step losses: ``losses[i]`` is the loss of ``first_step + i``.

    Call it for a committed checkpoint only (the loop does, after the metrics of the same
    checkpoint were recorded): the file is replaced whole, never seen half written.
    """
    body = {"first_step": first_step, "losses": [float(loss) for loss in losses]}
    fs, path = resolve(join_url(checkpoint, STEP_LOSSES_FILE), storage_options)
    with writing(f"the step losses of {checkpoint}"):
        replace_file(fs, path, json.dumps(body).encode())


def read_step_losses(
    checkpoint: str, storage_options: StorageOptions | None = None
) -> list[tuple[int, float]]:
    """``[(step, loss), ...]`` recorded next to ``checkpoint``; ``[]`` when none (a checkpoint
    written before step losses were recorded) or unreadable (logged: a curve is no reason to
    fail a table)."""
    fs, path = resolve(join_url(checkpoint, STEP_LOSSES_FILE), storage_options)
    try:
        with reading(f"the step losses of {checkpoint}"):
            raw = fs.cat_file(path)
    except FileNotFoundError:
        return []
    try:
        body = json.loads(raw)
        first = body["first_step"]
        losses = body["losses"]
        if isinstance(first, bool) or not isinstance(first, int) or not isinstance(losses, list):
            raise ValueError("first_step must be an integer and losses a list")
        return [(first + i, float(loss)) for i, loss in enumerate(losses)]
    except (ValueError, TypeError, KeyError, RecursionError) as error:
        logger.warning("Ignoring unreadable %s/%s: %s", checkpoint, STEP_LOSSES_FILE, error)
        return []


def step_curve(per_checkpoint: Iterable[Sequence[tuple[int, float]]]) -> list[tuple[int, float]]:
    """One curve, by step, from the step losses of a run's checkpoints (oldest first).

    Should two checkpoints claim a step, the later one wins: it is the trajectory the run went
    on with. NaN and infinite losses are left out (they would hide the rest of the curve).
    """
    by_step: dict[int, float] = {}
    for losses in per_checkpoint:
        for step, loss in losses:
            if math.isfinite(loss):
                by_step[step] = loss
    return sorted(by_step.items())
