"""``<save_dir>/run.json``: what a run is, so evaluators can rebuild its model by themselves.

The training flow writes it when a run starts; an evaluator following the run reads the recipe
and its parameters from it (and the final step, to know when to stop) instead of being told
them again. Its name is not a step number, so checkpoint discovery ignores it.
"""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict

from recipes.base import RecipeParams
from tml_checkpointing import CheckpointError, join_url
from tml_checkpointing.filesystem import StorageOptions, replace_file, resolve

from .config import TrainConfig

RUN_INFO_NAME = "run.json"


class RunInfoMissingError(CheckpointError, FileNotFoundError):
    """``save_dir`` has no ``run.json``: it was not written by the ``train`` flow."""


class RunInfo(BaseModel):
    model_config = ConfigDict(frozen=True)

    recipe: str
    seed: int
    batch_size: int
    lr: float
    epochs: int
    steps_per_epoch: int
    final_step: int
    initial_checkpoint: str | None = None

    @classmethod
    def of(cls, config: TrainConfig) -> RunInfo:
        return cls(
            recipe=config.recipe,
            seed=config.seed,
            batch_size=config.batch_size,
            lr=config.lr,
            epochs=config.epochs,
            steps_per_epoch=config.steps_per_epoch,
            final_step=config.final_step,
            initial_checkpoint=config.initial_checkpoint,
        )

    def recipe_params(self) -> RecipeParams:
        return RecipeParams(seed=self.seed, batch_size=self.batch_size, lr=self.lr)


def write_run_info(config: TrainConfig) -> None:
    fs, path = resolve(join_url(config.save_dir, RUN_INFO_NAME), config.storage_options)
    replace_file(fs, path, RunInfo.of(config).model_dump_json(indent=2).encode())


def read_run_info(save_dir: str, storage_options: StorageOptions | None = None) -> RunInfo:
    fs, path = resolve(join_url(save_dir, RUN_INFO_NAME), storage_options)
    try:
        data = fs.cat_file(path)
    except FileNotFoundError as error:
        raise RunInfoMissingError(
            f"{save_dir} has no {RUN_INFO_NAME}: evaluators rebuild the model from it, and the "
            "train flow writes it when a run starts. Was this run trained with `tml train`?"
        ) from error
    return RunInfo.model_validate(json.loads(data))
