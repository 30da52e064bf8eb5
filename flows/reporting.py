"""The run's checkpoint table and loss curve as Prefect artifacts, keyed per experiment.

Why here, shared by two flows: the training flow publishes after each epoch, the evaluate flow
after each evaluation; both rebuild from storage (:mod:`training.checkpoint_table`), so each
new version of ``checkpoints-<experiment>`` on the Artifacts page is the whole truth at that
moment: train loss, eval metrics as they arrive, the attempt that wrote each checkpoint.
A failure to publish is logged, never raised: artifacts must not fail a run that trained.
"""

from __future__ import annotations

import base64
import time
from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from tasks.naming import artifact_key, experiment
from tml_checkpointing import CheckpointError
from training.checkpoint_table import CheckpointRow, checkpoint_rows
from training.loss_curve import loss_curve_png


def publish_checkpoints(
    save_dir: str, storage_options: dict[str, Any] | None, *, moment: str
) -> None:
    """New versions of ``checkpoints-<exp>`` (table) and ``loss-curve-<exp>`` (PNG).

    ``moment`` ("after epoch 2") starts each description: a run's Artifacts tab lists every
    version as a card, and identical cards were what a person could not tell apart.
    """
    name = experiment(save_dir)
    try:
        rows = checkpoint_rows(save_dir, storage_options)
    except CheckpointError as error:
        get_run_logger().warning("Checkpoint table of %s not published: %s", save_dir, error)
        return
    create_table_artifact(
        key=artifact_key("checkpoints", name),
        table=[row.as_table_row() for row in rows],
        description=f"{moment.capitalize()}: every committed checkpoint of {save_dir}, with "
        "train loss, eval metrics as evaluators finish, the attempt that wrote it, size",
    )
    publish_loss_curve(save_dir, rows, moment)


REPORT_INTERVAL_S = 30.0
"""Least time between two versions published by a training run (plus one at its end)."""


class ThrottledReport:
    """The training run's publisher: after an epoch when ``REPORT_INTERVAL_S`` has passed since
    the previous version, and once at the end for what is left.

    Why: a version costs a listing, a metrics read per checkpoint, a PNG (~0.1 s) and two API
    calls; after every epoch of a run whose epochs take seconds that would double Prefect's
    cost per epoch, while a person looking at the page sees no difference.
    """

    def __init__(self, save_dir: str, storage_options: dict[str, Any] | None) -> None:
        self.save_dir = save_dir
        self.storage_options = storage_options
        self._last = -float("inf")
        self._pending: str | None = None

    def epoch_trained(self, epoch: int) -> None:
        self._pending = f"after epoch {epoch}"
        if time.monotonic() - self._last >= REPORT_INTERVAL_S:
            self.flush()

    def flush(self) -> None:
        """Publish now if an epoch was trained since the last version."""
        if self._pending is None:
            return
        publish_checkpoints(self.save_dir, self.storage_options, moment=self._pending)
        self._pending = None
        self._last = time.monotonic()


def publish_loss_curve(save_dir: str, rows: list[CheckpointRow], moment: str) -> None:
    """The curve as a markdown artifact with the PNG inline (a ``data:`` URL): Prefect's UI
    shows it on the artifact page, with nothing to host (an image artifact would also print
    its whole URL under the picture)."""
    png = loss_curve_png(rows, title=f"{experiment(save_dir)}: loss by step")
    encoded = base64.b64encode(png).decode("ascii")
    create_markdown_artifact(
        key=artifact_key("loss-curve", experiment(save_dir)),
        markdown=f"![loss curve of {save_dir}](data:image/png;base64,{encoded})\n",
        description=f"{moment.capitalize()}: train and evaluation losses by step, {save_dir}",
    )
