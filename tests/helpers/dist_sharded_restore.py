"""One rank of the sharded fast-restore jobs of tests/test_sharded_restore.py (``torchrun``).

Usage: ``torchrun --nproc-per-node N ... dist_sharded_restore.py MODE WORK OUT``

The model: a TorchRec ``EmbeddingBagCollection`` of two tables large enough that byte counts
mean something against the sidecar's 1 MiB blocks (t0: 16 MiB, t1: 8 MiB, float32), fused
``RowWiseAdagrad`` in backward, a dense layer with Adam, in ``DistributedModelParallel`` under
a plan named ``row`` (both tables split by rows), ``table`` (t0 on rank 0, t1 on the last
rank) or ``column`` (t0 split by columns, t1 by rows).

Every restore records, per rank: which path it took (the ``restore_stats`` that
``tml_checkpointing.reading.restore`` puts on its log record: ``None`` = torchsnapshot), the
bytes the fast path read and wanted, the bytes the process read meanwhile (``rchar`` of
``/proc/self/io``: independent of the library's own counting), this rank's share of the state
(the bytes of the tensors it holds) and whether what it holds equals what was saved.

* ``save`` (2 ranks, row): train, save checkpoint A (``WORK/two/1``: the default writer's
  batched files, byte ranges) and B (``WORK/two/2``: the same state through torchsnapshot's
  writer with batching off: one file per shard, no byte ranges),
  write the full state to ``WORK/saved-two.pt``; then restore A and B into a fresh model of the
  same plan, and a copy of A with one byte flipped in a shard of rank 1's file
  (``WORK/flipped/1``).
* ``one`` (1 rank, table): restore A and B (2 ranks -> 1), train a step, save D
  (``WORK/one/1``), write its full state to ``WORK/saved-one.pt``.
* ``two`` (2 ranks): restore A into the ``table`` plan (row-wise -> table-wise), D into the
  ``row`` plan (1 rank -> 2), and A's model alone into the ``column`` plan (a strided copy).

Rank 0 writes ``{check: [per-rank record]}`` (plus full states where compared) to OUT.
"""

from __future__ import annotations

import datetime
import logging
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import (
    column_wise,
    construct_module_sharding_plan,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from tests.helpers.dist_torchrec import full_state
from tml_checkpointing import CorruptCheckpointError, Snapshot
from tml_checkpointing.snapshot import WriterChoice

TABLES = [("t0", "f0", 131072, 32), ("t1", "f1", 65536, 32)]
TIMEOUT = datetime.timedelta(seconds=30)
Built = tuple[DistributedModelParallel, CombinedOptimizer]


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=name, feature_names=[feature], num_embeddings=rows, embedding_dim=dim
                )
                for name, feature, rows, dim in TABLES
            ],
            device=torch.device("meta"),
        )
        self.dense = torch.nn.Linear(sum(dim for *_, dim in TABLES), 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        output: torch.Tensor = self.dense(self.ebc(features).values())
        return output


def build(kind: str, seed: int) -> Built:
    world = dist.get_world_size()
    first, *others = [name for name, *_ in TABLES]
    shardings: dict[str, Any] = {
        "row": {first: row_wise(), **{name: row_wise() for name in others}},
        "table": {first: table_wise(rank=0), **{n: table_wise(rank=world - 1) for n in others}},
        "column": {first: column_wise(ranks=list(range(world))), **{n: row_wise() for n in others}},
    }[kind]
    torch.manual_seed(seed)
    model = Model()
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": 0.1})
    module_plan = construct_module_sharding_plan(
        model.ebc,
        shardings,
        sharder=EmbeddingBagCollectionSharder(),
        local_size=world,
        world_size=world,
        device_type="cpu",
    )
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=ShardingPlan({"ebc": module_plan}),
        sharders=[EmbeddingBagCollectionSharder()],
    )
    with torch.no_grad():  # seed-dependent, rank-independent values: restored != fresh
        for name, tensor in dmp.state_dict().items():
            if "embedding_bags" in name:
                for shard in tensor.local_shards():
                    rows, cols = shard.metadata.shard_offsets
                    generator = torch.Generator().manual_seed(seed * 1000 + rows * 10 + cols)
                    shard.tensor.copy_(torch.randn(shard.tensor.shape, generator=generator))
    dense = KeyedOptimizerWrapper(
        {name: p for name, p in dmp.named_parameters() if "dense" in name},
        lambda params: torch.optim.Adam(params, lr=0.01),
    )
    dense.init_state()
    return dmp, CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", dense)])


def train(built: Built, steps: int, seed: int) -> None:
    dmp, opt = built
    for step in range(steps):
        generator = torch.Generator().manual_seed(seed * 100 + step * 7 + dist.get_rank())
        lengths = torch.randint(1, 4, (2 * 4,), generator=generator)
        ids = [
            torch.randint(0, rows, (int(lengths[i * 4 : i * 4 + 4].sum()),), generator=generator)
            for i, (_, _, rows, _) in enumerate(TABLES)
        ]
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=[feature for _, feature, _, _ in TABLES], values=torch.cat(ids), lengths=lengths
        )
        opt.zero_grad()
        dmp(features).pow(2).mean().backward()
        opt.step()


def local_tensors(built: Built, keys: tuple[str, ...] = ("model", "optimizer")) -> dict[str, Any]:
    """This rank's own tensors (local shards by offsets, plain tensors), cloned."""
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

    dmp, opt = built
    found: dict[str, Any] = {}

    def walk(prefix: str, value: Any) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                walk(f"{prefix}/{key}", item)
        elif isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                found[f"{prefix}@{list(shard.metadata.shard_offsets)}"] = shard.tensor.clone()
        elif isinstance(value, torch.Tensor):
            found[prefix] = value.detach().clone()

    if "model" in keys:
        walk("model", dmp.state_dict())
    if "optimizer" in keys:
        walk("optimizer", opt.state_dict())
    return found


def share(tensors: dict[str, Any]) -> int:
    return sum(t.numel() * t.element_size() for t in tensors.values())


class Paths(logging.Handler):
    """Collects the ``restore_stats`` of each restore's log record."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.taken: list[Any] = []

    def emit(self, record: logging.LogRecord) -> None:
        if hasattr(record, "restore_stats"):
            self.taken.append(record.restore_stats)


PATHS = Paths()


def rchar() -> int:
    for line in Path("/proc/self/io").read_text().splitlines():
        if line.startswith("rchar:"):
            return int(line.split()[1])
    raise RuntimeError("no rchar in /proc/self/io")


def restore(
    built: Built, checkpoint: Path, expected: dict[str, Any] | None, keys: list[str] | None = None
) -> dict[str, Any]:
    """Restore ``checkpoint`` into ``built``; what happened on this rank."""
    taken = len(PATHS.taken)
    before = rchar()
    record: dict[str, Any] = {"rank": dist.get_rank(), "error": None, "error_path": None}
    try:
        state = {"model": built[0], "optimizer": built[1]}
        Snapshot(str(checkpoint.parent), state).restore(str(checkpoint), keys=keys)
    except CorruptCheckpointError as error:
        record["error"], record["error_path"] = str(error), error.path
    record["process_read"] = rchar() - before
    stats = PATHS.taken[taken] if len(PATHS.taken) > taken else "no log record"
    record["fast"] = stats is not None and stats != "no log record"
    record["bytes_read"] = getattr(stats, "bytes_read", None)
    record["bytes_wanted"] = getattr(stats, "bytes_wanted", None)
    held = local_tensors(built, tuple(keys or ("model", "optimizer")))
    record["share"] = share(held)
    if expected is not None:
        record["same"] = held.keys() == expected.keys() and all(
            torch.equal(held[k], expected[k]) for k in held
        )
    return record


def gathered(record: dict[str, Any]) -> list[dict[str, Any]]:
    records: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(records, record)
    return records


def save(built: Built, save_dir: Path, step: int, writer: WriterChoice = "auto") -> None:
    state = {"model": built[0], "optimizer": built[1]}
    Snapshot(str(save_dir), state, writer=writer).save(step).wait()


def flip_in_rank_1(source: Path, target: Path) -> str:
    """Copy ``source`` to ``target``, flip one byte in rank 1's shard of t0; its file."""
    shutil.copytree(source, target)
    metadata = (target / ".snapshot_metadata").read_text()
    import json

    entry = json.loads(metadata)["manifest"]["1/model/ebc.embedding_bags.t0.weight"]
    stored = entry["shards"][0]["tensor"]
    start, end = stored["byte_range"] or (0, (target / stored["location"]).stat().st_size)
    path = target / stored["location"]
    with open(path, "r+b") as handle:
        handle.seek((start + end) // 2)
        byte = handle.read(1)
        handle.seek((start + end) // 2)
        handle.write(bytes([byte[0] ^ 0x01]))
    return str(stored["location"])


def main() -> None:
    mode, work_arg, out = sys.argv[1:4]
    work = Path(work_arg)
    dist.init_process_group("gloo", timeout=TIMEOUT)
    logger = logging.getLogger("tml_checkpointing.reading.restore")
    logger.setLevel(logging.INFO)
    logger.addHandler(PATHS)
    rank = dist.get_rank()
    result: dict[str, Any] = {}
    if mode == "save":
        built = build("row", seed=1)
        train(built, steps=3, seed=1)
        expected = local_tensors(built)
        save(built, work / "two", 1)
        os.environ["TORCHSNAPSHOT_DISABLE_BATCHING"] = "1"  # one file per shard
        save(built, work / "two", 2, writer="torchsnapshot")
        del os.environ["TORCHSNAPSHOT_DISABLE_BATCHING"]
        full = full_state(*built)
        if rank == 0:
            torch.save(full, work / "saved-two.pt")
        for name, step in (("batched", 1), ("file per shard", 2)):
            result[name] = gathered(
                restore(build("row", seed=2), work / "two" / str(step), expected)
            )
        flipped = ""
        if rank == 0:
            flipped = flip_in_rank_1(work / "two" / "1", work / "flipped" / "1")
        dist.barrier()
        result["flipped"] = gathered(
            restore(build("row", seed=3), work / "flipped" / "1", expected)
        )
        result["flipped file"] = flipped
    elif mode == "one":
        for name, step in (("2 -> 1 batched", 1), ("2 -> 1 file per shard", 2)):
            built = build("table", seed=2)
            result[name] = [restore(built, work / "two" / str(step), None)]
            result[f"{name} state"] = full_state(*built)
        train(built, steps=1, seed=4)
        save(built, work / "one", 1)
        torch.save(full_state(*built), work / "saved-one.pt")
    elif mode == "two":
        for name, kind, checkpoint, keys in (
            ("row -> table", "table", work / "two" / "1", None),
            ("1 -> 2", "row", work / "one" / "1", None),
            ("row -> column, model", "column", work / "two" / "1", ["model"]),
        ):
            built = build(kind, seed=2)
            result[name] = gathered(restore(built, checkpoint, None, keys))
            result[f"{name} state"] = full_state(*built)
    else:
        raise SystemExit(f"unknown mode {mode}")
    if rank == 0:
        torch.save(result, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
