"""The loss curve of a run as a PNG: training loss per checkpoint, evaluation losses beside it.

Why: the first thing an ML engineer looks for on a run's page is whether the loss goes down
and whether validation follows. Drawn from the checkpoint table (:mod:`.checkpoint_table`), so
a resumed run's curve still covers the steps an earlier attempt trained.
"""

from __future__ import annotations

import io
from collections.abc import Sequence

import matplotlib

matplotlib.use("Agg")  # no display on training machines; must precede pyplot

from matplotlib import pyplot

from .checkpoint_table import CheckpointRow


def loss_curve_png(rows: Sequence[CheckpointRow], title: str) -> bytes:
    """A small PNG (about 20 KB) of train loss and every ``<partition>/loss`` by step."""
    figure, axes = pyplot.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        trained = [(r.step, r.train_loss) for r in rows if r.train_loss is not None]
        if trained:
            axes.plot(*zip(*trained, strict=True), marker="o", markersize=3, label="train loss")
        partitions = sorted({n for r in rows for n in r.eval_metrics if n.endswith("/loss")})
        for name in partitions:
            points = [(r.step, r.eval_metrics[name]) for r in rows if name in r.eval_metrics]
            axes.plot(*zip(*points, strict=True), marker="s", markersize=3, label=name)
        axes.set_xlabel("step")
        axes.set_ylabel("loss")
        axes.set_title(title, fontsize=10)
        axes.grid(alpha=0.3)
        if trained or partitions:
            axes.legend(fontsize=8)
        figure.tight_layout()
        buffer = io.BytesIO()
        figure.savefig(buffer, format="png")
        return buffer.getvalue()
    finally:
        pyplot.close(figure)
