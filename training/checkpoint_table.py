"""Every checkpoint of a run with what is known about it, read from storage alone.

Why: an ML engineer looks for one table per run: each checkpoint (end of epoch or mid-epoch),
its training loss with each evaluation loss right beside it, which checkpoint is the best
(``★ best``, by the library's one rule, :mod:`tml_checkpointing.catalog.best`), the other
evaluation metrics as evaluators finish, which attempt wrote it, its size and path. Training
and evaluation run in different flows and processes; the files next to each checkpoint
(``metrics.json`` and ``train_losses.json`` from training, ``eval/<partition>.json`` from each
evaluator) are the one place both write to, so the table is rebuilt from them by whichever
flow has news, and always agrees with storage (a pruned checkpoint leaves it).
"""

from __future__ import annotations

from collections.abc import Sequence

from pydantic import BaseModel, Field

from tml_checkpointing import list_checkpoints, read_checkpoint_metrics
from tml_checkpointing.catalog.best import BEST_MARK, best_step, is_loss_metric
from tml_checkpointing.storage.faults import reading
from tml_checkpointing.storage.filesystem import StorageOptions, resolve

from .run_info import RunInfo, find_run_info
from .step_losses import read_step_losses, step_curve


class CheckpointRow(BaseModel):
    """One committed checkpoint, as the per-run table shows it."""

    step: int
    epoch: int | None
    mid_epoch: bool | None
    train_loss: float | None
    eval_metrics: dict[str, float]  # "<partition>/<name>", e.g. "validation/loss"
    attempt: int | None
    bytes: int
    path: str
    step_losses: list[tuple[int, float]] = Field(
        default_factory=list, description="(step, training loss) of the steps it covers"
    )

    def as_table_row(
        self, *, best: bool = False, metric_names: Sequence[str] | None = None
    ) -> dict[str, object]:
        """Flat, rounded cells for a Prefect table artifact: the train loss, then each
        evaluation loss beside it, the best mark, the other metrics (``metric_names``: the
        run's, so that every row has the same columns; a metric this row lacks is empty)."""
        names = sorted(self.eval_metrics) if metric_names is None else list(metric_names)
        losses = [name for name in names if is_loss_metric(name)]
        return {
            "step": self.step,
            "epoch": self.epoch,
            "kind": _KIND[self.mid_epoch],
            "train loss": _rounded(self.train_loss),
            **{name: _rounded(self.eval_metrics.get(name)) for name in losses},
            "best": BEST_MARK if best else "",
            **{name: _rounded(self.eval_metrics.get(name)) for name in names if name not in losses},
            "attempt": self.attempt,
            "MiB": round(self.bytes / 2**20, 2),
            "path": self.path,
        }


def best_row(rows: Sequence[CheckpointRow]) -> CheckpointRow | None:
    """The run's best checkpoint (the library's rule, on the evaluators' metrics), or None."""
    step = best_step({row.step: row.eval_metrics for row in rows})
    return next((row for row in rows if row.step == step), None)


def table_rows(rows: Sequence[CheckpointRow]) -> list[dict[str, object]]:
    """The whole table: one row per checkpoint, the same columns in each, the best marked."""
    best = best_row(rows)
    names = sorted({name for row in rows for name in row.eval_metrics})
    return [row.as_table_row(best=row is best, metric_names=names) for row in rows]


def run_step_losses(rows: Sequence[CheckpointRow]) -> list[tuple[int, float]]:
    """The run's training loss by step, from every checkpoint still there (oldest first);
    a checkpoint without step losses (recorded before they were) adds its mean loss at its
    own step, so an older run still has a curve."""
    return step_curve(
        row.step_losses or ([(row.step, row.train_loss)] if row.train_loss is not None else [])
        for row in rows
    )


def checkpoint_rows(
    save_dir: str, storage_options: StorageOptions | None = None
) -> list[CheckpointRow]:
    """A row per committed checkpoint of ``save_dir``, oldest first (one listing for sizes)."""
    info = find_run_info(save_dir, storage_options)
    sizes = _sizes_by_step(save_dir, storage_options)
    rows = []
    for checkpoint in list_checkpoints(save_dir, storage_options):
        metrics = read_checkpoint_metrics(checkpoint.path, storage_options=storage_options)
        epoch, mid_epoch = _epoch_of(info, checkpoint.step)
        attempt = metrics.get("train_attempt")
        rows.append(
            CheckpointRow(
                step=checkpoint.step,
                epoch=epoch,
                mid_epoch=mid_epoch,
                train_loss=metrics.get("train_loss"),
                eval_metrics={name: value for name, value in metrics.items() if "/" in name},
                attempt=None if attempt is None else int(attempt),
                bytes=sizes.get(checkpoint.step, 0),
                path=checkpoint.path,
                step_losses=read_step_losses(checkpoint.path, storage_options),
            )
        )
    return rows


def _epoch_of(info: RunInfo | None, step: int) -> tuple[int | None, bool | None]:
    if info is None:
        return None, None
    per_epoch = info.segment_for(step).steps_per_epoch
    return (step - 1) // per_epoch, step % per_epoch != 0


def _sizes_by_step(save_dir: str, storage_options: StorageOptions | None) -> dict[int, int]:
    fs, root = resolve(save_dir, storage_options)
    root = root.rstrip("/")
    sizes: dict[int, int] = {}
    with reading(f"the sizes of the checkpoints in {save_dir}"):
        found = fs.find(root, detail=True)
    for name, detail in found.items():
        top = name[len(root) :].lstrip("/").split("/", 1)[0]
        if top.isdigit():
            sizes[int(top)] = sizes.get(int(top), 0) + int(detail.get("size") or 0)
    return sizes


_KIND = {None: None, True: "mid-epoch", False: "epoch end"}


def _rounded(value: float | None) -> float | None:
    return None if value is None else round(value, 5)
