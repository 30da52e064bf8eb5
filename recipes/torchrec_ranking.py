"""A TorchRec ranking recipe: an ``EmbeddingBagCollection`` of id tables and a dense MLP.

The shape of the original's recommendation models: one embedding table per sparse feature
(user, author and a few categorical features, one of them multi-hot), pooled by an
``EmbeddingBagCollection`` and fed, with dense features, to a shared MLP with one logit per
engagement head (the heads of ``recipes.ranking``). The data is a synthetic engagement log drawn
from a hidden ground-truth model fixed by the seed, with Zipf-distributed ids: a few hot users,
authors and topics account for most rows, as in real traffic (and as row-wise sharding and
Adagrad are designed for).

Optimizers, in one process: plain ``torch.optim.Adagrad`` for the embedding tables and
``torch.optim.Adam`` for the dense part, each wrapped in TorchRec's ``KeyedOptimizerWrapper``
and joined by a ``CombinedOptimizer`` (one object with ``state_dict``/``load_state_dict`` keyed
by parameter name, so Snapshot checkpoints it as one entry). Plain Adagrad here is *dense*
Adagrad: one accumulator per weight. The original's *row-wise* Adagrad (one accumulator per row)
is a property of the sharded fbgemm kernel (``EmbOptimType.EXACT_ROWWISE_ADAGRAD``, fused into
the backward pass); it comes with the distributed wrapping (``DistributedModelParallel``), whose
``fused_optimizer`` is also a ``KeyedOptimizer`` and takes the place of the sparse wrapper here.

Batches: ``batch_size`` is the per-rank batch (TorchRec's convention). Batch ``index`` of
``epoch`` on ``rank`` of ``world_size`` holds the examples at positions
``[(index * world_size + rank) * batch_size, ... + batch_size)`` of the epoch's permutation of a
fixed example pool: a pure function of (seed, epoch, index, rank, world_size), and one global
step with N ranks consumes exactly the examples of N consecutive one-rank steps. In one process
``rank=0, world_size=1``. Ids travel as padded tensors (``ids/<feature>``,
``lengths/<feature>``) so that a batch stays a mapping of tensors that slices row-wise; the model
builds the ``KeyedJaggedTensor`` in ``forward``.

Ranks: ``build`` is rank 0 of 1. The multi-rank step gives ``RecipeParams`` ``rank: int = 0`` and
``world_size: int = 1`` (defaults: other recipes and one-process runs unchanged) and ``build``
passes them to ``build_recipe``, which then wraps the model in ``DistributedModelParallel``
(fused row-wise Adagrad in backward) and combines its ``fused_optimizer`` with the dense Adam.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper

from .base import Batch, Recipe, RecipeParams
from .data import partition_salt, seeded_generator, sliced_batches
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
    embedding_lr: float = 0.05  # Adagrad; the dense part's Adam uses RecipeParams.lr

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
        return self.heads(self.mlp(torch.cat([pooled, batch["dense"]], dim=1)))


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


def build_optimizer(
    model: TorchRecRankingModel, dense_lr: float, embedding_lr: float
) -> CombinedOptimizer:
    """Adagrad for the tables, Adam for the rest, as one keyed optimizer.

    The state is initialised eagerly (``init_state``: one step with zero gradients, which moves
    no weight but starts the step counters at 1) because a ``KeyedOptimizer`` only loads a
    checkpoint into existing state; without it a fresh process could not restore.
    Hyperparameters are saved with the state, as a plain torch optimizer's are.
    """
    named = dict(model.named_parameters())
    sparse = {k: v for k, v in named.items() if k.startswith(f"{EMBEDDINGS}.")}
    dense = {k: v for k, v in named.items() if k not in sparse}
    parts: list[tuple[str, KeyedOptimizerWrapper]] = [
        (
            "sparse",
            KeyedOptimizerWrapper(sparse, lambda p: torch.optim.Adagrad(p, lr=embedding_lr)),
        ),
        ("dense", KeyedOptimizerWrapper(dense, lambda p: torch.optim.Adam(p, lr=dense_lr))),
    ]
    for _, part in parts:
        part.save_param_groups(True)
    optimizer = CombinedOptimizer(parts)
    optimizer.init_state()
    model.zero_grad(set_to_none=True)
    return optimizer


def build_recipe(
    params: RecipeParams,
    sizes: TorchRecRankingSizes | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> Recipe:
    """The recipe for one rank of ``world_size`` (one process: rank 0 of 1)."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank must be in [0, {world_size}), got {rank}")
    sizes = sizes or TorchRecRankingSizes()
    torch.manual_seed(params.seed)  # same initial weights on every rank
    model = TorchRecRankingModel(sizes)
    optimizer = build_optimizer(model, dense_lr=params.lr, embedding_lr=sizes.embedding_lr)
    pool = sizes.train_examples
    train = synthetic_engagements(sizes, params.seed, pool)
    loss_fn = nn.BCEWithLogitsLoss()

    def loss(module: nn.Module, batch: Batch) -> torch.Tensor:
        return loss_fn(module(batch), batch["labels"])

    def train_batch(epoch: int, index: int) -> Batch:
        order = torch.randperm(pool, generator=seeded_generator(params.seed, 2, epoch))
        start = (index * world_size + rank) * params.batch_size
        rows = order[(torch.arange(params.batch_size) + start) % pool]
        return {key: value[rows] for key, value in train.items()}

    def eval_batches(partition: str, steps: int) -> Iterator[Batch]:
        data = synthetic_engagements(
            sizes, params.seed, steps * params.batch_size, salt=partition_salt(partition)
        )
        yield from sliced_batches(data, steps, params.batch_size)

    return Recipe(
        model=model,
        optimizer=optimizer,
        loss=loss,
        train_batch=train_batch,
        eval_batches=eval_batches,
        evaluate=evaluate_heads,
    )


def build(params: RecipeParams) -> Recipe:
    """The TorchRec recipe (``recipes.torchrec_ranking:build``), default sizes, one process."""
    return build_recipe(params)
