"""The run's parameters: each one declared once, here, with its type, default and description.

Why one place: the ``train`` flow takes these models as its parameters (Prefect builds the run
form from their JSON schema, descriptions included), ``tml train`` generates its options from
their fields (:mod:`flows.params_cli`), and the parameter table in docs/training.md is generated
from them (``scripts/parameter_table.py``, checked by a test). Adding a parameter is one field
here plus its use.

Two models, because they answer two questions:

- :class:`TrainConfig` -- *the run*: what it computes (group ``identity``: recorded in
  ``run.json``, a resume may not change it silently) and how its checkpoints are written and
  kept (group ``checkpoints``), plus a test knob (``testing``). It travels to the epoch tasks
  and, as JSON, to every rank.
- :class:`TrainOptions` -- *this flow run's operational knobs* (group ``operations``, and
  ``machines`` for where this machine sits in a multi-machine job): retries, how long to wait,
  whether a changed config is allowed. They never change what a run computes.

:class:`RunParams` is the run less *where* it is (``save_dir``) and *what it starts from*
(``initial_checkpoint``): the ``retrain`` flow decides those itself for each new run.
"""

from __future__ import annotations

from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from recipes.base import DEFAULT_RECIPE, RecipeParams
from tml_checkpointing.catalog.evaluation import done_marker_path
from tml_checkpointing.errors import CheckpointError, InvalidPartitionNameError
from tml_checkpointing.writing.incremental import DEFAULT_FULL_EVERY, MIN_CHAINED_BYTES

from .experiment import check_experiment_name

Group = Literal["identity", "checkpoints", "testing", "machines", "operations"]

GROUP_TITLES: dict[Group, str] = {  # in the order shown (CLI help, docs)
    "identity": "the run (recorded in run.json; a resume may not change it silently)",
    "machines": "ranks and machines (torchrun; see docs/scaling.md); their product, the world "
    "size, is part of the run's identity",
    "checkpoints": "checkpoints: when, how and how many (see docs/incremental.md)",
    "operations": "operations of this flow run (never change what the run computes)",
    "testing": "tests and demos",
}


def group(name: Group) -> dict[str, Any]:
    """``json_schema_extra`` of a field in group ``name`` (CLI option groups, docs sections)."""
    return {"group": name}


def field_group(model: type[BaseModel], name: str) -> Group | None:
    """The group a field of ``model`` was declared in (None: a model without groups)."""
    extra = model.model_fields[name].json_schema_extra
    declared = extra.get("group") if isinstance(extra, dict) else None
    for known in GROUP_TITLES:
        if declared == known:
            return known
    if declared is not None:
        raise TypeError(f"{model.__name__}.{name}: unknown group {declared!r}")
    return None


# The seeds torch.manual_seed accepts (a value outside overflows inside torch, after run.json
# was written): the field refuses them up front.
SEED_MIN = -(2**63)
SEED_MAX = 2**64 - 1


def check_partition_name(name: str) -> str:
    """``name`` if it can name an evaluation partition (its done-marker is a file named after
    it), else :class:`~tml_checkpointing.errors.InvalidPartitionNameError` (the library's rule:
    non-empty, no ``/``, not ``.`` or ``..``)."""
    done_marker_path("checkpoint", name)  # raises for a name that cannot be a marker
    return name


class RunParams(BaseModel):
    """What a run computes and how it is checkpointed, wherever it is stored."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    # -- identity: what determines the result ---------------------------------------------
    epochs: int = Field(
        default=3,
        ge=1,
        description="Epochs to train in total. A resumed run skips the epochs already covered "
        "by a checkpoint; epochs may grow between runs (never shrink).",
        json_schema_extra=group("identity"),
    )
    steps_per_epoch: int = Field(
        default=20,
        ge=1,
        description="Training steps (batches per rank) in one epoch.",
        json_schema_extra=group("identity"),
    )
    batch_size: int = Field(
        default=256,
        ge=1,
        description="Examples per step and rank.",
        json_schema_extra=group("identity"),
    )
    lr: float = Field(
        default=1e-3,
        gt=0,
        allow_inf_nan=False,
        description="Learning rate of the recipe's optimizer (a finite number > 0).",
        json_schema_extra=group("identity"),
    )
    seed: int = Field(
        default=0,
        ge=SEED_MIN,
        le=SEED_MAX,
        description="Seed of the model's initial weights and of the data order: an integer "
        "torch.manual_seed accepts, from -2^63 to 2^64 - 1.",
        json_schema_extra=group("identity"),
    )
    recipe: str = Field(
        default=DEFAULT_RECIPE,
        min_length=1,
        description="The model and data, as module:function (recipes.ranking:build, "
        "recipes.torchrec_ranking:build).",
        json_schema_extra=group("identity"),
    )
    nproc_per_node: int = Field(
        default=1,
        ge=1,
        description="Ranks per machine; above 1, each epoch runs under torchrun. Ranks per "
        "machine times machines is the world size, part of the run's identity.",
        json_schema_extra=group("machines"),
    )
    nnodes: int = Field(
        default=1,
        ge=1,
        description="Machines taking part in every epoch.",
        json_schema_extra=group("machines"),
    )

    # -- checkpoints: when they are taken, how they are written, which are kept -----------
    checkpoint_every_steps: int = Field(
        default=0,
        ge=0,
        description="Also checkpoint every N steps within an epoch; 0 means only at the end "
        "of each epoch.",
        json_schema_extra=group("checkpoints"),
    )
    keep_last: int | None = Field(
        default=None,
        ge=1,
        description="Retention after each epoch: keep the newest N checkpoints (empty: keep all).",
        json_schema_extra=group("checkpoints"),
    )
    keep_every_steps: int | None = Field(
        default=None,
        ge=1,
        description="Retention: also keep every checkpoint whose step is a multiple of this "
        "(milestones).",
        json_schema_extra=group("checkpoints"),
    )
    wait_for_evaluators: tuple[str, ...] = Field(
        default=(),
        description="Partitions whose evaluators must mark the final checkpoint done before "
        "the run ends; retention keeps every checkpoint until they have evaluated it.",
        json_schema_extra=group("checkpoints"),
    )
    incremental: bool = Field(
        default=False,
        description="Save only the changed rows of large tensors (embedding tables) since the "
        "previous save; see docs/incremental.md.",
        json_schema_extra=group("checkpoints"),
    )
    full_every: int = Field(
        default=DEFAULT_FULL_EVERY,
        ge=1,
        description="Incremental saves: every N-th save is a full checkpoint that starts a "
        "new chain.",
        json_schema_extra=group("checkpoints"),
    )
    incremental_min_bytes: int = Field(
        default=MIN_CHAINED_BYTES,
        ge=1,
        description="Incremental saves: tensors at least this large (bytes) are saved as "
        "changed rows.",
        json_schema_extra=group("checkpoints"),
    )
    storage_options: dict[str, Any] | None = Field(
        default=None,
        description="Options of the fsspec filesystem of the checkpoint directory (for S3: "
        "endpoint_url, key, secret...).",
        json_schema_extra=group("checkpoints"),
    )

    # -- testing ---------------------------------------------------------------------------
    fail_at_step: int | None = Field(
        default=None,
        ge=1,
        description="Tests and demos: fail once when this step is reached, to watch the "
        "epoch's retry restore the newest checkpoint.",
        json_schema_extra=group("testing"),
    )

    @field_validator("wait_for_evaluators")
    @classmethod
    def _partition_names(cls, names: tuple[str, ...]) -> tuple[str, ...]:
        for name in names:
            try:
                check_partition_name(name)
            except InvalidPartitionNameError as error:
                raise ValueError(str(error)) from None
        return names

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


class TrainConfig(RunParams):
    """One training run: where it is stored, what it starts from, and :class:`RunParams`."""

    save_dir: str = Field(
        min_length=1,
        description="Checkpoint directory of the run, a local path or an fsspec URL "
        "(s3://bucket/runs/exp1). Unless experiment is given, it names the run and its artifacts.",
        json_schema_extra=group("identity"),
    )
    initial_checkpoint: str | None = Field(
        default=None,
        description="Warm start: a checkpoint whose model weights (only) start this run; the "
        "step count starts at 0.",
        json_schema_extra=group("identity"),
    )
    experiment: str | None = Field(
        default=None,
        description="The name that keys the run's artifacts, run names, tags, events and "
        "evaluation limits (lowercase letters, digits, dashes). Left out: save_dir's last part "
        "plus a short hash of its full URL, so two directories never share one. A given name "
        "is recorded in run.json; a resume may not change it.",
        json_schema_extra=group("identity"),
    )

    @field_validator("experiment")
    @classmethod
    def _valid_experiment(cls, name: str | None) -> str | None:
        return None if name is None else check_experiment_name(name)

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


class InvalidNodeLayoutError(CheckpointError, ValueError):
    """Machine settings that cannot form the run's job (no rendezvous, node rank too high)."""


class NodeLayout(BaseModel):
    """Where this machine's ranks sit in the job (not part of the run's identity)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    node_rank: int = Field(
        default=0,
        ge=0,
        description="This machine's rank; node 0 commits checkpoints and holds the lock.",
        json_schema_extra=group("machines"),
    )
    rdzv_endpoint: str | None = Field(
        default=None,
        description="host:port of node 0's rendezvous, needed when nnodes > 1.",
        json_schema_extra=group("machines"),
    )

    def check(self, config: RunParams) -> None:
        """Raise :class:`InvalidNodeLayoutError` for a layout that cannot form ``config``'s job."""
        if config.nnodes > 1 and not self.rdzv_endpoint:
            raise InvalidNodeLayoutError(
                f"nnodes={config.nnodes} needs rdzv_endpoint (host:port reachable from every "
                "machine, on node 0): every node must meet at the same rendezvous"
            )
        if self.node_rank >= config.nnodes:
            raise InvalidNodeLayoutError(
                f"node_rank must be in [0, {config.nnodes}) for nnodes={config.nnodes}, got "
                f"{self.node_rank}"
            )
        if self.rdzv_endpoint and not _is_host_port(self.rdzv_endpoint):
            raise InvalidNodeLayoutError(
                f"rdzv_endpoint must look like host:port, got {self.rdzv_endpoint!r}"
            )


def _is_host_port(value: str) -> bool:
    host, sep, port = value.rpartition(":")
    return bool(sep and host and port.isdigit() and 0 < int(port) < 65536)


DEFAULT_EPOCH_RETRIES = 2
DEFAULT_MAX_RESTARTS = 3


class TrainOptions(NodeLayout):
    """Operational knobs of one ``train`` flow run, and where its machine sits in the job."""

    epoch_retries: int = Field(
        default=DEFAULT_EPOCH_RETRIES,
        ge=0,
        description="How often a failed epoch is retried; each retry first restores the "
        "newest committed checkpoint.",
        json_schema_extra=group("operations"),
    )
    evaluator_timeout: float = Field(
        default=600.0,
        gt=0,
        description="Seconds to wait for the evaluators of wait_for_evaluators (inf: no "
        "limit, nan refused); the result says who finished.",
        json_schema_extra=group("operations"),
    )
    allow_changed_config: bool = Field(
        default=False,
        description="Resume even though recipe, seed, batch size, steps per epoch, lr or world "
        "size differ from what run.json recorded (recorded there as a new segment).",
        json_schema_extra=group("operations"),
    )
    max_restarts: int = Field(
        default=DEFAULT_MAX_RESTARTS,
        ge=0,
        description="Deployed runs: how often a run that crashed or was preempted is started "
        "again by the automation (automations.yaml) before its lineage stops restarting.",
        json_schema_extra=group("operations"),
    )


class RestartOf(BaseModel):
    """Which run a deployed ``train`` run resumes, filled by the resume automation
    (automations.yaml) from the crashed run: its id and this restart's number in the lineage."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    flow_run_id: UUID = Field(description="The crashed or preempted flow run resumed.")
    number: int = Field(ge=1, description="1 for the first restart of a lineage, then 2, ...")
