"""The ``evaluate`` flow: follow a training run and evaluate every new checkpoint once."""

from __future__ import annotations

from typing import Any

from prefect import flow


@flow(name="evaluate")
def evaluate(
    save_dir: str,
    partition: str = "validation",
    eval_steps: int = 10,
    timeout: float = 1800,
    poll_seconds: float = 10,
    storage_options: dict[str, Any] | None = None,
) -> Any:
    """Evaluate each committed checkpoint of ``save_dir`` on ``partition`` (in step order)."""
    raise NotImplementedError("being written")
