"""Small recipes for the run-identity tests: same data as the default, models of two widths.

``narrow`` and ``narrow_shifted`` build the same model (so a checkpoint of one restores into
the other) on different data; ``wide`` builds a model whose tensors have other shapes.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from recipes.base import Batch, Recipe, RecipeParams
from recipes.ranking import DENSE, HEADS, evaluate_heads, synthetic_engagements

EXAMPLES = 1024


class DenseHeads(nn.Module):
    """Dense features -> hidden layer of ``width`` -> one logit per engagement head."""

    def __init__(self, width: int) -> None:
        super().__init__()
        self.hidden = nn.Linear(DENSE, width)
        self.heads = nn.Linear(width, len(HEADS))

    def forward(self, batch: Batch) -> torch.Tensor:
        return self.heads(torch.relu(self.hidden(batch["dense"])))


def _build(params: RecipeParams, width: int, data_seed: int) -> Recipe:
    torch.manual_seed(params.seed)
    model = DenseHeads(width)
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    train = synthetic_engagements(data_seed, EXAMPLES)
    loss_fn = nn.BCEWithLogitsLoss()

    def train_batch(epoch: int, index: int) -> Batch:
        order = torch.randperm(EXAMPLES, generator=torch.Generator().manual_seed(epoch))
        rows = order[(torch.arange(params.batch_size) + index * params.batch_size) % EXAMPLES]
        return {key: value[rows] for key, value in train.items()}

    def eval_batches(partition: str, steps: int) -> Iterator[Batch]:
        data = synthetic_engagements(data_seed, steps * params.batch_size, salt=len(partition))
        for index in range(steps):
            rows = slice(index * params.batch_size, (index + 1) * params.batch_size)
            yield {key: value[rows] for key, value in data.items()}

    return Recipe(
        model=model,
        optimizer=optimizer,
        loss=lambda module, batch: loss_fn(module(batch), batch["labels"]),
        train_batch=train_batch,
        eval_batches=eval_batches,
        evaluate=evaluate_heads,
    )


def narrow(params: RecipeParams) -> Recipe:
    return _build(params, width=8, data_seed=params.seed)


def narrow_shifted(params: RecipeParams) -> Recipe:
    """The model of ``narrow`` on other data (a recipe change that keeps every shape)."""
    return _build(params, width=8, data_seed=params.seed + 1000)


def wide(params: RecipeParams) -> Recipe:
    return _build(params, width=16, data_seed=params.seed)
