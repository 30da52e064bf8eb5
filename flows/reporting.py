"""The run's checkpoint table and loss curve as Prefect artifacts, keyed per experiment.

Why here, shared by two flows: the training flow publishes after epochs, the evaluate flow
after each evaluation; both rebuild from storage (:mod:`training.checkpoint_table`), so each
new version of ``checkpoints-<experiment>`` on the Artifacts page is the whole truth at that
moment: train loss beside the evaluation losses, the best checkpoint marked, the attempt that
wrote each checkpoint. The caller names the experiment (it decides how experiments are
named). A failure to publish is logged, never raised: artifacts must not fail a run that
trained.
"""

from __future__ import annotations

import base64
import time
from collections.abc import Sequence
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.naming import artifact_key
from training.checkpoint_table import CheckpointRow, best_row, checkpoint_rows, table_rows
from training.loss_curve import loss_curve_png


def publish_checkpoints(
    save_dir: str, storage_options: dict[str, Any] | None, *, experiment: str, moment: str
) -> None:
    """New versions of ``checkpoints-<experiment>`` (table) and ``loss-curve-<experiment>``.

    ``moment`` ("after epoch 2") starts each description, followed by what the version holds
    (how many checkpoints, up to which step, the best): a run's Artifacts tab lists every
    version as a card, and identical cards were what a person could not tell apart.
    """
    rows = _rows(save_dir, storage_options)
    if rows is not None:
        _publish_rows(save_dir, rows, experiment=experiment, moment=moment)


REPORT_INTERVAL_S = 30.0
"""Least time between two versions published by a training run after its second epoch."""

ALWAYS_PUBLISHED_EPOCHS = 2
"""The first epochs a training run trains, each published at once: the first shows where the
run starts, the second that its loss moves (and a short run's page is never left with the
first and last epochs only)."""


class ThrottledReport:
    """The training run's publisher: the first :data:`ALWAYS_PUBLISHED_EPOCHS` epochs it
    trains, then after an epoch when ``REPORT_INTERVAL_S`` has passed since the previous
    version, and at the end (:meth:`flush`) for an epoch not published yet or evaluation
    metrics that arrived since.

    Why throttled: a version costs a listing, a few reads per checkpoint, a PNG (~0.1 s) and
    two API calls; after every epoch of a run whose epochs take seconds that would double
    Prefect's cost per epoch, while a person looking at the page sees no difference.

    Every version it publishes is distinct: each epoch's end is published at most once (its
    moment, "after epoch N", starts the description), and the end of the run publishes
    nothing when the table is the one published last (a version identical to the previous
    one is the duplicate card a person saw).
    """

    def __init__(
        self, save_dir: str, storage_options: dict[str, Any] | None, experiment: str
    ) -> None:
        self.save_dir = save_dir
        self.storage_options = storage_options
        self.experiment = experiment
        self._last = -float("inf")
        self._pending: str | None = None  # the newest trained epoch's moment, unpublished
        self._epochs_trained = 0
        self._published: list[dict[str, object]] | None = None  # the last table published

    def epoch_trained(self, epoch: int) -> None:
        self._pending = f"after epoch {epoch}"
        self._epochs_trained += 1
        if (
            self._epochs_trained <= ALWAYS_PUBLISHED_EPOCHS
            or time.monotonic() - self._last >= REPORT_INTERVAL_S
        ):
            self.flush()

    def flush(self, moment: str | None = None) -> None:
        """Publish now if an epoch was trained since the last version, or ``moment`` is given
        (the end of the run: evaluations that finished while it trained), and the table
        changed."""
        moment, self._pending = self._pending or moment, None
        if moment is None:
            return
        rows = _rows(self.save_dir, self.storage_options)
        if rows is None or table_rows(rows) == self._published:
            return
        if _publish_rows(self.save_dir, rows, experiment=self.experiment, moment=moment):
            self._published = table_rows(rows)
            self._last = time.monotonic()


def publish_loss_curve(
    save_dir: str, rows: Sequence[CheckpointRow], *, experiment: str, moment: str
) -> None:
    """The curve as a markdown artifact with the PNG inline (a ``data:`` URL): Prefect's UI
    shows it on the artifact page, with nothing to host (an image artifact would also print
    its whole URL under the picture)."""
    publish_png(
        artifact_key("loss-curve", experiment),
        loss_curve_png(rows, title=f"{experiment}: loss by step"),
        alt=f"loss curve of {save_dir}",
        description=f"{moment.capitalize()}: {_holds(rows)}; train loss by step, evaluation "
        f"losses at checkpoints, {save_dir}",
    )


def publish_png(key: str, png: bytes, *, alt: str, description: str) -> None:
    """A picture as a markdown artifact with the PNG inline (a ``data:`` URL): shown on the
    artifact page with nothing to host."""
    encoded = base64.b64encode(png).decode("ascii")
    create_markdown_artifact(
        key=key,
        markdown=f"![{alt}](data:image/png;base64,{encoded})\n",
        description=description,
    )


def _rows(save_dir: str, storage_options: dict[str, Any] | None) -> list[CheckpointRow] | None:
    try:
        return checkpoint_rows(save_dir, storage_options)
    except Exception as error:  # a storage fault, a bad run.json: the run goes on
        get_run_logger().warning("Checkpoint table of %s not published: %s", save_dir, error)
        return None


def _publish_rows(
    save_dir: str, rows: Sequence[CheckpointRow], *, experiment: str, moment: str
) -> bool:
    """Both artifacts of one version; whether they were published (a failure is logged)."""
    try:
        create_table_artifact(
            key=artifact_key("checkpoints", experiment),
            table=table_rows(rows),
            description=f"{moment.capitalize()}: {_holds(rows)}; every committed checkpoint "
            f"of {save_dir}, train loss beside evaluation losses, the attempt, size",
        )
        publish_loss_curve(save_dir, rows, experiment=experiment, moment=moment)
    except Exception as error:  # the API or the drawing: never a reason to fail the run
        get_run_logger().warning("Checkpoint table of %s not published: %s", save_dir, error)
        return False
    return True


def _holds(rows: Sequence[CheckpointRow]) -> str:
    """What a version holds, in a few words: ``4 checkpoints up to step 8, best step 6``."""
    if not rows:
        return "no checkpoint yet"
    best = best_row(rows)
    counted = f"{len(rows)} checkpoint{'s' if len(rows) != 1 else ''} up to step {rows[-1].step}"
    return counted + (f", best step {best.step}" if best is not None else "")
