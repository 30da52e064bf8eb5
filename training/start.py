"""Everything a training start checks before it writes anything, and what it then records.

Why: a start that is refused must leave ``save_dir`` exactly as it found it -- no rewritten
``run.json`` that evaluators would then trust, no lock, no checkpoint. So every check that can
refuse a start reads only and runs first (:func:`check_run_start`): ``save_dir`` is not a
checkpoint, the recipe imports, the warm-start checkpoint exists and is committed, the
parameters match the run's record (``run.json``), and the checkpoint it resumes (or warm-starts)
from fits the model the recipe builds. Only then does the flow take the writer lock, check
again under it (another start may have raced in between) and record (:func:`record_run_start`).
"""

from __future__ import annotations

from dataclasses import dataclass

from recipes.base import load_recipe
from tml_checkpointing import CheckpointNotFoundError, step_from_checkpoint
from tml_checkpointing.catalog.discovery import is_committed
from tml_checkpointing.catalog.save_dir import assert_save_dir
from tml_checkpointing.reading.verify import get_latest_valid_checkpoint

from .config import TrainConfig
from .run_info import RunInfo, find_run_info, reconcile_run_info, write_run_info
from .session import get_session


@dataclass(frozen=True)
class RunStart:
    """What a start found: where it resumes from, and the ``run.json`` to record (if new)."""

    resumed_from: str  # "" when the run starts fresh
    run_info: RunInfo | None  # None: run.json already says exactly this


def check_run_start(config: TrainConfig, *, allow_changed_config: bool = False) -> RunStart:
    """Refuse a start that cannot work, reading only; see the module docstring.

    Builds the run's in-process session (model, optimizer) as a side effect, to compare shapes;
    the caller closes it (``close_session``) when it does not go on to train.
    """
    options = config.storage_options
    assert_save_dir(config.save_dir, options)
    load_recipe(config.recipe)  # RecipeError names what is wrong with the import path
    if config.initial_checkpoint and not is_committed(config.initial_checkpoint, options):
        raise CheckpointNotFoundError(
            f"initial_checkpoint {config.initial_checkpoint!r} is not a committed checkpoint "
            "(no such directory, or no commit marker in it). Give a checkpoint directory "
            "<save_dir>/<step>; `tml checkpoints list <save_dir>` shows them."
        )
    resumed_from = get_latest_valid_checkpoint(config.save_dir, storage_options=options)
    stored = find_run_info(config.save_dir, options)
    run_info = reconcile_run_info(
        stored,
        config,
        step_from_checkpoint(resumed_from) if resumed_from else 0,
        allow_changed_config=allow_changed_config,
    )
    session = get_session(config)
    recorded = run_info or stored
    if recorded is not None:
        session.config_from_step = recorded.current.from_step
    if resumed_from:
        session.check_fits(resumed_from)
    elif config.initial_checkpoint:
        session.check_fits(config.initial_checkpoint, keys=["model"])
    return RunStart(resumed_from=resumed_from, run_info=run_info)


def record_run_start(config: TrainConfig, start: RunStart) -> None:
    """Write ``run.json`` when the start changed it (first start, more epochs, a new segment)."""
    if start.run_info is not None:
        write_run_info(start.run_info, config.save_dir, config.storage_options)
