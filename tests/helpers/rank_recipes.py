"""TorchRec recipes that refuse to be built outside a ``torchrun`` rank (tests/test_ranks.py).

Why: a run with several ranks must build its model in the ranks only -- each its part of a
sharded model; the whole may not fit the machine of the flow process. A run of these recipes
that gets anywhere proves its flow process never built the model: there, the build raises.
``build`` is the default TorchRec recipe; ``wide_users`` the same model with a user table
twice as tall, which a checkpoint of ``build`` does not fit.
"""

from __future__ import annotations

import dataclasses
import os

from recipes.base import Recipe, RecipeParams
from recipes.torchrec_ranking import TorchRecRankingSizes, build_recipe

WIDE_USER_ROWS = 4000  # the default user table has 2000


class BuiltOutsideRanksError(RuntimeError):
    """The model was about to be built in a process that is not one of torchrun's ranks."""


def _require_a_rank() -> None:
    if "TORCHELASTIC_RUN_ID" not in os.environ or "LOCAL_RANK" not in os.environ:
        raise BuiltOutsideRanksError(
            f"process {os.getpid()} is not a torchrun rank: a run with several ranks must not "
            "build its model outside them"
        )


def build(params: RecipeParams) -> Recipe:
    _require_a_rank()
    return build_recipe(params)


def wide_users(params: RecipeParams) -> Recipe:
    _require_a_rank()
    default = TorchRecRankingSizes()
    features = tuple(
        dataclasses.replace(feature, num_ids=WIDE_USER_ROWS) if feature.name == "user" else feature
        for feature in default.features
    )
    return build_recipe(params, dataclasses.replace(default, features=features))
