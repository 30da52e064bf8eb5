"""Training parameters, validated once (pydantic) and shared by the flow, tasks and loop."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from recipes.base import DEFAULT_RECIPE, RecipeParams
from tml_checkpointing.incremental import DEFAULT_FULL_EVERY, MIN_CHAINED_BYTES


class TrainConfig(BaseModel):
    """Everything that determines a training run's result (plus where it is stored)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    save_dir: str = Field(min_length=1, description="checkpoint directory: path or fsspec URL")
    epochs: int = Field(ge=1)
    steps_per_epoch: int = Field(default=20, ge=1)
    batch_size: int = Field(default=256, ge=1)
    lr: float = Field(default=1e-3, gt=0, allow_inf_nan=False)
    seed: int = 0
    checkpoint_every_steps: int = Field(default=0, ge=0, description="0 = once per epoch")
    recipe: str = DEFAULT_RECIPE
    initial_checkpoint: str | None = Field(
        default=None, description="warm start: restore weights only from here, step starts at 0"
    )
    storage_options: dict[str, Any] | None = None
    keep_last: int | None = Field(
        default=None, ge=1, description="retention: keep the newest N checkpoints (None = all)"
    )
    keep_every_steps: int | None = Field(
        default=None, ge=1, description="retention: also keep every K-th step as a milestone"
    )
    keep_until_evaluated: tuple[str, ...] = Field(
        default=(), description="retention: keep checkpoints until these partitions evaluated them"
    )
    incremental: bool = Field(
        default=False,
        description="incremental checkpoints: large tensors save only the rows that changed",
    )
    full_every: int = Field(
        default=DEFAULT_FULL_EVERY, ge=1, description="incremental: every N-th save is full"
    )
    incremental_min_bytes: int = Field(
        default=MIN_CHAINED_BYTES,
        ge=1,
        description="incremental: tensors at least this large (bytes) save changed rows only",
    )
    nproc_per_node: int = Field(
        default=1, ge=1, description="ranks per machine (>1: each epoch runs under torchrun)"
    )
    nnodes: int = Field(default=1, ge=1, description="machines taking part in every epoch")
    fail_at_step: int | None = Field(
        default=None, ge=1, description="inject one failure when this step is reached (tests)"
    )

    @model_validator(mode="after")
    def _initial_checkpoint_not_inside_save_dir(self) -> TrainConfig:
        if self.initial_checkpoint and self.initial_checkpoint.rstrip("/").startswith(
            self.save_dir.rstrip("/") + "/"
        ):
            raise ValueError(
                "initial_checkpoint is inside save_dir: resume from save_dir instead of "
                "warm-starting from it"
            )
        return self

    @property
    def world_size(self) -> int:
        """Ranks that train together: each step consumes ``world_size * batch_size`` examples."""
        return self.nproc_per_node * self.nnodes

    @property
    def final_step(self) -> int:
        return self.epochs * self.steps_per_epoch

    def epoch_steps(self, epoch: int) -> tuple[int, int]:
        """First and last global step of ``epoch`` (steps count from 1)."""
        return epoch * self.steps_per_epoch + 1, (epoch + 1) * self.steps_per_epoch

    def epoch_of_step(self, step: int) -> int:
        return (step - 1) // self.steps_per_epoch if step > 0 else 0

    def recipe_params(self) -> RecipeParams:
        return RecipeParams(seed=self.seed, batch_size=self.batch_size, lr=self.lr)
