"""The ``retrain`` flow: a new dated run, warm-started from the previous run's latest weights."""

from __future__ import annotations

from typing import Any

from prefect import flow

from recipes.base import DEFAULT_RECIPE


@flow(name="retrain")
def retrain(
    runs_dir: str,
    epochs: int = 3,
    steps_per_epoch: int = 20,
    batch_size: int = 256,
    lr: float = 1e-3,
    seed: int = 0,
    recipe: str = DEFAULT_RECIPE,
    eval_partitions: list[str] | None = None,
    eval_steps: int = 10,
    storage_options: dict[str, Any] | None = None,
    run_name: str | None = None,
) -> Any:
    """Train a new run under ``runs_dir``, warm-started from the previous one, and evaluate it."""
    raise NotImplementedError("being written")
