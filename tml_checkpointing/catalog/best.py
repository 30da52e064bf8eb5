"""Which checkpoint of a run is its best: the one rule every table, curve and listing shows.

Why one pure function: the per-run table (Prefect), its loss curve, the comparison across runs
and ``tml checkpoints list`` all mark "the best checkpoint"; if each ranked on its own, two
pages could star two different checkpoints of the same run. The rule reads only what
:func:`~tml_checkpointing.catalog.evaluation.read_checkpoint_metrics` returns (evaluators'
metrics under ``"<partition>/<name>"``), so the library owns it without knowing the training
application.

The rule: the lowest ``validation/loss``; a run without a ``validation`` partition is judged
by the loss of its first partition alphabetically; a run nothing evaluated has no best. A tie
goes to the older checkpoint (it reached that loss first), and a NaN loss never wins.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

BEST_MARK = "★ best"
"""What marks the best checkpoint in every table (``tml checkpoints list``, Prefect's)."""
PREFERRED_PARTITION = "validation"
LOSS = "loss"


def loss_metric(partition: str) -> str:
    """``validation`` -> ``validation/loss``: the key of a partition's loss in the metrics."""
    return f"{partition}/{LOSS}"


def is_loss_metric(name: str) -> bool:
    """Whether ``name`` is a partition's loss (``<partition>/loss``), as evaluators record it."""
    return name.endswith(f"/{LOSS}") and name.count("/") == 1


def best_metric(names: Iterable[str]) -> str | None:
    """The metric the best checkpoint is chosen by, among the metric ``names`` a run has.

    ``validation/loss`` when present, else the ``<partition>/loss`` of the partition first in
    alphabetical order, else ``None`` (nothing evaluated a loss).
    """
    losses = sorted(name for name in set(names) if is_loss_metric(name))
    preferred = loss_metric(PREFERRED_PARTITION)
    if preferred in losses:
        return preferred
    return losses[0] if losses else None


def best_step(
    metrics_by_step: Mapping[int, Mapping[str, float]], metric: str | None = None
) -> int | None:
    """The step of the best checkpoint, from each checkpoint's metrics (lowest ``metric``).

    ``metric`` defaults to :func:`best_metric` of every name the checkpoints have. ``None``
    when no checkpoint has a finite value of it.
    """
    chosen = metric or best_metric(name for metrics in metrics_by_step.values() for name in metrics)
    if chosen is None:
        return None
    ranked = [
        (float(metrics[chosen]), step)
        for step, metrics in metrics_by_step.items()
        if chosen in metrics and math.isfinite(float(metrics[chosen]))
    ]
    return min(ranked)[1] if ranked else None
