"""Where a partition's evaluation of a run stands, read from storage; and steps said briefly.

Why from storage: several evaluators (one per ``tml.checkpoint.committed`` event, a polling one
beside them) evaluate one run, and each used to summarise what *it* did. The newest summary
was then the one of whoever finished last -- usually a run that found everything done and
said "Reached the final checkpoint: False" with a single skipped row. The committed
checkpoints, their done-markers and metrics files are the one record every evaluator shares,
so a summary built from them is right whoever writes it.

Plain functions, no Prefect.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

from pydantic import BaseModel

from tml_checkpointing import is_done_eval, list_checkpoints, read_checkpoint_metrics
from tml_checkpointing.storage.filesystem import StorageOptions, invalidate_listing, resolve

from .run_info import RunInfoMissingError, read_run_info

RANGE = "\N{EN DASH}"
"""Between the first and last step of a range in a run's name (``steps 5\N{EN DASH}30``)."""


class CheckpointEvalStatus(BaseModel):
    """One committed checkpoint: evaluated on the partition (with its metrics) or pending."""

    step: int
    checkpoint: str
    status: Literal["evaluated", "pending"]
    metrics: dict[str, float] = {}


class EvalStatus(BaseModel):
    """Every committed checkpoint of a run and whether ``partition`` has evaluated it."""

    save_dir: str
    partition: str
    final_step: int | None
    checkpoints: list[CheckpointEvalStatus]

    @property
    def evaluated(self) -> list[int]:
        return [c.step for c in self.checkpoints if c.status == "evaluated"]

    @property
    def pending(self) -> list[int]:
        return [c.step for c in self.checkpoints if c.status == "pending"]

    @property
    def final_evaluated(self) -> bool:
        """The run's final checkpoint is committed and evaluated (nothing more will come)."""
        return self.final_step is not None and self.final_step in self.evaluated


def final_step(save_dir: str, storage_options: StorageOptions | None = None) -> int | None:
    """The run's last step (``run.json``), or ``None`` before the run wrote one."""
    try:
        return read_run_info(save_dir, storage_options).final_step
    except RunInfoMissingError:
        return None


def eval_status(
    save_dir: str, partition: str, storage_options: StorageOptions | None = None
) -> EvalStatus:
    """Every committed checkpoint of ``save_dir`` with its ``partition`` metrics or "pending"."""
    fs, path = resolve(save_dir, storage_options)
    invalidate_listing(fs, path)  # other processes commit and evaluate: no cached listing
    rows = []
    for checkpoint in list_checkpoints(save_dir, storage_options):
        done = is_done_eval(checkpoint.path, partition, storage_options=storage_options)
        metrics = (
            read_checkpoint_metrics(
                checkpoint.path, partition=partition, storage_options=storage_options
            )
            if done
            else {}
        )
        rows.append(
            CheckpointEvalStatus(
                step=checkpoint.step,
                checkpoint=checkpoint.path,
                status="evaluated" if done else "pending",
                metrics=metrics,
            )
        )
    return EvalStatus(
        save_dir=save_dir,
        partition=partition,
        final_step=final_step(save_dir, storage_options),
        checkpoints=rows,
    )


def describe_steps(steps: Sequence[int], committed: Sequence[int]) -> str:
    """``steps 5, 15-30`` (with an en dash, :data:`RANGE`): ``steps`` with each run of
    consecutive *committed* checkpoints as a range (``committed`` = every committed step; a
    step not in it stands alone).

    Ranges follow the run's checkpoints, not the integers: with a checkpoint every 5 steps,
    5, 10, 15 is ``steps 5-15``, and ``steps 5, 15`` says that 10 is not among them.
    """
    if not steps:
        return "no steps"
    index = {step: position for position, step in enumerate(sorted(set(committed)))}
    ordered = sorted(set(steps))
    groups: list[list[int]] = [[ordered[0]]]
    for step in ordered[1:]:
        previous = groups[-1][-1]
        if step in index and previous in index and index[step] == index[previous] + 1:
            groups[-1].append(step)
        else:
            groups.append([step])
    parts = [f"{g[0]}" if len(g) == 1 else f"{g[0]}{RANGE}{g[-1]}" for g in groups]
    return ("step " if len(ordered) == 1 else "steps ") + ", ".join(parts)
