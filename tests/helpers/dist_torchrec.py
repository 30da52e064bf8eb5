"""One rank of a small TorchRec job, run by tests/test_distributed.py under ``torchrun``.

Usage: ``torchrun --nproc-per-node N ... dist_torchrec.py MODE CKPT PLAN OUT``

* ``save``: train a sharded ``EmbeddingBagCollection`` (wrapped in ``DistributedModelParallel``,
  fused row-wise Adagrad in backward) and a dense layer for a few steps, save it through
  ``tml_checkpointing.Snapshot`` with ``{"model": dmp, "optimizer": opt}`` as *separate* entries
  (the original tml layout, torchsnapshot issue 135) and write the full (gathered) state to OUT.
* ``save-chain``: the same training, saved by an *incremental* ``Snapshot`` after every
  step (steps 1..CHAIN_SAVES, one full checkpoint then deltas of the changed rows of every
  rank's shards); CKPT is the save_dir, OUT gets the full state at the last step.
* ``restore``: build the same model with other weights under PLAN (any world size), restore
  CKPT with ``Snapshot.restore`` and write the full state to OUT.
* ``plain+restore``: first try the same restore through plain
  ``torchsnapshot.Snapshot(CKPT).restore`` and record its error under ``__plain_error__``
  (expected: 0.1.0's "Reading a ShardedTensor without a runtime object"), then ``restore``.

PLAN is ``table`` (each table on one rank), ``row`` (every table split by rows over all ranks)
or ``mixed`` (table 0 row-wise, table 1 on the last rank). OUT is written by rank 0.
Collective timeouts are short so a dead rank fails the job instead of hanging it.
"""

from __future__ import annotations

import datetime
import os
import sys
from typing import Any

import torch
import torch.distributed as dist
import torchsnapshot
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise, table_wise
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from tml_checkpointing import Snapshot

TABLES = [("t0", ["f0"], 40, 8), ("t1", ["f1"], 24, 8)]
TIMEOUT = datetime.timedelta(seconds=30)
CHAIN_SAVES = 5
MIN_CHAINED_BYTES = 64  # the tables here are tiny: chain them anyway


class Model(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ebc = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=name, feature_names=feats, num_embeddings=rows, embedding_dim=dim
                )
                for name, feats, rows, dim in TABLES
            ],
            device=torch.device("meta"),
        )
        self.dense = torch.nn.Linear(sum(dim for *_, dim in TABLES), 1)

    def forward(self, features: KeyedJaggedTensor) -> torch.Tensor:
        return self.dense(self.ebc(features).values())


def plan_for(model: Model, kind: str, world_size: int) -> ShardingPlan:
    last = world_size - 1
    shardings: dict[str, Any] = {
        "table": {"t0": table_wise(rank=0), "t1": table_wise(rank=last)},
        "row": {"t0": row_wise(), "t1": row_wise()},
        "mixed": {"t0": row_wise(), "t1": table_wise(rank=last)},
    }[kind]
    module_plan = construct_module_sharding_plan(
        model.ebc,
        shardings,
        sharder=EmbeddingBagCollectionSharder(),
        local_size=world_size,
        world_size=world_size,
        device_type="cpu",
    )
    return ShardingPlan({"ebc": module_plan})


def build(kind: str, seed: int) -> tuple[DistributedModelParallel, CombinedOptimizer]:
    torch.manual_seed(seed)
    model = Model()
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": 0.1})
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=plan_for(model, kind, dist.get_world_size()),
        sharders=[EmbeddingBagCollectionSharder()],
    )
    # Materialised tables are initialised per rank: give them seed-dependent, rank-independent
    # values so that "restored" is distinguishable from "freshly built".
    with torch.no_grad():
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
    dense.init_state()  # Adam's state exists before the first step, as load_state_dict needs
    return dmp, CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", dense)])


def batch(step: int) -> KeyedJaggedTensor:
    generator = torch.Generator().manual_seed(step * 7 + dist.get_rank())
    lengths = torch.randint(1, 4, (2 * 4,), generator=generator)
    ids = [
        torch.randint(0, rows, (int(lengths[i * 4 : i * 4 + 4].sum()),), generator=generator)
        for i, (_, _, rows, _) in enumerate(TABLES)
    ]
    return KeyedJaggedTensor.from_lengths_sync(
        keys=["f0", "f1"], values=torch.cat(ids), lengths=lengths
    )


def train(dmp: DistributedModelParallel, opt: CombinedOptimizer, steps: int) -> None:
    for step in range(steps):
        opt.zero_grad()
        dmp(batch(step)).pow(2).mean().backward()
        opt.step()


def full_state(dmp: DistributedModelParallel, opt: CombinedOptimizer) -> dict[str, torch.Tensor]:
    """Every tensor of model and optimizer as a full tensor on rank 0.

    Sharded tensors are assembled from every rank's local shards (sent as objects, not through
    ``ShardedTensor.gather``: with table-wise plans a rank holds no optimizer state at all for a
    table on another rank, so the ranks' keys differ and a collective per key would mismatch).
    """
    from torch.distributed._shard.sharded_tensor import ShardedTensor

    def flat(prefix: str, value: Any, out: dict[str, Any]) -> None:
        if isinstance(value, dict):
            for key, item in value.items():
                flat(f"{prefix}/{key}", item, out)
        elif isinstance(value, torch.Tensor):
            out[prefix] = value

    items: dict[str, Any] = {}
    flat("model", dmp.state_dict(), items)
    flat("optimizer", opt.state_dict(), items)
    pieces: dict[str, Any] = {}
    for key, value in items.items():
        if isinstance(value, ShardedTensor):
            shards = [
                (list(s.metadata.shard_offsets), s.tensor.detach().clone())
                for s in value.local_shards()
            ]
            pieces[key] = ("sharded", list(value.size()), shards)
        else:
            pieces[key] = ("plain", None, value.detach().clone())
    gathered: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(gathered, pieces)
    result: dict[str, torch.Tensor] = {}
    for rank_pieces in gathered:
        for key, (kind, size, payload) in rank_pieces.items():
            if kind == "plain":
                result.setdefault(key, payload)
                continue
            full = result.setdefault(key, torch.full(size, float("nan")))
            for offsets, tensor in payload:
                index = tuple(slice(o, o + n) for o, n in zip(offsets, tensor.shape, strict=True))
                full[index] = tensor
    return result


def main() -> None:
    mode, checkpoint, kind, out = sys.argv[1:5]
    dist.init_process_group("gloo", timeout=TIMEOUT)
    rank = dist.get_rank()
    if mode == "save":
        dmp, opt = build(kind, seed=1)
        train(dmp, opt, steps=3)
        save_dir, step = os.path.split(checkpoint)
        snapshot = Snapshot(save_dir, {"model": dmp, "optimizer": opt})
        snapshot.save(int(step)).wait()
        state = full_state(dmp, opt)
    elif mode == "save-chain":
        dmp, opt = build(kind, seed=1)
        snapshot = Snapshot(
            checkpoint,
            {"model": dmp, "optimizer": opt},
            incremental=True,
            min_chained_bytes=MIN_CHAINED_BYTES,
            max_chain_fraction=10.0,  # tiny tables: most rows change; keep the deltas anyway
        )
        for step in range(1, CHAIN_SAVES + 1):
            train(dmp, opt, steps=1)
            snapshot.save(step).wait()
        state = full_state(dmp, opt)
    else:
        dmp, opt = build(kind, seed=2)
        state = {}
        if mode == "plain+restore":
            # Plain torchsnapshot first: it must fail (issue 135) before reading anything.
            try:
                torchsnapshot.Snapshot(checkpoint).restore({"model": dmp, "optimizer": opt})
                plain_error = ""
            except Exception as error:
                plain_error = f"{type(error).__name__}: {error}"
            state["__plain_error__"] = plain_error
        snapshot = Snapshot(os.path.dirname(checkpoint), {"model": dmp, "optimizer": opt})
        snapshot.restore(checkpoint)
        state.update(full_state(dmp, opt))
        state["__step__"] = snapshot.step
    if rank == 0:
        torch.save(state, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
