"""Sharded state restored in place: each rank reads only the byte ranges of the rows it holds.

Three real ``torchrun`` jobs (tests/helpers/dist_sharded_restore.py, gloo, CPU) save a TorchRec
``DistributedModelParallel`` with fused optimizer state (2 ranks, row-wise; and 1 rank) and
restore it into the same plan, another world size and other plans. Each restore reports, per
rank, which path it took (the ``restore_stats`` on the restore's log record), the bytes the
fast path read, the bytes the process read meanwhile (``/proc/self/io``, which the library
does not count itself) and the bytes of the tensors the rank holds. The in-process tests
below check the shard geometry (column splits, whole-file shards, what falls back).
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from fsspec.implementations.local import LocalFileSystem
from torchsnapshot.manifest import Shard, ShardedTensorEntry, TensorEntry

from tests.conftest import free_port
from tml_checkpointing import Snapshot
from tml_checkpointing.format.sidecar import BLOCK_SIZE
from tml_checkpointing.reading.fast_restore import RestorePlan, plan_piece, read_planned
from tml_checkpointing.reading.shard_reads import plan_shards

HELPER = Path(__file__).parent / "helpers" / "dist_sharded_restore.py"
ROOT = Path(__file__).parent.parent
JOB_TIMEOUT = 120  # a rank that dies makes the others fail within their 30 s collective timeout
MiB = 1024 * 1024
#: Bytes a process reads during a restore besides the data: marker, sidecar, a listing.
SMALL_FILES = 1 * MiB


def torchrun(nproc: int, mode: str, work: Path) -> dict[str, Any]:
    out = work / f"out-{mode}.pt"
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()),
        str(HELPER), mode, str(work), str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    job = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT
    )
    assert job.returncode == 0, f"{mode} with {nproc} ranks failed:\n{job.stderr[-4000:]}"
    result: dict[str, Any] = torch.load(out, weights_only=False)
    return result


@pytest.fixture(scope="module")
def jobs(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """Save on 2 ranks and restore there; restore on 1 rank and save; restore on 2 ranks."""
    work = tmp_path_factory.mktemp("sharded")
    results = torchrun(2, "save", work)
    results.update(torchrun(1, "one", work))
    results.update(torchrun(2, "two", work))
    return work, results


def data_bytes(checkpoint: Path) -> int:
    """Bytes of a checkpoint's data files (what a restore of everything would read)."""
    return sum(p.stat().st_size for p in checkpoint.rglob("*") if p.is_file() and p.name[0] != ".")


def assert_read_own_share(record: dict[str, Any]) -> None:
    """The rank read in place what it holds and little around it, and its process read no
    more than that plus the checkpoint's small files."""
    assert record["fast"], f"rank {record['rank']} went through torchsnapshot"
    assert record["bytes_wanted"] == record["share"], record
    # Around it: ranges widen to whole sidecar blocks (at most one each side), and a writer
    # may align tensors (gaps read through); replicated entries come from rank 0's file.
    slack = 6 * BLOCK_SIZE
    assert record["share"] <= record["bytes_read"] <= record["share"] + slack, record
    assert record["bytes_read"] <= record["process_read"] <= record["bytes_read"] + SMALL_FILES


def assert_same(
    saved: dict[str, torch.Tensor], restored: dict[str, torch.Tensor], prefix: str = ""
) -> None:
    keys = sorted(k for k in saved if k.startswith(prefix))
    assert keys and keys == sorted(k for k in restored if k.startswith(prefix))
    differing = [k for k in keys if not torch.equal(saved[k], restored[k])]
    assert differing == [], f"not restored bit-exactly: {differing}"


@pytest.mark.parametrize("layout", ["batched", "file per shard"])
def test_same_plan_reads_each_ranks_own_bytes_in_place(
    jobs: tuple[Path, dict[str, Any]], layout: str
) -> None:
    work, results = jobs
    total = data_bytes(work / "two" / ("1" if layout == "batched" else "2"))
    for record in results[layout]:
        assert record["same"], f"rank {record['rank']} did not get its own shards back"
        assert_read_own_share(record)
        assert 0.45 * total < record["share"] < 0.55 * total
        assert record["bytes_read"] < 0.6 * total  # not the other rank's shards
    if layout == "file per shard":  # torchsnapshot's unbatched layout: no byte ranges
        assert (work / "two" / "2" / "1" / "model").is_dir()


def test_a_flipped_byte_fails_the_rank_that_reads_it_and_only_that_rank(
    jobs: tuple[Path, dict[str, Any]],
) -> None:
    _, results = jobs
    rank_0, rank_1 = results["flipped"]
    flipped = results["flipped file"]
    assert rank_1["error_path"] == flipped and flipped in rank_1["error"]
    assert "bytes changed" in rank_1["error"]
    # Rank 0 never reads rank 1's file in the same plan: it restores, bit for bit.
    assert rank_0["error"] is None and rank_0["same"]
    assert_read_own_share(rank_0)


@pytest.mark.parametrize(
    ("check", "saved_by"),
    [
        ("2 -> 1 batched", "two"),
        ("2 -> 1 file per shard", "two"),
        ("row -> table", "two"),
        ("1 -> 2", "one"),
    ],
)
def test_other_world_size_or_plan_is_bit_exact_and_reads_only_held_rows(
    jobs: tuple[Path, dict[str, Any]], check: str, saved_by: str
) -> None:
    work, results = jobs
    saved = torch.load(work / f"saved-{saved_by}.pt", weights_only=False)
    assert_same(saved, results[f"{check} state"])
    total = data_bytes(work / saved_by / "1")
    records = results[check]
    for record in records:
        assert_read_own_share(record)
    if len(records) == 2:  # each rank holds its own part, and read that, not the checkpoint
        assert sum(r["share"] for r in records) == pytest.approx(total, rel=0.01)
        assert all(r["bytes_read"] < total for r in records), (records, total)


def test_a_column_split_takes_its_rectangle_from_whole_rows(
    jobs: tuple[Path, dict[str, Any]],
) -> None:
    work, results = jobs
    saved = torch.load(work / "saved-two.pt", weights_only=False)
    assert_same(saved, results["row -> column, model state"], prefix="model/")
    for record in results["row -> column, model"]:
        assert record["fast"]
        # t0's rows are read whole (32 columns) for the 16 the rank holds: 1.5x its share.
        assert record["share"] < record["bytes_wanted"] < 2 * record["share"]


class Unsharded(torch.nn.Module):
    """The helper's model without TorchRec: the same state-dict keys, whole tables."""

    def __init__(self) -> None:
        super().__init__()
        self.ebc = torch.nn.Module()
        self.ebc.embedding_bags = torch.nn.ModuleDict(
            {"t0": torch.nn.EmbeddingBag(131072, 32), "t1": torch.nn.EmbeddingBag(65536, 32)}
        )
        self.dense = torch.nn.Linear(64, 1)


def test_a_sharded_checkpoint_restores_in_place_into_an_unsharded_model(
    jobs: tuple[Path, dict[str, Any]], caplog: pytest.LogCaptureFixture
) -> None:
    work, _ = jobs
    checkpoint = work / "two" / "1"
    model = Unsharded()
    table = model.get_parameter("ebc.embedding_bags.t0.weight")
    with caplog.at_level(logging.INFO, logger="tml_checkpointing.reading.restore"):
        Snapshot(str(checkpoint.parent), {"model": model}).restore(str(checkpoint), keys=["model"])
    stats = [r.restore_stats for r in caplog.records if hasattr(r, "restore_stats")]
    assert len(stats) == 1 and stats[0] is not None, "not restored in place"
    saved = torch.load(work / "saved-two.pt", weights_only=False)
    restored = {f"model/{k}": v for k, v in model.state_dict().items()}
    assert_same(saved, restored, prefix="model/")
    assert model.get_parameter("ebc.embedding_bags.t0.weight") is table  # filled in place


# -- shard geometry, in one process ------------------------------------------------------------


def shard(offsets: list[int], values: torch.Tensor, location: str, at: int | None) -> Shard:
    """A saved shard of ``values``: bytes at ``at`` of ``location``, or the whole file."""
    nbytes = values.numel() * values.element_size()
    entry = TensorEntry(
        location=location,
        serializer="buffer_protocol",
        dtype=str(values.dtype),
        shape=list(values.shape),
        replicated=False,
        byte_range=None if at is None else [at, at + nbytes],
    )
    return Shard(offsets=offsets, sizes=list(values.shape), tensor=entry)


def write(path: Path, *parts: torch.Tensor) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"".join(p.contiguous().numpy().tobytes() for p in parts))


def restore_into(directory: Path, entry: ShardedTensorEntry, target: torch.Tensor) -> None:
    pieces = plan_shards(entry, target)
    assert pieces is not None
    plan = RestorePlan(order=[], containers={})
    for piece in pieces:
        plan_piece(plan, str(directory), piece)
    read_planned(plan, LocalFileSystem(), {}, str(directory))


def test_column_split_saved_shards_land_as_rectangles(tmp_path: Path) -> None:
    whole = torch.arange(6 * 5, dtype=torch.float32).reshape(6, 5)
    left, right = whole[:, :2], whole[:, 2:]
    write(tmp_path / "batched" / "a", torch.zeros(3), left, right)  # 12 bytes of padding first
    entry = ShardedTensorEntry(
        shards=[shard([0, 0], left, "batched/a", 12), shard([0, 2], right, "batched/a", 60)]
    )
    target = torch.full((6, 5), float("nan"))
    pieces = plan_shards(entry, target)
    assert pieces is not None and [p.rows for p in pieces] == [(6, 2), (6, 3)]
    restore_into(tmp_path, entry, target)
    assert torch.equal(target, whole)


def test_row_split_whole_file_shards_land_without_scratch(tmp_path: Path) -> None:
    whole = torch.randn(7, 3, dtype=torch.float64)
    write(tmp_path / "0" / "t_0_0", whole[:4])
    write(tmp_path / "1" / "t_4_0", whole[4:])
    entry = ShardedTensorEntry(
        shards=[
            shard([0, 0], whole[:4], "0/t_0_0", None),
            shard([4, 0], whole[4:], "1/t_4_0", None),
        ]
    )
    target = torch.zeros(7, 3, dtype=torch.float64)
    pieces = plan_shards(entry, target)
    assert pieces is not None and all(p.rows is None for p in pieces)
    assert [(p.start, p.end) for p in pieces] == [(0, 4 * 3 * 8), (0, 3 * 3 * 8)]
    restore_into(tmp_path, entry, target)
    assert torch.equal(target, whole)


def test_what_cannot_land_exactly_is_left_to_torchsnapshot() -> None:
    values = torch.zeros(4, 2)
    entry = ShardedTensorEntry(shards=[shard([0, 0], values, "batched/a", 0)])
    assert plan_shards(entry, torch.zeros(4, 2)) is not None
    assert plan_shards(entry, torch.zeros(4, 2, dtype=torch.float64)) is None  # another dtype
    assert plan_shards(entry, torch.zeros(5, 2)) is None  # another global shape
    assert plan_shards(entry, torch.zeros(2, 4).t()) is None  # not contiguous
    assert plan_shards(entry, [1, 2]) is None  # not a tensor
    pickled = ShardedTensorEntry(shards=[shard([0, 0], values, "batched/a", 0)])
    pickled.shards[0].tensor.serializer = "torch_save"
    assert plan_shards(pickled, torch.zeros(4, 2)) is None
    short = ShardedTensorEntry(shards=[shard([0, 0], values, "batched/a", 0)])
    short.shards[0].tensor.byte_range = [0, 16]  # fewer bytes than the shard's elements
    assert plan_shards(short, torch.zeros(4, 2)) is None
