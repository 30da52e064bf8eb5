"""What incremental checkpoints save: bytes and time per save, chained restores, retention.

Why: an incremental ``Snapshot(..., incremental=True)`` writes only the rows of large tensors
that changed since the chain's last save. That pays off when a few rows change between saves
(embedding tables and their row-wise optimizer state); this benchmark measures by how much,
on the same training trajectory, against a full ``Snapshot`` in the same run (only ratios
survive the noise of a shared machine):

    .venv/bin/python benchmarks/bench_incremental.py --quick          # seconds, CI smoke
    .venv/bin/python benchmarks/bench_incremental.py --json \\
        > benchmarks/results/incremental.json                        # full sizes

Three parts, medians throughout:

1. *Saves*: ``nn.Embedding(1M, 64, sparse=True)`` + a small MLP, SparseAdam for the table (its
   two moments are tables too, touched only where the ids are) and Adam for the MLP. Between
   two saves a few steps train on ids covering exactly 5% of the rows (seeded, uniform). Two
   Snapshots save the same trajectory, one full, one incremental with ``full_every=11`` (one
   full save, then 10 deltas); which one saves first alternates. Per save: bytes written (the
   new checkpoint directory's files), *stall* (``save()`` until it returns: training stands
   still) and *committed* (``save()`` until ``wait()`` returns: durable). The first save of
   each (writer process and staging set up, both full) is reported apart. Targets:
   incremental/full bytes <= 1/6, time until committed <= 1/3.
2. *Restore*: the tip of the 10-delta chain against the full checkpoint of the same state,
   page cache dropped first when allowed (root with a writable ``/proc/sys/vm``, as
   ``bench_fast``); otherwise marked warm. Every restore is checked bit-identical against the
   state that was saved. Target: chain/full <= 1.1.
3. *TorchRec*: the ranking recipe (``recipes.torchrec_ranking``: Zipf ids, fused row-wise
   Adagrad, DMP-sharded, which the incremental writer does not take). After each of 20
   intervals its local shards (with one rank: whole tables) and the dense state are copied
   into plain CPU tensors of a ``torchsnapshot.StateDict`` saved by an incremental
   (``full_every=20``) and by a full Snapshot. Bytes per save, the share of rows changed, and
   what ``prune(keep_last=5)`` leaves on disk for each (a kept delta keeps its chain down to
   its full checkpoint). The recipe's default tables (2000 rows x 16) are below the chaining
   threshold (1 MiB), so the user and author tables are enlarged (see
   ``TORCHREC_ROWS``; the rest is the recipe's default).

Also, the *anatomy* of a delta save's work on this state, with the library's own functions:
the bitwise row compare (in ``save()``, the stall), copying the changed rows into the staged
copy, and the gather of those rows into the delta file (in the writer process), against one
``copy_`` of the same tensors (a full save's stall).
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn
from torchsnapshot import StateDict

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # recipes/
from bench_fast import cold, spread

from tml_checkpointing import PendingSave, RetentionPolicy, Snapshot, prune
from tml_checkpointing.format.chain_link import ChainLink
from tml_checkpointing.writing.incremental import changed_rows, is_chainable
from tml_checkpointing.writing.staged_write import gather_rows

# TorchRec's deprecation notices (ShardedTensor, DDP's broadcast_buffers) are not results.
warnings.filterwarnings("ignore", category=FutureWarning)

State = dict[str, Any]
MIB = 2**20

#: Rows of the recipe tables that are enlarged for the TorchRec part: (full run, --quick).
TORCHREC_ROWS: dict[str, tuple[int, int]] = {
    "user": (1_000_000, 300_000),
    "author": (300_000, 100_000),
}


# -- helpers -------------------------------------------------------------------------------


def tree_bytes(path: Path) -> int:
    """Sum of the sizes of the files under ``path``: what a checkpoint costs in storage."""
    total = 0
    for root, _, files in os.walk(path):
        for name in files:
            total += os.path.getsize(os.path.join(root, name))
    return total


def tensors_of(value: Any, prefix: str = "") -> Iterator[tuple[str, torch.Tensor]]:
    """Every tensor in a (nested) state dict, with a path, in a fixed order."""
    if isinstance(value, torch.Tensor):
        yield prefix, value
    elif isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from tensors_of(value[key], f"{prefix}/{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from tensors_of(item, f"{prefix}/{index}")


def state_tensors(state: State) -> list[tuple[str, torch.Tensor]]:
    return [pair for key in sorted(state) for pair in tensors_of(state[key].state_dict(), key)]


def bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal bit for bit (``-0.0`` is not ``0.0``), not merely ``==``."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.dim() == 0:
        return bool(torch.equal(a.reshape(1).view(torch.uint8), b.reshape(1).view(torch.uint8)))
    return bool(torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8)))


def states_identical(saved: State, restored: State) -> bool:
    left, right = state_tensors(saved), state_tensors(restored)
    return [p for p, _ in left] == [p for p, _ in right] and all(
        bitwise_equal(a, b) for (_, a), (_, b) in zip(left, right, strict=True)
    )


def scramble(state: State) -> None:
    """So that a restore must write every tensor to pass the bit-identity check."""
    with torch.no_grad():
        for _, tensor in state_tensors(state):
            if tensor.is_floating_point():
                tensor.add_(1.0)


def ratio(numerator: list[float], denominator: list[float]) -> float | None:
    if not numerator or not denominator:
        return None
    return round(statistics.median(numerator) / statistics.median(denominator), 4)


@dataclass
class Saves:
    """Per-save measurements of one Snapshot (the first, set-up save apart)."""

    name: str
    stall: list[float] = field(default_factory=list)
    committed: list[float] = field(default_factory=list)
    written: list[int] = field(default_factory=list)
    first: dict[str, float] = field(default_factory=dict)
    links: list[ChainLink] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        return {
            "saves": len(self.written),
            "bytes_written": spread([float(b) for b in self.written]),
            "stall_s": spread(self.stall),
            "committed_s": spread(self.committed),
            "after_stall_s": spread(
                [c - s for c, s in zip(self.committed, self.stall, strict=True)]
            ),
            "first_save": self.first,
        }


def timed_save(snapshot: Snapshot, step: int) -> tuple[float, float, int, PendingSave]:
    """(stall, until committed, bytes of the new checkpoint, the handle) of one save."""
    gc.collect()
    started = time.perf_counter()
    pending = snapshot.save(step)
    stall = time.perf_counter() - started
    path = pending.wait()
    committed = time.perf_counter() - started
    return stall, committed, tree_bytes(Path(path)), pending


# -- part 1 and 2: SparseAdam embedding ----------------------------------------------------


class SparseModel(nn.Module):
    """One sparse embedding table and a small dense MLP over its rows."""

    def __init__(self, rows: int, dim: int) -> None:
        super().__init__()
        self.table = nn.Embedding(rows, dim, sparse=True)
        self.mlp = nn.Sequential(nn.Linear(dim, 128), nn.ReLU(), nn.Linear(128, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.mlp(self.table(ids))
        return out.squeeze(1)


class SparseTrainer:
    """State A and its training: every interval touches exactly ``share`` of the table's rows.

    The ids of an interval are a seeded uniform draw of ``share * rows`` distinct rows, split
    over ``steps`` steps. The loss has an L2 term on the looked-up rows, so every touched row
    gets a nonzero gradient (SparseAdam then changes its weight and both moments) and every
    untouched row keeps its bits.
    """

    def __init__(self, rows: int, dim: int, share: float, steps: int, seed: int) -> None:
        torch.manual_seed(seed)
        self.rows, self.share, self.steps = rows, share, steps
        self.model = SparseModel(rows, dim)
        self.sparse = torch.optim.SparseAdam(list(self.model.table.parameters()), lr=1e-3)
        self.dense = torch.optim.Adam(self.model.mlp.parameters(), lr=1e-3)
        self.draw = torch.Generator().manual_seed(seed + 1)
        self.state: State = {"model": self.model, "sparse": self.sparse, "dense": self.dense}

    @property
    def touched(self) -> int:
        return round(self.share * self.rows)

    def interval(self) -> None:
        ids = torch.randperm(self.rows, generator=self.draw)[: self.touched]
        for chunk in ids.chunk(self.steps):
            target = torch.randn(chunk.numel(), generator=self.draw)
            self.sparse.zero_grad(set_to_none=True)
            self.dense.zero_grad(set_to_none=True)
            rows = self.model.table(chunk)
            loss = (self.model.mlp(rows).squeeze(1) - target).square().mean()
            loss = loss + 1e-3 * rows.square().sum() / chunk.numel()
            loss.backward()
            self.sparse.step()  # type: ignore[no-untyped-call]
            self.dense.step()

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for _, t in state_tensors(self.state))


def measure_saves(
    trainer: SparseTrainer, work: Path, chain: int, log: Callable[[str], None]
) -> tuple[Saves, Saves, Path, Path, list[float]]:
    """Part 1: ``chain + 1`` saves by a full and an incremental Snapshot of one trajectory.

    Returns both rows, the full checkpoint and the chain tip holding the final state, and the
    share of rows each delta changed (per chained tensor).
    """
    full = Saves("full (incremental=False)")
    inc = Saves(f"incremental (full_every={chain + 1})")
    snapshots = {
        full.name: Snapshot(str(work / "full"), trainer.state),
        inc.name: Snapshot(
            str(work / "inc"),
            trainer.state,
            incremental=True,
            full_every=chain + 1,
            max_chain_fraction=1.0,  # 10 deltas of 5% (the default budget, 0.5, allows 9)
        ),
    }
    shares: list[float] = []
    kept: dict[str, Path] = {}
    try:
        for index in range(chain + 1):
            trainer.interval()
            step = (index + 1) * trainer.steps
            order = [full, inc] if index % 2 == 0 else [inc, full]
            for row in order:
                stall, committed, written, pending = timed_save(snapshots[row.name], step)
                link = pending.link
                if row is inc:
                    assert link is not None and link.depth == index, (index, link)
                    row.links.append(link)
                if index == 0:
                    row.first = {
                        "stall_s": round(stall, 4),
                        "committed_s": round(committed, 4),
                        "bytes_written": written,
                    }
                else:
                    row.stall.append(stall)
                    row.committed.append(committed)
                    row.written.append(written)
                previous = kept.get(row.name)
                if row is full and previous is not None:
                    shutil.rmtree(previous)  # only the last full one is needed (restore)
                kept[row.name] = Path(pending.path)
                if link is not None and link.is_delta:
                    for tensor in link.tensors:
                        shares.append(tensor.rows / tensor.shape[0])
                log(
                    f"  [{index + 1}/{chain + 1}] {row.name}: {written / MIB:.1f} MiB, "
                    f"stall {stall:.3f}s, committed {committed:.3f}s"
                )
    finally:
        for snapshot in snapshots.values():
            snapshot.close()
    return full, inc, kept[full.name], kept[inc.name], shares


def measure_restores(
    trainer: SparseTrainer,
    full_ckpt: Path,
    chain_ckpt: Path,
    repeat: int,
    log: Callable[[str], None],
) -> dict[str, Any]:
    """Part 2: restore the full checkpoint and the chain tip, alternating, into one target."""
    target = SparseTrainer(
        trainer.rows, trainer.model.table.embedding_dim, trainer.share, trainer.steps, seed=12345
    )
    target.interval()  # SparseAdam's state exists only after a step
    times: dict[str, list[float]] = {"full": [], "chain": []}
    identical = True
    was_cold = True
    for index in range(repeat):
        for name, path in (("full", full_ckpt), ("chain", chain_ckpt))[
            :: 1 if index % 2 == 0 else -1
        ]:
            scramble(target.state)
            was_cold = cold() and was_cold
            snapshot = Snapshot(str(path.parent), target.state)
            try:
                gc.collect()
                started = time.perf_counter()
                snapshot.restore(str(path))
                times[name].append(time.perf_counter() - started)
            finally:
                snapshot.close()
            same = states_identical(trainer.state, target.state)
            identical = identical and same
            log(
                f"  [{index + 1}/{repeat}] restore {name}: {times[name][-1]:.3f}s"
                f"{'' if same else ' NOT BIT-IDENTICAL'}"
            )
    chain_dir = chain_ckpt.parent
    return {
        "cold_cache": was_cold,
        "repeat": repeat,
        "full_s": spread(times["full"]),
        "chain_s": spread(times["chain"]),
        "ratio_chain_over_full": ratio(times["chain"], times["full"]),
        "bit_identical": identical,
        "bytes_full_checkpoint": tree_bytes(full_ckpt),
        "bytes_chain_total": tree_bytes(chain_dir),
    }


def anatomy(trainer: SparseTrainer, repeat: int) -> dict[str, Any]:
    """Where a delta save's time goes, per phase, summed over the chained tensors.

    A copy of each table stands in for its staged copy; one more training interval changes
    ``share`` of its rows. ``compare``: :func:`~tml_checkpointing.writing.incremental.changed_rows`;
    ``stage_rows``: ``index_select`` + ``index_copy_`` into the copy (both in ``save()``);
    ``gather``: :func:`~tml_checkpointing.writing.staged_write.gather_rows` (the writer process);
    ``copy_full``: one ``copy_`` of the whole tensors (a full save's staging).
    """
    tensors = [t for _, t in state_tensors(trainer.state) if is_chainable(t)]
    saved = [t.clone() for t in tensors]
    trainer.interval()
    phases: dict[str, list[float]] = {
        "compare": [],
        "stage_rows": [],
        "gather": [],
        "copy_full": [],
    }
    for _ in range(repeat):
        totals = dict.fromkeys(phases, 0.0)
        for current, old in zip(tensors, saved, strict=True):
            scratch = old.clone()
            started = time.perf_counter()
            rows = changed_rows(current, scratch)
            totals["compare"] += time.perf_counter() - started
            started = time.perf_counter()
            scratch.index_copy_(0, rows, current.detach().index_select(0, rows))
            totals["stage_rows"] += time.perf_counter() - started
            width = current.element_size() * current[0].numel()
            block = torch.empty(
                scratch.numel() * scratch.element_size() + rows.numel() * 8, dtype=torch.uint8
            )
            table_bytes = scratch.numel() * scratch.element_size()
            block[:table_bytes].copy_(scratch.reshape(-1).view(torch.uint8))
            block[table_bytes:].copy_(rows.view(torch.uint8))
            gathers = [
                {
                    "slot_offset": 0,
                    "row_bytes": width,
                    "rows_offset": table_bytes,
                    "count": rows.numel(),
                }
            ]
            view = memoryview(block.numpy().data)
            started = time.perf_counter()
            gather_rows(view, gathers)
            totals["gather"] += time.perf_counter() - started
            view.release()
            started = time.perf_counter()
            scratch.copy_(current.detach())
            totals["copy_full"] += time.perf_counter() - started
            del block, scratch
        for name, value in totals.items():
            phases[name].append(value)
    return {
        "tensors": len(tensors),
        "bytes": sum(t.numel() * t.element_size() for t in tensors),
        **{f"{name}_s": spread(values) for name, values in phases.items()},
    }


# -- part 3: TorchRec ----------------------------------------------------------------------


class PlainCopy:
    """The recipe's model and optimizer state as plain CPU tensors, allocated once.

    Why: DMP's tables are ``ShardedTensor`` s, which the staging writer (and so the
    incremental one) does not take. With one rank every table is one local shard holding the
    whole table; it is copied, as the dense state is, into a fixed buffer per tensor of one
    ``StateDict`` before each save.
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer = model, optimizer
        self.buffers: dict[str, torch.Tensor] = {
            name: torch.empty_like(value) for name, value in self.sources().items()
        }
        self.state = StateDict(self.buffers)

    def sources(self) -> dict[str, torch.Tensor]:
        found: dict[str, torch.Tensor] = {}
        for name, value in self.model.state_dict().items():
            found[f"model.{name}"] = local(value)
        for param, per_param in self.optimizer.state_dict()["state"].items():
            for name, value in per_param.items():
                if isinstance(value, torch.Tensor) or hasattr(value, "local_shards"):
                    found[f"optimizer.{param}.{name}"] = local(value)
        return found

    def refresh(self) -> None:
        for name, value in self.sources().items():
            self.buffers[name].copy_(value)


def local(value: Any) -> torch.Tensor:
    """A plain tensor, or a one-rank ``ShardedTensor``'s single local shard (the whole)."""
    if isinstance(value, torch.Tensor) and type(value) in (torch.Tensor, nn.Parameter):
        return value.detach()
    shards = value.local_shards()
    assert len(shards) == 1 and tuple(shards[0].tensor.shape) == tuple(value.size()), (
        "one rank must hold each table whole"
    )
    tensor: torch.Tensor = shards[0].tensor
    return tensor.detach()


def measure_torchrec(
    work: Path, quick: bool, intervals: int, steps: int, batch: int, log: Callable[[str], None]
) -> dict[str, Any]:
    """Part 3: 20 intervals of the recipe, saved full and incremental; then prune both."""
    from recipes.base import RecipeParams
    from recipes.torchrec_ranking import SparseFeature, TorchRecRankingSizes, build_recipe

    default = TorchRecRankingSizes()
    features = tuple(
        SparseFeature(f.name, TORCHREC_ROWS[f.name][1 if quick else 0], f.max_ids)
        if f.name in TORCHREC_ROWS
        else f
        for f in default.features
    )
    sizes = TorchRecRankingSizes(features=features)
    recipe = build_recipe(RecipeParams(seed=3, batch_size=batch, lr=1e-2), sizes)
    plain = PlainCopy(recipe.model, recipe.optimizer)
    state_bytes = sum(t.numel() * t.element_size() for t in plain.buffers.values())
    log(
        f"TorchRec: {state_bytes / MIB:.1f} MiB in {len(plain.buffers)} tensors, "
        f"{intervals} intervals of {steps} steps x batch {batch}"
    )
    full_dir, inc_dir = work / "torchrec-full", work / "torchrec-inc"
    snapshots = {
        "full": Snapshot(str(full_dir), {"torchrec": plain.state}),
        "incremental": Snapshot(
            str(inc_dir), {"torchrec": plain.state}, incremental=True, full_every=intervals
        ),
    }
    per_save: list[dict[str, Any]] = []
    chained_paths: set[str] = set()
    try:
        batch_index = 0
        for interval in range(intervals):
            for _ in range(steps):
                recipe.optimizer.zero_grad(set_to_none=True)
                loss: torch.Tensor = recipe.loss(recipe.model, recipe.train_batch(0, batch_index))
                loss.backward()  # type: ignore[no-untyped-call]
                recipe.optimizer.step()
                batch_index += 1
            plain.refresh()
            entry: dict[str, Any] = {"step": batch_index}
            for name, snapshot in snapshots.items():
                _, committed, written, pending = timed_save(snapshot, batch_index)
                entry[f"{name}_bytes"] = written
                entry[f"{name}_committed_s"] = round(committed, 4)
                link = pending.link
                if link is not None:
                    entry["depth"] = link.depth
                    if link.is_delta:
                        entry["changed_share"] = {
                            t.path.removeprefix("torchrec/"): round(t.rows / t.shape[0], 6)
                            for t in link.tensors
                        }
                        chained_paths.update(entry["changed_share"])
            per_save.append(entry)
            log(
                f"  [{interval + 1}/{intervals}] full {entry['full_bytes'] / MIB:.2f} MiB, "
                f"incremental {entry['incremental_bytes'] / MIB:.2f} MiB "
                f"(depth {entry.get('depth')})"
            )
    finally:
        for snapshot in snapshots.values():
            snapshot.close()
    before = {"full": tree_bytes(full_dir), "incremental": tree_bytes(inc_dir)}
    after: dict[str, Any] = {}
    for name, directory in (("full", full_dir), ("incremental", inc_dir)):
        result = prune(str(directory), RetentionPolicy(keep_last=5))
        after[name] = {
            "bytes": tree_bytes(directory),
            "kept": len(result.plan.keep),
            "deleted": len(result.deleted),
        }
    deltas = [e for e in per_save if e.get("changed_share")]
    shares = {
        path: spread([e["changed_share"][path] for e in deltas]) for path in sorted(chained_paths)
    }
    return {
        "tables": {f.name: [f.num_ids, sizes.embedding_dim] for f in sizes.features},
        "enlarged": {name: rows[1 if quick else 0] for name, rows in TORCHREC_ROWS.items()},
        "state_bytes": state_bytes,
        "intervals": intervals,
        "steps_per_interval": steps,
        "batch_size": batch,
        "per_save": per_save,
        "bytes_per_save": {
            "full": spread([float(e["full_bytes"]) for e in per_save[1:]]),
            "incremental": spread([float(e["incremental_bytes"]) for e in per_save[1:]]),
            "ratio_incremental_over_full": ratio(
                [float(e["incremental_bytes"]) for e in per_save[1:]],
                [float(e["full_bytes"]) for e in per_save[1:]],
            ),
        },
        "changed_share": shares,
        "storage_before_prune": before,
        "storage_after_prune_keep_last_5": after,
    }


# -- report --------------------------------------------------------------------------------


def print_tables(data: dict[str, Any], stderr: bool) -> None:
    console = Console(width=150, stderr=stderr)
    saves = data["saves"]
    table = Table(
        title=f"Saves: {saves['state_mib']:.0f} MiB state, {saves['changed_share_target']:.0%} "
        f"of rows changed per interval; median \\[min-max] of {saves['full']['saves']} saves",
        title_justify="left",
    )
    for column in (
        "snapshot",
        "MiB written",
        "stall",
        "until committed",
        "after stall",
        "first save (stall / committed)",
    ):
        table.add_column(column, justify="left" if column == "snapshot" else "right")
    for key in ("full", "incremental"):
        row = saves[key]
        first = row["first_save"]
        table.add_row(
            row["name"],
            f"{row['bytes_written']['median'] / MIB:.1f}",
            fmt_s(row["stall_s"]),
            fmt_s(row["committed_s"]),
            fmt_s(row["after_stall_s"]),
            f"{first['stall_s']:.2f}s / {first['committed_s']:.2f}s",
        )
    console.print(table)
    for label, value in saves["ratios"].items():
        target = saves["targets"].get(label)
        verdict = "" if target is None else f" (target <= {target:.3f}: "
        verdict += "" if target is None else ("met)" if value <= target else "MISSED)")
        console.print(f"  incremental/full {label}: {value:.3f}{verdict}")
    share = saves["changed_share_measured"]
    console.print(
        f"  rows changed per delta (per chained tensor): {share['median']:.4f} "
        f"[{share['min']:.4f}-{share['max']:.4f}]"
    )
    anat = data["anatomy"]
    console.print(
        f"  anatomy over {anat['tensors']} chained tensors ({anat['bytes'] / MIB:.0f} MiB): "
        + ", ".join(
            f"{k} {anat[f'{k}_s']['median']:.3f}s"
            for k in ("compare", "stage_rows", "gather", "copy_full")
        )
    )
    console.print()
    restore = data["restore"]
    table = Table(
        title=f"Restore ({'cold' if restore['cold_cache'] else 'warm'} cache), median of "
        f"{restore['repeat']}",
        title_justify="left",
    )
    for column in ("checkpoint", "MiB on disk", "seconds", "bit-identical"):
        table.add_column(column, justify="left" if column == "checkpoint" else "right")
    table.add_row(
        "full",
        f"{restore['bytes_full_checkpoint'] / MIB:.1f}",
        fmt_s(restore["full_s"]),
        str(restore["bit_identical"]),
    )
    table.add_row(
        f"tip of {data['saves']['chain']} deltas",
        f"{restore['bytes_chain_total'] / MIB:.1f} (whole chain)",
        fmt_s(restore["chain_s"]),
        str(restore["bit_identical"]),
    )
    console.print(table)
    console.print(f"  chain/full: {restore['ratio_chain_over_full']:.3f} (target <= 1.1)")
    console.print()
    rec = data["torchrec"]
    table = Table(
        title=f"TorchRec recipe: {rec['state_bytes'] / MIB:.1f} MiB, {rec['intervals']} saves "
        f"of {rec['steps_per_interval']} steps x batch {rec['batch_size']}; tables "
        + ", ".join(f"{n} {r}x{d}" for n, (r, d) in rec["tables"].items()),
        title_justify="left",
    )
    for column in (
        "snapshot",
        "MiB per save (median)",
        "MiB stored",
        "after prune(keep_last=5)",
        "kept",
    ):
        table.add_column(column, justify="left" if column == "snapshot" else "right")
    for key in ("full", "incremental"):
        after = rec["storage_after_prune_keep_last_5"][key]
        table.add_row(
            key,
            f"{rec['bytes_per_save'][key]['median'] / MIB:.2f}",
            f"{rec['storage_before_prune'][key] / MIB:.1f}",
            f"{after['bytes'] / MIB:.1f}",
            str(after["kept"]),
        )
    console.print(table)
    console.print(
        f"  incremental/full bytes per save: "
        f"{rec['bytes_per_save']['ratio_incremental_over_full']:.3f}"
    )
    for path, share in rec["changed_share"].items():
        console.print(
            f"  rows changed per delta, {path}: {share['median']:.4%} "
            f"[{share['min']:.4%}-{share['max']:.4%}]"
        )


def fmt_s(value: dict[str, float] | None) -> str:
    if value is None:
        return "—"
    return f"{value['median']:.3f}s [{value['min']:.3f}-{value['max']:.3f}]"


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes: seconds (CI smoke)")
    parser.add_argument(
        "--rows", type=int, default=None, help="table rows (default 1M; quick 100k)"
    )
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--share", type=float, default=0.05, help="rows touched per interval")
    parser.add_argument("--chain", type=int, default=10, help="deltas after the full save")
    parser.add_argument("--repeat", type=int, default=None, help="restores (default 3; quick 2)")
    parser.add_argument(
        "--torchrec-intervals", type=int, default=None, help="saves (default 20; quick 8)"
    )
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object on stdout (tables: stderr)"
    )
    args = parser.parse_args()
    rows = args.rows or (100_000 if args.quick else 1_000_000)
    repeat = args.repeat or (2 if args.quick else 3)
    err = Console(stderr=True)

    def log(message: str) -> None:
        err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", highlight=False)

    work = Path(tempfile.mkdtemp(prefix="tml-incremental-", dir=args.dir))
    started = time.perf_counter()
    load: dict[str, float] = {"start": round(os.getloadavg()[0], 2)}
    try:
        trainer = SparseTrainer(rows, args.dim, args.share, steps=4, seed=0)
        log(
            f"State A: Embedding({rows}, {args.dim}) + SparseAdam + MLP/Adam, "
            f"{trainer.nbytes / MIB:.0f} MiB; {trainer.touched} rows per interval"
        )
        full, inc, full_ckpt, chain_ckpt, shares = measure_saves(trainer, work, args.chain, log)
        assert shares and all(abs(s - args.share) <= 0.1 * args.share for s in shares), (
            f"deltas changed {min(shares):.4f}-{max(shares):.4f} of rows, not ~{args.share}"
        )
        load["saves"] = round(os.getloadavg()[0], 2)
        restore = measure_restores(trainer, full_ckpt, chain_ckpt, repeat, log)
        load["restores"] = round(os.getloadavg()[0], 2)
        assert restore["bit_identical"], "a restore did not give back the saved state"
        shutil.rmtree(full_ckpt.parent)
        shutil.rmtree(chain_ckpt.parent)
        anat = anatomy(trainer, repeat)
        log(
            f"  anatomy: compare {anat['compare_s']['median']:.3f}s, gather "
            f"{anat['gather_s']['median']:.3f}s, copy_ {anat['copy_full_s']['median']:.3f}s"
        )
        state_mib = trainer.nbytes / MIB
        del trainer
        gc.collect()
        torchrec = measure_torchrec(
            work,
            args.quick,
            args.torchrec_intervals or (8 if args.quick else 20),
            steps=2 if args.quick else 5,
            batch=512,
            log=log,
        )
        load["torchrec"] = round(os.getloadavg()[0], 2)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    ratios = {
        "bytes": ratio([float(b) for b in inc.written], [float(b) for b in full.written]),
        "committed": ratio(inc.committed, full.committed),
        "stall": ratio(inc.stall, full.stall),
        "after_stall": ratio(
            [c - s for c, s in zip(inc.committed, inc.stall, strict=True)],
            [c - s for c, s in zip(full.committed, full.stall, strict=True)],
        ),
    }
    data: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "load_avg_1min": load,
        "saves": {
            "rows": rows,
            "dim": args.dim,
            "state_mib": round(state_mib, 2),
            "chain": args.chain,
            "changed_share_target": args.share,
            "changed_share_measured": spread(shares),
            "full": {"name": full.name, **full.summary()},
            "incremental": {
                "name": inc.name,
                **inc.summary(),
                "depths": [link.depth for link in inc.links],
            },
            "ratios": {k: v for k, v in ratios.items() if v is not None},
            "targets": {"bytes": round(1 / 6, 4), "committed": round(1 / 3, 4)},
        },
        "restore": restore,
        "anatomy": anat,
        "torchrec": torchrec,
        "wall_s": round(time.perf_counter() - started, 1),
    }
    log(f"done in {data['wall_s']:.0f}s")
    print_tables(data, stderr=args.json)
    if args.json:
        print(json.dumps(data, indent=1))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
