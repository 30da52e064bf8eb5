"""A TorchRec ranking recipe: an ``EmbeddingBagCollection`` of id tables and a dense MLP.

The shape of the original's recommendation models: one embedding table per sparse feature
(user, author and a few categorical features, one of them multi-hot), pooled by an
``EmbeddingBagCollection`` and fed, with dense features, to a shared MLP with one logit per
engagement head (the heads of ``recipes.ranking``). The data is a synthetic engagement log drawn
from a hidden ground-truth model fixed by the seed, with Zipf-distributed ids: a few hot users,
authors and topics account for most rows, as in real traffic (and as row-wise sharding and
Adagrad are designed for).

Sharding: the model is always wrapped in TorchRec's ``DistributedModelParallel`` (DMP), as the
original's is: the tables are split by rows over the ranks of the default process group (or
placed whole, ``plan="table"``), the dense part is data-parallel, and the tables are trained by
TorchRec's fused row-wise Adagrad (one accumulator per row, applied inside the backward pass,
``EXACT_ROWWISE_ADAGRAD``); the dense part by Adam. Both are joined in one
``CombinedOptimizer`` keyed by parameter name, so a checkpoint of ``{"model", "optimizer"}``
means the same thing for any number of ranks: a checkpoint saved by N ranks restores with M.
One process with no process group gets a private one-rank group (:func:`ensure_process_group`),
so the evaluator and ``tml train`` without ``--nproc-per-node`` run the very same model.

Initial weights do not depend on the world size either: each table is drawn whole from a
generator seeded by (seed, table) and every rank keeps its rows of it.

Batches: ``batch_size`` is the per-rank batch (TorchRec's convention). Batch ``index`` of
``epoch`` on ``rank`` of ``world_size`` holds the examples at positions
``[(index * world_size + rank) * batch_size, ... + batch_size)`` of the epoch's permutation of a
fixed example pool: a pure function of (seed, epoch, index, rank, world_size), and one global
step with N ranks consumes exactly the examples of N consecutive one-rank steps. Ids travel as
padded tensors (``ids/<feature>``, ``lengths/<feature>``) so that a batch stays a mapping of
tensors that slices row-wise; the model builds the ``KeyedJaggedTensor`` in ``forward``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
import torch.distributed as dist
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.sharding_plan import (
    construct_module_sharding_plan,
    row_wise,
    table_wise,
)
from torchrec.distributed.types import ShardingEnv, ShardingPlan
from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

from .base import Batch, Recipe, RecipeParams
from .data import partition_salt, seeded_generator, sliced_batches
from .process_group import ensure_process_group
from .ranking import HEADS, evaluate_heads

EMBEDDINGS = "embeddings"  # module name of the EmbeddingBagCollection in the model


@dataclass(frozen=True)
class SparseFeature:
    """One id feature and its table: ``num_ids`` rows, up to ``max_ids`` ids per example."""

    name: str
    num_ids: int
    max_ids: int = 1


@dataclass(frozen=True)
class TorchRecRankingSizes:
    """Sizes of the model and data; the defaults keep a CI step in milliseconds."""

    features: tuple[SparseFeature, ...] = (
        SparseFeature("user", 2000),
        SparseFeature("author", 500),
        SparseFeature("topic", 100, max_ids=3),  # multi-hot: 1..3 topics per example
        SparseFeature("language", 30),
        SparseFeature("country", 60),
    )
    embedding_dim: int = 16
    dense_features: int = 16
    hidden: tuple[int, ...] = (128, 64)
    train_examples: int = 8192
    zipf_exponent: float = 1.1  # P(k-th most popular id) ~ 1 / k**s
    embedding_lr: float = 0.05  # row-wise Adagrad; the dense part's Adam uses RecipeParams.lr
    plan: Literal["row", "table"] = "row"  # tables split by rows over all ranks, or whole

    @property
    def feature_names(self) -> tuple[str, ...]:
        return tuple(feature.name for feature in self.features)


class TorchRecRankingModel(nn.Module):
    """Pooled embeddings (one table per feature) + dense features -> MLP -> one logit per head."""

    def __init__(self, sizes: TorchRecRankingSizes, device: torch.device | None = None) -> None:
        super().__init__()
        self.feature_names = sizes.feature_names
        self.embeddings = EmbeddingBagCollection(
            tables=[
                EmbeddingBagConfig(
                    name=f"t_{feature.name}",
                    embedding_dim=sizes.embedding_dim,
                    num_embeddings=feature.num_ids,
                    feature_names=[feature.name],
                )
                for feature in sizes.features
            ],
            device=device or torch.device("cpu"),
        )
        layers: list[nn.Module] = []
        width = sizes.embedding_dim * len(sizes.features) + sizes.dense_features
        for hidden in sizes.hidden:
            layers += [nn.Linear(width, hidden), nn.ReLU()]
            width = hidden
        self.mlp = nn.Sequential(*layers)
        self.heads = nn.Linear(width, len(HEADS))

    def sparse_features(self, batch: Batch) -> KeyedJaggedTensor:
        """The batch's padded ids as the jagged tensor an EmbeddingBagCollection reads."""
        values, lengths = [], []
        for name in self.feature_names:
            ids, count = batch[f"ids/{name}"], batch[f"lengths/{name}"]
            mask = torch.arange(ids.shape[1]) < count.unsqueeze(1)
            values.append(ids[mask])  # row-major: the ids of row 0, then row 1, ...
            lengths.append(count)
        return KeyedJaggedTensor.from_lengths_sync(
            keys=list(self.feature_names), values=torch.cat(values), lengths=torch.cat(lengths)
        )

    def forward(self, batch: Batch) -> torch.Tensor:
        pooled = self.embeddings(self.sparse_features(batch)).values()
        logits: torch.Tensor = self.heads(self.mlp(torch.cat([pooled, batch["dense"]], dim=1)))
        return logits  # (Module.__call__ is untyped)


def zipf_ids(
    num_ids: int, count: int, exponent: float, popularity: torch.Tensor, draw: torch.Generator
) -> torch.Tensor:
    """``count`` ids where the k-th most popular is drawn with probability ~ 1/k**exponent.

    ``popularity`` (a permutation of the ids) says which id is k-th most popular, so hot ids are
    spread over the table instead of being its first rows.
    """
    weights = 1.0 / torch.arange(1, num_ids + 1, dtype=torch.float64) ** exponent
    ranks = torch.multinomial(weights, count, replacement=True, generator=draw)
    return popularity[ranks]


def synthetic_engagements(
    sizes: TorchRecRankingSizes, seed: int, count: int, salt: int = 0
) -> dict[str, torch.Tensor]:
    """An engagement log drawn from a hidden ground-truth model fixed by ``seed``."""
    truth = seeded_generator(seed, 0)
    draw = seeded_generator(seed, 1, salt)
    heads = len(HEADS)
    dense = torch.randn(count, sizes.dense_features, generator=draw)
    dense_weight = torch.randn(sizes.dense_features, heads, generator=truth) * 0.5
    logits = dense @ dense_weight - 1.0
    data: dict[str, torch.Tensor] = {"dense": dense}
    for feature in sizes.features:
        effect = torch.randn(feature.num_ids, heads, generator=truth) / feature.max_ids
        popularity = torch.randperm(feature.num_ids, generator=truth)
        ids = zipf_ids(
            feature.num_ids, count * feature.max_ids, sizes.zipf_exponent, popularity, draw
        ).view(count, feature.max_ids)
        lengths = torch.randint(1, feature.max_ids + 1, (count,), generator=draw)
        present = torch.arange(feature.max_ids) < lengths.unsqueeze(1)
        ids = torch.where(present, ids, torch.full_like(ids, -1))  # -1: padding, never read
        logits = logits + (effect[ids.clamp(min=0)] * present.unsqueeze(2)).sum(dim=1)
        data[f"ids/{feature.name}"] = ids
        data[f"lengths/{feature.name}"] = lengths
    data["labels"] = (torch.rand(count, heads, generator=draw) < torch.sigmoid(logits)).float()
    return data


def shard(
    model: TorchRecRankingModel, sizes: TorchRecRankingSizes, seed: int
) -> DistributedModelParallel:
    """``model`` wrapped for the default process group, tables trained by fused row-wise Adagrad.

    ``model`` is built on the meta device (no table memory); each rank materialises its rows
    and fills them from the whole-table draw, so weights do not depend on the world size.
    """
    world_size = dist.get_world_size()
    apply_optimizer_in_backward(
        RowWiseAdagrad, model.embeddings.parameters(), {"lr": sizes.embedding_lr}
    )
    sharder = EmbeddingBagCollectionSharder()
    plan = construct_module_sharding_plan(
        model.embeddings,
        {
            f"t_{feature.name}": row_wise()
            if sizes.plan == "row"
            else table_wise(rank=index % world_size)
            for index, feature in enumerate(sizes.features)
        },
        sharder=sharder,
        local_size=world_size,
        world_size=world_size,
        device_type="cpu",
    )
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=ShardingPlan({EMBEDDINGS: plan}),
        sharders=[sharder],
    )
    _fill_tables(dmp, sizes, seed)
    return dmp


def _fill_tables(dmp: DistributedModelParallel, sizes: TorchRecRankingSizes, seed: int) -> None:
    """Each table drawn whole (N(0, 1/dim), seeded by table), each rank keeping its rows."""
    state = dmp.state_dict()
    with torch.no_grad():
        for index, feature in enumerate(sizes.features):
            table = state[f"{EMBEDDINGS}.embedding_bags.t_{feature.name}.weight"]
            draw = seeded_generator(seed, 3, index)
            full = torch.randn(feature.num_ids, sizes.embedding_dim, generator=draw)
            full /= sizes.embedding_dim**0.5
            for piece in table.local_shards():
                rows, cols = piece.metadata.shard_offsets
                height, width = piece.tensor.shape
                piece.tensor.copy_(full[rows : rows + height, cols : cols + width])


def build_optimizer(dmp: DistributedModelParallel, dense_lr: float) -> CombinedOptimizer:
    """The tables' fused row-wise Adagrad and Adam for the rest, as one keyed optimizer.

    Adam's state is initialised eagerly (``init_state``: one step with zero gradients, which
    moves no weight but starts the step counters at 1) because a ``KeyedOptimizer`` only loads
    a checkpoint into existing state; without it a fresh process could not restore. The fused
    optimizer's state exists from construction. Hyperparameters are saved with the state, as a
    plain torch optimizer's are.
    """
    dense_parameters = {
        name: parameter
        for name, parameter in dmp.named_parameters()
        if not name.startswith(f"{EMBEDDINGS}.")
    }
    dense = KeyedOptimizerWrapper(dense_parameters, lambda p: torch.optim.Adam(p, lr=dense_lr))
    dense.save_param_groups(True)
    dense.init_state()
    dmp.zero_grad(set_to_none=True)
    sparse = dmp.fused_optimizer
    sparse.save_param_groups(True)  # CombinedOptimizer wants every part to agree
    return CombinedOptimizer([("sparse", sparse), ("dense", dense)])


def train_batches(
    params: RecipeParams, sizes: TorchRecRankingSizes, rank: int, world_size: int
) -> Callable[[int, int], Batch]:
    """``train_batch(epoch, index)`` of ``rank`` of ``world_size`` (see the module docstring)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    pool = sizes.train_examples
    train = synthetic_engagements(sizes, params.seed, pool)

    def train_batch(epoch: int, index: int) -> Batch:
        order = torch.randperm(pool, generator=seeded_generator(params.seed, 2, epoch))
        start = (index * world_size + rank) * params.batch_size
        rows = order[(torch.arange(params.batch_size) + start) % pool]
        return {key: value[rows] for key, value in train.items()}

    return train_batch


def build_recipe(params: RecipeParams, sizes: TorchRecRankingSizes | None = None) -> Recipe:
    """The recipe for this process's rank of the default process group (one-rank if none)."""
    sizes = sizes or TorchRecRankingSizes()
    rank, world_size = ensure_process_group()
    torch.manual_seed(params.seed)  # same dense weights on every rank, in every run
    model = shard(TorchRecRankingModel(sizes, device=torch.device("meta")), sizes, params.seed)
    optimizer = build_optimizer(model, dense_lr=params.lr)
    loss_fn = nn.BCEWithLogitsLoss()

    def loss(module: nn.Module, batch: Batch) -> torch.Tensor:
        value: torch.Tensor = loss_fn(module(batch), batch["labels"])  # Module.__call__: Any
        return value

    def eval_batches(partition: str, steps: int) -> Iterator[Batch]:
        data = synthetic_engagements(
            sizes, params.seed, steps * params.batch_size, salt=partition_salt(partition)
        )
        yield from sliced_batches(data, steps, params.batch_size)

    return Recipe(
        model=model,
        optimizer=optimizer,
        loss=loss,
        train_batch=train_batches(params, sizes, rank, world_size),
        eval_batches=eval_batches,
        evaluate=evaluate_heads,
    )


def build(params: RecipeParams) -> Recipe:
    """The TorchRec recipe (``recipes.torchrec_ranking:build``), default sizes."""
    return build_recipe(params)
