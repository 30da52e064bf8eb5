"""Everything a training start checks before it writes anything, and what it then records.

Why: a start that is refused must leave ``save_dir`` exactly as it found it -- no rewritten
``run.json`` that evaluators would then trust, no lock, no checkpoint. So every check that can
refuse a start reads only and runs first (:func:`check_run_start`): ``save_dir`` is not a
checkpoint and its bucket exists, the recipe imports, the warm-start checkpoint exists and is
committed, no committed checkpoint lies past the requested final step (a run is never shortened
below what it trained), the parameters match the run's record (``run.json``), and the checkpoint
it resumes (or warm-starts) from fits the model the recipe builds. Only then does the flow take
the writer lock, check again under it (another start may have raced in between) and record
(:func:`record_run_start`).

The shape check needs the model. A one-process run builds it in the flow's process, which then
trains it: the check costs nothing extra there. A run with several ranks builds its model in
the ranks only (each its part of a sharded model: the whole may not fit one machine), so the
ranks check, each its own part, before they restore (``TrainingSession.sync_with_storage``).
Their refusal comes after the record was written: :meth:`RecordedStart.undo` then puts
``run.json`` back as the start found it, so a refused start still leaves the record unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

from recipes.base import load_recipe
from tml_checkpointing import (
    CheckpointError,
    CheckpointNotFoundError,
    join_url,
    step_from_checkpoint,
)
from tml_checkpointing.catalog.discovery import is_committed, latest_checkpoint
from tml_checkpointing.catalog.save_dir import assert_save_dir
from tml_checkpointing.format.layout import RUN_INFO
from tml_checkpointing.reading.verify import get_latest_valid_checkpoint
from tml_checkpointing.storage.faults import reading, writing
from tml_checkpointing.storage.filesystem import (
    StorageOptions,
    replace_file,
    require_bucket,
    resolve,
)

from .config import TrainConfig
from .run_info import RunInfo, find_run_info, reconcile_run_info, write_run_info
from .session import get_session


class RunPastFinalStepError(CheckpointError, ValueError):
    """A start whose final step lies before a checkpoint the run already committed.

    Refused even with ``allow_changed_config``: the run would report an older checkpoint as
    its final one "resumed from" the newer, and ``run.json`` would no longer describe the
    checkpoints in ``save_dir`` (a new segment applies from the step it resumes, and there is
    none to resume). Nothing is written.
    """


@dataclass(frozen=True)
class RunStart:
    """What a start found: where it resumes from, and the ``run.json`` to record (if new)."""

    resumed_from: str  # "" when the run starts fresh
    run_info: RunInfo | None  # None: run.json already says exactly this


def check_run_start(config: TrainConfig, *, allow_changed_config: bool = False) -> RunStart:
    """Refuse a start that cannot work, reading only; see the module docstring.

    A one-process run builds its in-process session (model, optimizer) as a side effect when
    there is a checkpoint to compare shapes with; the caller closes it (``close_session``)
    when it does not go on to train. A run with several ranks builds no model here.
    """
    options = config.storage_options
    fs, root = resolve(config.save_dir, options)
    require_bucket(fs, root)  # a missing bucket is bad input, named as such, not a write error
    assert_save_dir(config.save_dir, options)
    load_recipe(config.recipe)  # RecipeError names what is wrong with the import path
    _refuse_shortening(config)
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
    session = get_session(config)  # builds nothing yet (the model is built on first use)
    recorded = run_info or stored
    if recorded is not None:
        session.config_from_step = recorded.current.from_step
    if config.world_size > 1:
        return RunStart(resumed_from=resumed_from, run_info=run_info)  # the ranks check
    if resumed_from:
        session.check_fits(resumed_from)
    elif config.initial_checkpoint:
        session.check_fits(config.initial_checkpoint, keys=["model"])
    return RunStart(resumed_from=resumed_from, run_info=run_info)


def _refuse_shortening(config: TrainConfig) -> None:
    """Raise :class:`RunPastFinalStepError` if a committed checkpoint lies past the final step
    ``config`` asks for (the newest one, valid or not: it is the run's history either way)."""
    newest = latest_checkpoint(config.save_dir, config.storage_options)
    if newest is None or newest.step <= config.final_step:
        return
    needed = -(-newest.step // config.steps_per_epoch)  # epochs that reach the newest step
    raise RunPastFinalStepError(
        f"{config.save_dir} already has a checkpoint at step {newest.step}, past the final step "
        f"{config.final_step} that epochs={config.epochs} x steps_per_epoch="
        f"{config.steps_per_epoch} asks for; a run is never shortened below what it trained, "
        f"not even with --allow-changed-config. Give --epochs {needed} or more to resume it, "
        "or another save_dir for a shorter run. Nothing was written."
    )


@dataclass(frozen=True)
class RecordedStart:
    """What :func:`record_run_start` changed, to undo when the ranks refuse the start."""

    save_dir: str
    storage_options: StorageOptions | None
    written: bool  # whether run.json was (re)written at all
    previous: bytes | None  # run.json as the start found it; None: there was none

    def undo(self) -> None:
        """Put ``run.json`` back byte for byte as the start found it (remove it if new).

        Only for a start refused before anything trained (the ranks' shape check), with the
        writer lock still held: no checkpoint of the recorded segment exists to need it.
        """
        if not self.written:
            return
        fs, path = resolve(join_url(self.save_dir, RUN_INFO), self.storage_options)
        with writing(f"{self.save_dir}/{RUN_INFO}"):
            if self.previous is None:
                fs.rm_file(path)
            else:
                replace_file(fs, path, self.previous)


def record_run_start(config: TrainConfig, start: RunStart) -> RecordedStart:
    """Write ``run.json`` when the start changed it (first start, more epochs, a new segment);
    return what to put back should the ranks refuse the start (:meth:`RecordedStart.undo`)."""
    options = config.storage_options
    if start.run_info is None:
        return RecordedStart(config.save_dir, options, written=False, previous=None)
    fs, path = resolve(join_url(config.save_dir, RUN_INFO), options)
    try:
        with reading(f"{config.save_dir}/{RUN_INFO}"):
            previous: bytes | None = fs.cat_file(path)
    except FileNotFoundError:
        previous = None
    write_run_info(start.run_info, config.save_dir, options)
    return RecordedStart(config.save_dir, options, written=True, previous=previous)
