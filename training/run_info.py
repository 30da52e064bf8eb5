"""``<save_dir>/run.json``: what a run is, fixed at its first start.

Why: a save_dir is one training trajectory. Resuming it with another learning rate, seed,
batch size, epoch length or recipe silently mixes two runs (the restored optimizer even keeps
the old learning rate while the record says the new one), and evaluators rebuild the model from
this record. So the first start writes ``run.json`` once; every later start compares its
parameters with it (:func:`reconcile_run_info`) and refuses a change of trajectory with
:class:`RunConfigChangedError`, naming each old and new value. When the user really means it
(``allow_changed_config``), the change is appended as a new *segment* -- the parameters and the
first step they apply to -- and history is never overwritten: an evaluator rebuilds the model
of a checkpoint from the segment that produced it (:meth:`RunInfo.segment_for`).

``epochs`` may grow freely (the recorded final step grows with it; evaluators read it to know
when to stop). Its name is not a step number, so checkpoint discovery ignores it.
"""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from recipes.base import RecipeParams
from tml_checkpointing import CheckpointError, join_url
from tml_checkpointing.format.layout import RUN_INFO
from tml_checkpointing.storage.faults import reading, writing
from tml_checkpointing.storage.filesystem import StorageOptions, replace_file, resolve

from .config import TrainConfig
from .experiment import chosen_experiment

# Parameters that change what a run computes: a resume may not change them silently.
TRAJECTORY_FIELDS = ("recipe", "seed", "batch_size", "steps_per_epoch", "lr", "world_size")


class RunInfoMissingError(CheckpointError, FileNotFoundError):
    """``save_dir`` has no ``run.json``: it was not written by the ``train`` flow."""


class RunInfoInvalidError(CheckpointError, ValueError):
    """``run.json`` exists but is not a run record (unparsable, or fields missing)."""


class RunConfigChangedError(CheckpointError, ValueError):
    """A resume asked for parameters that change the run's trajectory.

    ``changes`` maps each parameter to ``(recorded, requested)``. Nothing was written.
    """

    def __init__(self, message: str, changes: dict[str, tuple[Any, Any]]) -> None:
        super().__init__(message)
        self.changes = changes


class RunSegment(BaseModel):
    """The trajectory parameters of a run from ``from_step`` on (until a later segment)."""

    model_config = ConfigDict(frozen=True)

    from_step: int = Field(ge=1, description="first training step trained with these")
    recipe: str
    seed: int
    batch_size: int
    steps_per_epoch: int
    lr: float
    world_size: int = Field(default=1, ge=1, description="ranks; records from before: 1")
    initial_checkpoint: str | None = None
    changed: list[str] = Field(default_factory=list, description="what differs from before")
    recorded_at: str = ""

    @classmethod
    def of(
        cls, config: TrainConfig, from_step: int, changed: list[str] | None = None
    ) -> RunSegment:
        return cls(
            from_step=from_step,
            recipe=config.recipe,
            seed=config.seed,
            batch_size=config.batch_size,
            steps_per_epoch=config.steps_per_epoch,
            lr=config.lr,
            world_size=config.world_size,
            initial_checkpoint=config.initial_checkpoint,
            changed=changed or [],
            recorded_at=datetime.now(UTC).isoformat(timespec="seconds"),
        )

    def recipe_params(self) -> RecipeParams:
        return RecipeParams(seed=self.seed, batch_size=self.batch_size, lr=self.lr)


class RunInfo(BaseModel):
    """The whole record: how far the run goes, and its segments in the order recorded."""

    model_config = ConfigDict(frozen=True)

    epochs: int = Field(ge=1)
    final_step: int = Field(ge=1)
    segments: list[RunSegment] = Field(min_length=1)
    experiment: str | None = Field(
        default=None, description="the name the user gave (training.experiment); none: derived"
    )

    @model_validator(mode="before")
    @classmethod
    def _from_first_format(cls, data: Any) -> Any:
        """Records written before segments existed were one flat segment."""
        if isinstance(data, dict) and "segments" not in data and "recipe" in data:
            flat = dict(data)
            head = {key: flat.pop(key) for key in ("epochs", "final_step") if key in flat}
            return {**head, "segments": [{"from_step": 1, **flat}]}
        return data

    @classmethod
    def of(cls, config: TrainConfig) -> RunInfo:
        """The record of a run's first start."""
        return cls(
            epochs=config.epochs,
            final_step=config.final_step,
            segments=[RunSegment.of(config, from_step=1)],
            experiment=config.experiment,
        )

    @property
    def current(self) -> RunSegment:
        """The parameters the run trains with now (the last segment recorded)."""
        return self.segments[-1]

    def segment_for(self, step: int) -> RunSegment:
        """The parameters that produced the checkpoint at ``step``.

        The most recently recorded segment whose ``from_step`` is at or before ``step``: when
        a run was resumed from an older checkpoint under a new segment, the steps after it
        were trained (again) with the new parameters.
        """
        applying = [segment for segment in self.segments if segment.from_step <= step]
        return applying[-1] if applying else self.segments[0]

    # The current segment's fields, for readers that do not care about segments.
    @property
    def recipe(self) -> str:
        return self.current.recipe

    def recipe_params(self) -> RecipeParams:
        return self.current.recipe_params()


def reconcile_run_info(
    stored: RunInfo | None,
    config: TrainConfig,
    resume_step: int,
    *,
    allow_changed_config: bool = False,
) -> RunInfo | None:
    """The ``run.json`` this start must leave behind, or ``None`` when the stored one holds.

    Pure (no I/O), so a start can decide everything before it writes anything.
    ``resume_step`` is the step of the checkpoint the run resumes from (0: none yet). Raises
    :class:`RunConfigChangedError` when a trajectory parameter differs from the current
    segment (or ``epochs`` would shrink) and ``allow_changed_config`` is off, and
    :class:`~training.experiment.ExperimentMismatchError` when ``config.experiment`` is not the
    recorded one (never allowed: every key of the run would change).
    """
    if stored is None:
        return RunInfo.of(config)
    chosen_experiment(config.save_dir, config.experiment, stored.experiment)
    names_it = config.experiment is not None and stored.experiment is None
    current = stored.current
    changes: dict[str, tuple[Any, Any]] = {
        name: (getattr(current, name), getattr(config, name))
        for name in TRAJECTORY_FIELDS
        if not _same(getattr(current, name), getattr(config, name))
    }
    if resume_step == 0 and current.initial_checkpoint != config.initial_checkpoint:
        # Matters only while the warm start is still to happen (no checkpoint yet).
        changes["initial_checkpoint"] = (current.initial_checkpoint, config.initial_checkpoint)
    shrinks = config.final_step < stored.final_step and "steps_per_epoch" not in changes
    if shrinks:
        changes["epochs"] = (stored.epochs, config.epochs)
    if changes and not allow_changed_config:
        raise RunConfigChangedError(_refusal(config.save_dir, changes, stored), changes)
    trajectory = [name for name in changes if name != "epochs"]
    if not trajectory and config.final_step <= stored.final_step and not shrinks:
        if names_it:  # a run from before experiments had names is given one
            return stored.model_copy(update={"experiment": config.experiment})
        return None  # same run, nothing new to record
    segments = list(stored.segments)
    if trajectory:
        segments.append(RunSegment.of(config, from_step=resume_step + 1, changed=trajectory))
    return RunInfo(
        epochs=config.epochs,
        final_step=config.final_step,
        segments=segments,
        experiment=stored.experiment or config.experiment,
    )


def _same(recorded: Any, requested: Any) -> bool:
    if isinstance(recorded, float) or isinstance(requested, float):
        return math.isclose(float(recorded), float(requested), rel_tol=1e-12, abs_tol=0.0)
    return bool(recorded == requested)


def _refusal(save_dir: str, changes: dict[str, tuple[Any, Any]], stored: RunInfo) -> str:
    listed = "; ".join(
        f"{name}: {recorded!r} recorded, {requested!r} requested"
        for name, (recorded, requested) in changes.items()
    )
    hint = (
        f" (--epochs may only grow: the run already goes to step {stored.final_step})"
        if "epochs" in changes
        else ""
    )
    return (
        f"{save_dir} is a run with other parameters: {listed}{hint}. Resuming would mix two "
        "runs. Use the recorded values to resume, another save_dir for a new run, or "
        "--allow-changed-config (flow parameter allow_changed_config) to continue this run with "
        "the new values, recorded in run.json as a new segment. Nothing was written."
    )


def write_run_info(
    info: RunInfo, save_dir: str, storage_options: StorageOptions | None = None
) -> None:
    """Replace ``run.json`` atomically (whole or not at all)."""
    fs, path = resolve(join_url(save_dir, RUN_INFO), storage_options)
    with writing(f"{save_dir}/{RUN_INFO}"):
        replace_file(fs, path, info.model_dump_json(indent=2).encode())


def read_run_info(save_dir: str, storage_options: StorageOptions | None = None) -> RunInfo:
    """The run's record; :class:`RunInfoMissingError` when there is none."""
    info = find_run_info(save_dir, storage_options)
    if info is None:
        raise RunInfoMissingError(
            f"{save_dir} has no {RUN_INFO}: evaluators rebuild the model from it, and the "
            "train flow writes it when a run starts. Was this run trained with `tml train`?"
        )
    return info


def experiment_of(
    save_dir: str, storage_options: StorageOptions | None = None, given: str | None = None
) -> str:
    """The experiment of the run in ``save_dir``: ``given`` (checked against ``run.json``),
    the name ``run.json`` records, or the name derived from ``save_dir``
    (:mod:`training.experiment`). Every key, tag, limit and event of the run uses it."""
    info = find_run_info(save_dir, storage_options)
    return chosen_experiment(save_dir, given, info.experiment if info else None, storage_options)


def find_run_info(save_dir: str, storage_options: StorageOptions | None = None) -> RunInfo | None:
    """The run's record, or ``None`` when ``save_dir`` has none (yet)."""
    fs, path = resolve(join_url(save_dir, RUN_INFO), storage_options)
    try:
        with reading(f"{save_dir}/{RUN_INFO}"):
            data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return RunInfo.model_validate(json.loads(data))
    except (ValueError, ValidationError, RecursionError) as error:
        raise RunInfoInvalidError(
            f"{save_dir}/{RUN_INFO} is not a run record ({error}); it is written by `tml train` "
            "at a run's first start. Restore it, or train into another save_dir."
        ) from error
