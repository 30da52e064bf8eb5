"""The TorchRec ranking recipe in one process: builds, trains, pure batches, skewed ids, and a
bit-identical resume through the plain training functions (what ``tml train --recipe
recipes.torchrec_ranking:build`` runs in each epoch task)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from recipes.base import RecipeParams, load_recipe
from recipes.torchrec_ranking import (
    SparseFeature,
    TorchRecRankingSizes,
    build_recipe,
    train_batches,
)
from training.config import TrainConfig

from .training_helpers import assert_bit_identical, checkpoint_tensors, plain_run

RECIPE = "recipes.torchrec_ranking:build"
PARAMS = RecipeParams(seed=3, batch_size=64, lr=1e-2)
SMALL = {"epochs": 3, "steps_per_epoch": 4, "batch_size": 64, "seed": 7, "recipe": RECIPE}


def _equal(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_recipe_builds_and_training_lowers_the_loss() -> None:
    recipe = load_recipe(RECIPE)(PARAMS)
    names = dict(recipe.model.named_parameters())
    tables = [n for n in names if n.startswith("embeddings.")]
    assert len(tables) == 5 and any("t_user" in n for n in tables)
    assert any("t_author" in n for n in tables)
    # One keyed optimizer over every parameter: fused row-wise Adagrad (one accumulator per
    # row) for the tables, Adam for the rest.
    state = recipe.optimizer.state_dict()["state"]
    assert sorted(state) == sorted(f"sparse.{n}" if n in tables else f"dense.{n}" for n in names)
    user = state["sparse.embeddings.embedding_bags.t_user.weight"]["t_user.momentum1"]
    assert user.shape == (2000,)  # one per row of the 2000-row table
    adam = [g for g in recipe.optimizer.param_groups if "betas" in g]
    assert adam and adam[0]["lr"] == PARAMS.lr

    def mean_loss(first: int) -> float:
        with torch.no_grad():
            batches = [recipe.train_batch(9, i) for i in range(first, first + 4)]
            return sum(recipe.loss(recipe.model, b).item() for b in batches) / 4

    before = mean_loss(0)
    for index in range(40):
        recipe.optimizer.zero_grad(set_to_none=True)
        loss = recipe.loss(recipe.model, recipe.train_batch(0, index))
        assert torch.isfinite(loss)
        loss.backward()
        recipe.optimizer.step()
    assert mean_loss(0) < before - 0.05, (before, mean_loss(0))
    metrics = recipe.evaluate(recipe.model, recipe.eval_batches("val", 2))
    assert metrics["examples"] == 2 * PARAMS.batch_size
    assert 0 < metrics["loss"] < before


def test_batches_are_pure_functions_of_seed_epoch_index_rank_world_size() -> None:
    one = build_recipe(PARAMS)
    again = build_recipe(PARAMS)  # another "process": nothing shared but the inputs
    assert _equal(one.train_batch(1, 5), again.train_batch(1, 5))
    assert not _equal(one.train_batch(1, 5), one.train_batch(1, 6))
    assert not _equal(one.train_batch(1, 5), one.train_batch(2, 5))
    other_seed = build_recipe(PARAMS.model_copy(update={"seed": 4}))
    assert not _equal(one.train_batch(1, 5), other_seed.train_batch(1, 5))
    # Two ranks at step i see what one rank sees at steps 2i and 2i+1: a global step with N
    # ranks consumes the examples of N consecutive one-rank steps, none twice, none skipped.
    sizes = TorchRecRankingSizes()
    for rank in range(2):
        batch = train_batches(PARAMS, sizes, rank=rank, world_size=2)
        assert _equal(batch(1, 3), one.train_batch(1, 2 * 3 + rank))
    with pytest.raises(ValueError, match="rank"):
        train_batches(PARAMS, sizes, rank=2, world_size=2)


def test_ids_are_skewed_like_real_traffic() -> None:
    sizes = TorchRecRankingSizes(
        features=(SparseFeature("user", 1000), SparseFeature("topic", 50, max_ids=3))
    )
    recipe = build_recipe(PARAMS.model_copy(update={"batch_size": 4096}), sizes=sizes)
    batch = recipe.train_batch(0, 0)
    users = batch["ids/user"].flatten()
    counts = torch.bincount(users, minlength=1000).sort(descending=True).values
    top_share = counts[:10].sum().item() / users.numel()  # the hottest 1% of the users
    assert top_share > 0.25, top_share  # uniform ids would give ~1%
    assert counts[0] > 50 * max(1, counts[500].item())
    # Hot ids are spread over the table, not its first rows (row-wise shards share the load).
    hottest = torch.bincount(users, minlength=1000).argsort(descending=True)[:10]
    assert hottest.max() >= 100
    # Multi-hot: 1..3 topics per example, padding (-1) only past each example's length.
    lengths, topics = batch["lengths/topic"], batch["ids/topic"]
    assert set(lengths.unique().tolist()) == {1, 2, 3}
    valid = torch.arange(3) < lengths.unsqueeze(1)
    assert bool((topics[valid] >= 0).all()) and bool((topics[~valid] == -1).all())


def test_plain_training_resumes_bit_identically(tmp_path: Path) -> None:
    reference = TrainConfig(save_dir=str(tmp_path / "ref"), **SMALL)
    plain_run(reference)
    resumed = TrainConfig(save_dir=str(tmp_path / "resumed"), **SMALL)
    plain_run(resumed, range(2))  # "crash" after two epochs: the process state is gone
    results = plain_run(resumed)  # a fresh session restores step 8 and trains epoch 2
    assert [r.status for r in results] == ["skipped", "skipped", "trained"]
    assert results[2].resumed_from_step == 8
    expected = checkpoint_tensors(reference.save_dir)
    assert_bit_identical(checkpoint_tensors(resumed.save_dir), expected)
    # Every table and its row-wise Adagrad state are in the checkpoint, and training moved them.
    for table in ("user", "author", "topic", "language", "country"):
        weight = f"0/model/embeddings.embedding_bags.t_{table}.weight"
        accumulator = (
            f"0/optimizer/state/sparse.embeddings.embedding_bags.t_{table}.weight/"
            f"t_{table}.momentum1"
        )
        assert weight in expected and accumulator in expected
        assert expected[accumulator].abs().sum() > 0
