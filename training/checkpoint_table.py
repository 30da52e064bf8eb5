"""Every checkpoint of a run with what is known about it, read from storage alone.

Why: an ML engineer looks for one table per run: each checkpoint (end of epoch or mid-epoch),
its training loss, its evaluation metrics as evaluators finish, which attempt wrote it, its
size and path. Training and evaluation run in different flows and processes; the files next
to each checkpoint (``metrics.json`` from training, ``eval/<partition>.json`` from each
evaluator) are the one place both write to, so the table is rebuilt from them by whichever
flow has news, and always agrees with storage (a pruned checkpoint leaves it).
"""

from __future__ import annotations

from pydantic import BaseModel

from tml_checkpointing import list_checkpoints, read_checkpoint_metrics
from tml_checkpointing.storage.faults import reading
from tml_checkpointing.storage.filesystem import StorageOptions, resolve

from .run_info import RunInfo, find_run_info


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

    def as_table_row(self) -> dict[str, object]:
        """Flat, rounded cells for a Prefect table artifact (one column per eval metric)."""
        return {
            "step": self.step,
            "epoch": self.epoch,
            "kind": _KIND[self.mid_epoch],
            "train loss": _rounded(self.train_loss),
            **{name: _rounded(value) for name, value in sorted(self.eval_metrics.items())},
            "attempt": self.attempt,
            "MiB": round(self.bytes / 2**20, 2),
            "path": self.path,
        }


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
