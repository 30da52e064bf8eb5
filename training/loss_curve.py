"""The loss curve of a run as a PNG: training loss of every step, evaluation losses at each
checkpoint, the best checkpoint marked.

Why: the first thing an ML engineer looks for on a run's page is whether the loss goes down,
whether validation follows, and where it was best. Drawn from the checkpoint table
(:mod:`.checkpoint_table`): the step losses recorded next to each checkpoint, so a resumed run's
curve still covers the steps an earlier attempt trained, and the evaluators' losses as points
(one per evaluated checkpoint). The comparison across runs (:mod:`.run_comparison`) draws each
run with the same functions, one colour per run.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot

from matplotlib import pyplot
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.typing import ColorType

from tml_checkpointing.catalog.best import BEST_MARK, best_metric, is_loss_metric

from .checkpoint_table import CheckpointRow, best_row, run_step_losses


def loss_curve_png(rows: Sequence[CheckpointRow], title: str) -> bytes:
    """A small PNG (about 30 KB) of the step-level train loss and every ``<partition>/loss``."""
    figure, axes = pyplot.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        drawn = draw_run(axes, rows)
        best = best_row(rows)
        metric = best_metric(name for row in rows for name in row.eval_metrics)
        if best is not None and metric is not None:
            axes.plot(
                [best.step],
                [best.eval_metrics[metric]],
                linestyle="none",
                marker="*",
                markersize=14,
                color="gold",
                markeredgecolor="black",
                label=f"{BEST_MARK}: step {best.step}, {metric} {best.eval_metrics[metric]:.4f}",
            )
        return finish(figure, axes, title, legend=drawn)
    finally:
        pyplot.close(figure)


def draw_run(
    axes: Axes,
    rows: Sequence[CheckpointRow],
    name: str | None = None,
    color: ColorType | None = None,
) -> bool:
    """Draw one run on ``axes``: train loss by step as a line, each evaluation loss as points
    at its checkpoints. In a comparison, ``name`` labels the run's line (its only legend
    entry: one colour per run, ``color``); alone, each curve has its own colour and label.
    Whether anything was drawn."""
    trained = run_step_losses(rows)
    if trained:
        steps, losses = zip(*trained, strict=True)
        axes.plot(steps, losses, linewidth=1, color=color, label=name or "train loss")
    partitions = sorted({n for r in rows for n in r.eval_metrics if is_loss_metric(n)})
    markers = "osD^v"
    for index, metric in enumerate(partitions):
        points = [(r.step, r.eval_metrics[metric]) for r in rows if metric in r.eval_metrics]
        axes.plot(
            *zip(*points, strict=True),
            linestyle=":" if color else "--",
            linewidth=1,
            marker=markers[index % len(markers)],
            markersize=4,
            color=color,
            label=f"_{name}: {metric}" if name else metric,  # "_": not in the legend
        )
    return bool(trained or partitions)


def finish(figure: Figure, axes: Axes, title: str, *, legend: bool) -> bytes:
    """Labels, grid and legend, then the figure as PNG bytes."""
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    if legend:
        axes.legend(fontsize=7)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    return buffer.getvalue()
