"""What a recipe provides, and how one is found from its import path.

The training loop knows nothing about the model or the data: it asks a recipe. Determinism is
part of the contract: ``train_batch(epoch, index)`` must be a pure function of the recipe's
seed, the epoch and the index, so that a resumed run sees exactly the batches an uninterrupted
run would have seen -- no data-loader state needs to be checkpointed.
"""

from __future__ import annotations

import functools
import importlib
import inspect
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from pydantic import BaseModel, ConfigDict

from tml_checkpointing.errors import CheckpointError

Batch = Mapping[str, torch.Tensor]


class RecipeParams(BaseModel):
    """What a recipe is built from (a subset of the training parameters)."""

    model_config = ConfigDict(frozen=True)

    seed: int
    batch_size: int
    lr: float


@dataclass
class Recipe:
    """Model, optimizer, loss and data of one training job."""

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    loss: Callable[[torch.nn.Module, Batch], torch.Tensor]
    train_batch: Callable[[int, int], Batch]
    eval_batches: Callable[[str, int], Iterable[Batch]]
    evaluate: Callable[[torch.nn.Module, Iterable[Batch]], dict[str, float]]


RecipeBuilder = Callable[[RecipeParams], Recipe]

DEFAULT_RECIPE = "recipes.ranking:build"


class RecipeError(CheckpointError, ValueError):
    """A recipe import path that does not lead to a recipe builder (bad input: ``tml`` exit 2)."""


_BUILDER_SHAPE = "a recipe builder takes one RecipeParams and returns a Recipe"


def load_recipe(import_path: str) -> RecipeBuilder:
    """Resolve ``"package.module:function"`` to the builder it names.

    Checked here, before anything is built or written: the module imports, the name is a
    callable, and that callable can be called with one argument (``os:getcwd`` imports but
    takes none). What the builder returns is checked when it is called: anything but a
    :class:`Recipe` raises :class:`RecipeError` naming the import path.
    """
    module_name, sep, attribute = import_path.partition(":")
    if not sep or not module_name or not attribute:
        raise RecipeError(f"recipe must look like 'package.module:function', got {import_path!r}")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise RecipeError(f"cannot import recipe module {module_name!r}: {error}") from error
    builder: Any = getattr(module, attribute, None)
    if not callable(builder):
        raise RecipeError(f"{module_name!r} has no callable {attribute!r} (from {import_path!r})")
    try:
        inspect.signature(builder).bind(None)
    except TypeError as error:
        raise RecipeError(
            f"{import_path!r} is not a recipe builder: it cannot be called with the run's "
            f"parameters ({error}); {_BUILDER_SHAPE}"
        ) from None
    except ValueError:
        pass  # no signature to inspect (some builtins): the call itself will tell
    return _returning_a_recipe(builder, import_path)


def _returning_a_recipe(builder: Callable[..., Any], import_path: str) -> RecipeBuilder:
    @functools.wraps(builder)
    def build(params: RecipeParams) -> Recipe:
        recipe = builder(params)
        if not isinstance(recipe, Recipe):
            raise RecipeError(
                f"{import_path!r} is not a recipe builder: it returned a "
                f"{type(recipe).__name__}, not a recipes.base.Recipe; {_BUILDER_SHAPE}"
            )
        return recipe

    return build
