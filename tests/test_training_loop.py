"""The plain training functions, without Prefect: determinism, resume, retries, warm start."""

from __future__ import annotations

from pathlib import Path

import pytest

from recipes.base import RecipeError, load_recipe
from tml_checkpointing import Snapshot, get_checkpoints, step_from_checkpoint
from training.config import TrainConfig
from training.loop import InjectedFailure, train_epoch
from training.session import close_session, get_session

from .training_helpers import assert_bit_identical, checkpoint_tensors, plain_run

SMALL = {"epochs": 3, "steps_per_epoch": 6, "batch_size": 64, "seed": 7}


def test_resume_in_a_new_session_is_bit_identical(tmp_path: Path) -> None:
    reference = TrainConfig(save_dir=str(tmp_path / "ref"), **SMALL)
    plain_run(reference)
    resumed = TrainConfig(save_dir=str(tmp_path / "resumed"), **SMALL)
    plain_run(resumed, range(2))  # "crash" after two epochs: the process state is gone
    results = plain_run(resumed)
    assert [r.status for r in results] == ["skipped", "skipped", "trained"]
    assert_bit_identical(
        checkpoint_tensors(resumed.save_dir), checkpoint_tensors(reference.save_dir)
    )


def test_failure_mid_epoch_then_retry_resumes_at_the_right_batch(tmp_path: Path) -> None:
    reference = TrainConfig(save_dir=str(tmp_path / "ref"), checkpoint_every_steps=4, **SMALL)
    plain_run(reference)
    config = TrainConfig(
        save_dir=str(tmp_path / "run"), checkpoint_every_steps=4, fail_at_step=11, **SMALL
    )
    session = get_session(config)
    try:
        train_epoch(session, 0)
        with pytest.raises(InjectedFailure):
            train_epoch(session, 1)  # steps 7-12; dies at 11 after the mid-epoch save at 8
        assert step_from_checkpoint(get_checkpoints(config.save_dir)[-1]) == 8
        retried = train_epoch(session, 1)  # what a task retry does: same session, dirty state
        assert (retried.resumed_from_step, retried.steps_run) == (8, 4)
        train_epoch(session, 2)
    finally:
        close_session(config)
    assert_bit_identical(
        checkpoint_tensors(config.save_dir), checkpoint_tensors(reference.save_dir)
    )
    steps = [step_from_checkpoint(c) for c in get_checkpoints(config.save_dir)]
    assert steps == [4, 6, 8, 12, 16, 18]


def test_failure_before_any_checkpoint_retrains_from_scratch(tmp_path: Path) -> None:
    reference = TrainConfig(save_dir=str(tmp_path / "ref"), **SMALL)
    plain_run(reference)
    config = TrainConfig(save_dir=str(tmp_path / "run"), fail_at_step=3, **SMALL)
    session = get_session(config)
    try:
        with pytest.raises(InjectedFailure):
            train_epoch(session, 0)
        for epoch in range(3):
            train_epoch(session, epoch)
    finally:
        close_session(config)
    assert_bit_identical(
        checkpoint_tensors(config.save_dir), checkpoint_tensors(reference.save_dir)
    )


def test_completed_run_trains_nothing(tmp_path: Path) -> None:
    config = TrainConfig(save_dir=str(tmp_path), **SMALL)
    plain_run(config)
    before = checkpoint_tensors(config.save_dir)
    results = plain_run(config)
    assert [r.status for r in results] == ["skipped"] * 3
    assert all(r.steps_run == 0 for r in results)
    assert_bit_identical(checkpoint_tensors(config.save_dir), before)


def test_warm_start_loads_weights_and_starts_at_step_zero(tmp_path: Path) -> None:
    first = TrainConfig(save_dir=str(tmp_path / "first"), **SMALL)
    plain_run(first)
    warm = TrainConfig(
        save_dir=str(tmp_path / "second"),
        initial_checkpoint=get_checkpoints(first.save_dir)[-1],
        **{**SMALL, "epochs": 1},
    )
    session = get_session(warm)
    try:
        assert session.sync_with_storage() == 0
        loaded = {f"0/model/{k}": v for k, v in session.recipe.model.state_dict().items()}
        trained = checkpoint_tensors(first.save_dir)
        assert all(loaded[k].equal(trained[k]) for k in loaded)
        result = train_epoch(session, 0)
    finally:
        close_session(warm)
    assert (result.first_step, result.last_step) == (1, 6)


def test_config_and_recipe_errors_are_clear(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="epochs"):
        TrainConfig(save_dir=str(tmp_path), epochs=0)
    with pytest.raises(ValueError, match="inside save_dir"):
        TrainConfig(save_dir=str(tmp_path), epochs=1, initial_checkpoint=str(tmp_path / "5"))
    with pytest.raises(RecipeError, match=r"package\.module:function"):
        load_recipe("recipes.ranking")
    with pytest.raises(RecipeError, match="cannot import"):
        load_recipe("no_such_module:build")
    with pytest.raises(RecipeError, match="no callable 'nope'"):
        load_recipe("recipes.ranking:nope")


def test_corrupt_latest_checkpoint_is_moved_aside_and_retrained(tmp_path: Path) -> None:
    reference = TrainConfig(save_dir=str(tmp_path / "ref"), **SMALL)
    plain_run(reference)
    config = TrainConfig(save_dir=str(tmp_path / "run"), **SMALL)
    plain_run(config)
    latest = tmp_path / "run" / "18"
    shard = max((p for p in latest.rglob("*") if p.is_file() and p.parent.name == "batched"),
                key=lambda p: p.stat().st_size)  # fmt: skip
    shard.write_bytes(shard.read_bytes()[:-8])  # truncated: size verification catches it
    results = plain_run(config)
    assert [r.status for r in results] == ["skipped", "skipped", "trained"]
    assert results[-1].resumed_from_step == 12
    aside = [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("18.corrupt-")]
    assert len(aside) == 1  # kept for inspection, never deleted
    assert_bit_identical(
        checkpoint_tensors(config.save_dir), checkpoint_tensors(reference.save_dir)
    )


def test_flipped_bit_found_while_restoring_falls_back_and_catches_up(tmp_path: Path) -> None:
    """Same size, one bit changed: only the restore's hashing sees it. The run moves the
    checkpoint aside, falls back to the one before and trains every step in between (the
    previous epoch's included, with that epoch's batches): bit-identical in the end."""
    reference = TrainConfig(save_dir=str(tmp_path / "ref"), **SMALL)
    plain_run(reference)
    config = TrainConfig(save_dir=str(tmp_path / "run"), **SMALL)
    plain_run(config, epochs=range(2))
    shard = max((p for p in (tmp_path / "run" / "12").rglob("*") if p.parent.name == "batched"),
                key=lambda p: p.stat().st_size)  # fmt: skip
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    results = plain_run(config)
    assert [r.status for r in results] == ["skipped", "skipped", "trained"]
    assert results[-1].resumed_from_step == 6 and results[-1].steps_run == 12
    aside = [p.name for p in (tmp_path / "run").iterdir() if p.name.startswith("12.corrupt-")]
    assert len(aside) == 1
    assert [step_from_checkpoint(c) for c in get_checkpoints(config.save_dir)] == [6, 12, 18]
    assert_bit_identical(
        checkpoint_tensors(config.save_dir), checkpoint_tensors(reference.save_dir)
    )
    assert_bit_identical(
        checkpoint_tensors(config.save_dir, 12), checkpoint_tensors(reference.save_dir, 12)
    )


def test_retention_keeps_the_newest_and_milestones(tmp_path: Path) -> None:
    config = TrainConfig(
        save_dir=str(tmp_path), checkpoint_every_steps=2, keep_last=2, keep_every_steps=6, **SMALL
    )
    plain_run(config)
    steps = [step_from_checkpoint(c) for c in get_checkpoints(config.save_dir)]
    assert steps == [6, 12, 16, 18]


def test_walltime_counts_each_interval_once(tmp_path: Path) -> None:
    """Every mid-epoch save used to add the whole elapsed epoch again (8.5 s -> 44.9 s)."""
    config = TrainConfig(save_dir=str(tmp_path), checkpoint_every_steps=1, **SMALL)
    results = plain_run(config)
    walltimes = []
    for checkpoint in get_checkpoints(config.save_dir):
        snapshot = Snapshot.get_torch_snapshot(config.save_dir, step_from_checkpoint(checkpoint))
        assert snapshot is not None
        walltimes.append(float(snapshot.read_object("0/extra_state/walltime")))
    assert len(walltimes) == 18 and walltimes == sorted(walltimes)
    # The final save's walltime counts the training time before it, once: less than the
    # epochs took in all (that includes waiting for the saves to commit).
    assert 0 < walltimes[-1] <= sum(r.seconds for r in results)
