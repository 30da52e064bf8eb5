"""The built-in recipe: a small ranking model in the spirit of Twitter's heavy ranker.

Embeddings for user and author ids plus dense features feed a shared MLP with one logit per
engagement head (like, reply, retweet, click), trained with binary cross-entropy. The data is a
synthetic engagement log generated locally from the seed by a hidden "true" model, so there is
something real to learn, nothing to download, and every batch is a pure function of
(seed, epoch, index).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator

import torch
from torch import nn

from .base import Batch, Recipe, RecipeParams
from .data import partition_salt, seeded_generator, sliced_batches

HEADS = ("like", "reply", "retweet", "click")
NUM_USERS, NUM_AUTHORS, DENSE, EMBED = 1000, 400, 16, 16
TRAIN_EXAMPLES = 8192


class RankingModel(nn.Module):
    """Two id embeddings + dense features -> shared MLP -> one logit per engagement head."""

    def __init__(self) -> None:
        super().__init__()
        self.user = nn.Embedding(NUM_USERS, EMBED)
        self.author = nn.Embedding(NUM_AUTHORS, EMBED)
        self.mlp = nn.Sequential(
            nn.Linear(2 * EMBED + DENSE, 128),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Linear(128, 64),
            nn.ReLU(),
        )
        self.heads = nn.Linear(64, len(HEADS))

    def forward(self, batch: Batch) -> torch.Tensor:
        features = torch.cat(
            [self.user(batch["user"]), self.author(batch["author"]), batch["dense"]], dim=1
        )
        logits: torch.Tensor = self.heads(self.mlp(features))  # Module.__call__ is untyped
        return logits


def synthetic_engagements(seed: int, count: int, salt: int = 0) -> dict[str, torch.Tensor]:
    """An engagement log drawn from a hidden ground-truth model fixed by ``seed``."""
    truth = seeded_generator(seed, 0)
    user_taste = torch.randn(NUM_USERS, len(HEADS), generator=truth)
    author_appeal = torch.randn(NUM_AUTHORS, len(HEADS), generator=truth)
    dense_weight = torch.randn(DENSE, len(HEADS), generator=truth) * 0.5
    draw = seeded_generator(seed, 1, salt)
    user = torch.randint(0, NUM_USERS, (count,), generator=draw)
    author = torch.randint(0, NUM_AUTHORS, (count,), generator=draw)
    dense = torch.randn(count, DENSE, generator=draw)
    logits = user_taste[user] + author_appeal[author] + dense @ dense_weight - 1.0
    labels = (torch.rand(count, len(HEADS), generator=draw) < torch.sigmoid(logits)).float()
    return {"user": user, "author": author, "dense": dense, "labels": labels}


def build(params: RecipeParams) -> Recipe:
    """The default recipe (``recipes.ranking:build``)."""
    torch.manual_seed(params.seed)
    model = RankingModel()
    optimizer = torch.optim.Adam(model.parameters(), lr=params.lr)
    train = synthetic_engagements(params.seed, TRAIN_EXAMPLES)
    loss_fn = nn.BCEWithLogitsLoss()

    def loss(module: nn.Module, batch: Batch) -> torch.Tensor:
        value: torch.Tensor = loss_fn(module(batch), batch["labels"])  # Module.__call__: Any
        return value

    def train_batch(epoch: int, index: int) -> Batch:
        order = torch.randperm(TRAIN_EXAMPLES, generator=seeded_generator(params.seed, 2, epoch))
        start = (index * params.batch_size) % TRAIN_EXAMPLES
        rows = order[(torch.arange(params.batch_size) + start) % TRAIN_EXAMPLES]
        return {key: value[rows] for key, value in train.items()}

    def eval_batches(partition: str, steps: int) -> Iterator[Batch]:
        data = synthetic_engagements(
            params.seed, steps * params.batch_size, salt=partition_salt(partition)
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


@torch.no_grad()
def evaluate_heads(model: nn.Module, batches: Iterable[Batch]) -> dict[str, float]:
    """Mean BCE loss and per-head accuracy over the batches."""
    was_training = model.training
    model.eval()
    total_loss, correct, count = 0.0, torch.zeros(len(HEADS)), 0
    for batch in batches:
        logits = model(batch)
        labels = batch["labels"]
        total_loss += nn.functional.binary_cross_entropy_with_logits(
            logits, labels, reduction="sum"
        ).item()
        correct += ((logits > 0).float() == labels).float().sum(dim=0)
        count += labels.shape[0]
    model.train(was_training)
    if count == 0:
        return {"loss": float("nan"), "examples": 0.0}
    metrics = {"loss": total_loss / (count * len(HEADS)), "examples": float(count)}
    metrics.update(
        {f"accuracy_{head}": (correct[i] / count).item() for i, head in enumerate(HEADS)}
    )
    return metrics
