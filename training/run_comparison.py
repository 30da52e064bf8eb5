"""The runs under one root, side by side: their parameters, losses and best checkpoints.

Why: a person who trained the same model with two learning rates (or a nightly ``retrain``
that adds a dated run every day) wants one table with a row per run -- what it was trained
with, where its evaluation loss ended, where it was best and which checkpoint that is -- and
one chart with every run's curve, instead of opening each run's page. Read from storage alone
(``run.json`` and the files next to each checkpoint, :mod:`.checkpoint_table`), so it needs no
Prefect and agrees with ``tml checkpoints list``: the best checkpoint is chosen by the
library's one rule (:mod:`tml_checkpointing.catalog.best`).

A run is a directory directly under the root that has a ``run.json``; anything else there
(``lineage.json`` files, a run whose first start has not recorded itself yet) is left out.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

from matplotlib import pyplot
from pydantic import BaseModel, Field

from tml_checkpointing import join_url
from tml_checkpointing.catalog.best import best_metric
from tml_checkpointing.storage.faults import reading
from tml_checkpointing.storage.filesystem import StorageOptions, resolve

from .checkpoint_table import CheckpointRow, best_row, checkpoint_rows, run_step_losses
from .loss_curve import draw_run, finish
from .run_info import RunInfo, RunInfoInvalidError, find_run_info

logger = logging.getLogger(__name__)


class ComparedRun(BaseModel):
    """One run of the comparison: its row in the table, and its checkpoints for the chart."""

    run: str = Field(description="the run's directory name")
    save_dir: str
    info: RunInfo
    rows: list[CheckpointRow]

    @property
    def metric(self) -> str | None:
        """The evaluation loss the run is judged by (``validation/loss`` when evaluated)."""
        return best_metric(name for row in self.rows for name in row.eval_metrics)

    @property
    def best(self) -> CheckpointRow | None:
        return best_row(self.rows)

    @property
    def final(self) -> CheckpointRow | None:
        """The newest checkpoint evaluated on :attr:`metric`."""
        metric = self.metric
        return next((row for row in reversed(self.rows) if metric in row.eval_metrics), None)

    def as_table_row(self) -> dict[str, object]:
        """The run's row: parameters (from its latest ``run.json`` segment), then its losses."""
        segment = self.info.current
        metric, best, final = self.metric, self.best, self.final
        trained = run_step_losses(self.rows)
        # What a person compares first stays on screen: the run, the parameter most often
        # varied, the losses; then the other parameters, then the paths.
        return {
            "run": self.run,
            "lr": segment.lr,
            "best eval loss": _value(best, metric),
            "best step": None if best is None else best.step,
            "final eval loss": _value(final, metric),
            "final train loss": round(trained[-1][1], 5) if trained else None,
            "batch_size": segment.batch_size,
            "epochs": self.info.epochs,
            "steps_per_epoch": segment.steps_per_epoch,
            "seed": segment.seed,
            "world_size": segment.world_size,
            "recipe": segment.recipe,
            "eval metric": metric,
            "checkpoints": len(self.rows),
            "best checkpoint": None if best is None else best.path,
            "save_dir": self.save_dir,
        }


def compare_runs(
    runs_root: str, storage_options: StorageOptions | None = None
) -> list[ComparedRun]:
    """Every run directly under ``runs_root``, by name; ``[]`` when the root does not exist.

    A run whose ``run.json`` is not a run record is left out with a warning: one broken run
    must not hide the comparison of the others.
    """
    runs = []
    for name in _directories(runs_root, storage_options):
        save_dir = join_url(runs_root, name)
        try:
            info = find_run_info(save_dir, storage_options)
        except RunInfoInvalidError as error:
            logger.warning("Run %s left out of the comparison: %s", save_dir, error)
            continue
        if info is None:
            continue
        rows = checkpoint_rows(save_dir, storage_options)
        runs.append(ComparedRun(run=name, save_dir=save_dir, info=info, rows=rows))
    return runs


def comparison_png(runs: Sequence[ComparedRun], title: str) -> bytes:
    """One chart of every run: its train loss by step (line) and its evaluation losses at its
    checkpoints (points), one colour per run, the legend naming the runs."""
    figure, axes = pyplot.subplots(figsize=(7.2, 4.0), dpi=100)
    try:
        colours = pyplot.get_cmap("tab10")
        drawn = False
        for index, run in enumerate(runs):
            colour = colours(index % 10)
            drawn = draw_run(axes, run.rows, name=run.run, color=colour) or drawn
        return finish(figure, axes, title, legend=drawn)
    finally:
        pyplot.close(figure)


def _directories(root: str, storage_options: StorageOptions | None) -> list[str]:
    fs, path = resolve(root, storage_options)
    try:
        with reading(f"the runs under {root}"):
            entries = fs.ls(path, detail=True)
    except FileNotFoundError:
        return []
    return sorted(
        entry["name"].rstrip("/").rsplit("/", 1)[-1]
        for entry in entries
        if entry.get("type") == "directory"
    )


def _value(row: CheckpointRow | None, metric: str | None) -> float | None:
    if row is None or metric is None or metric not in row.eval_metrics:
        return None
    return round(row.eval_metrics[metric], 5)
