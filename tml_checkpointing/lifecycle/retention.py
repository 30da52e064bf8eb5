"""Retention: which checkpoints to keep, and deleting the rest without ever losing work.

Why this is more than "delete all but the last N": peers' retention has deleted the only good
checkpoint while an async save was still writing its successor, and half-deleted checkpoints
have been resumed from. The rules here:

* :func:`plan_retention` is pure: from the committed checkpoints, a policy, metrics and
  evaluation state it decides keep/delete with a reason per kept step. It never plans to
  delete an uncommitted directory (it may be being written) or a protected step.
* :func:`prune` applies a plan to storage. It only considers committed checkpoints, finds the
  newest one that *verifies* and protects it, and deletes each victim marker-first, so a kill
  half-way leaves an uncommitted directory (ignored by readers, listed by
  ``clean-incomplete``), never a "committed" checkpoint with files missing. When nothing
  verifies it deletes nothing.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from ..catalog.discovery import CheckpointPath, scan_checkpoints
from ..catalog.evaluation import evaluated_partitions, read_checkpoint_metrics
from ..catalog.save_dir import assert_save_dir
from ..reading.verify import VerifyLevel, get_latest_valid_checkpoint
from ..storage.filesystem import StorageOptions
from .deletion import chain_parents, children_first, delete_checkpoint

logger = logging.getLogger(__name__)


class RetentionPolicy(BaseModel):
    """What to keep. A checkpoint is kept when *any* rule keeps it.

    * ``keep_last``: the newest N committed checkpoints (at least 1).
    * ``keep_every_steps``: permanent milestones, every step divisible by K.
    * ``keep_best`` + ``best_metric`` + ``best_mode``: the k best by a metric evaluators
      recorded in ``<checkpoint>/metrics.json`` (``write_checkpoint_metrics``).
    * ``keep_until_evaluated``: partitions that must have marked a checkpoint evaluated
      (``mark_done_eval``) before it may go.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    keep_last: int = Field(ge=1)
    keep_every_steps: int | None = Field(default=None, ge=1)
    keep_best: int | None = Field(default=None, ge=1)
    best_metric: str | None = None
    best_mode: Literal["min", "max"] = "min"
    keep_until_evaluated: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _best_needs_metric(self) -> RetentionPolicy:
        if self.keep_best is not None and not self.best_metric:
            raise ValueError("keep_best needs best_metric (the metrics.json key to rank by)")
        return self


@dataclass(frozen=True)
class RetentionPlan:
    """Kept and deleted checkpoints (sorted by step) and why each kept one is kept."""

    keep: list[CheckpointPath]
    delete: list[CheckpointPath]
    reasons: dict[int, list[str]] = field(default_factory=dict)


def plan_retention(
    checkpoints: Iterable[CheckpointPath],
    policy: RetentionPolicy,
    metrics: Mapping[int, float] | None = None,
    evaluated: Mapping[int, set[str]] | None = None,
    *,
    protect: Iterable[int] = (),
    parents: Mapping[int, int] | None = None,
) -> RetentionPlan:
    """Decide what to keep; pure (no I/O).

    ``metrics`` maps step to the value of ``policy.best_metric`` (steps without one are not
    ranked); ``evaluated`` maps step to the partitions that finished it; ``protect`` are
    steps kept no matter what (``prune`` passes the newest valid checkpoint). Uncommitted
    entries are kept ("incomplete"): retention never touches them. ``parents`` maps each
    delta checkpoint (incremental saves) to its parent's step: a kept delta keeps its whole
    chain, down to the full checkpoint, since it cannot be restored without it.
    """
    metrics = metrics or {}
    evaluated = evaluated or {}
    ordered = sorted(checkpoints)
    committed = [c for c in ordered if c.committed]
    reasons: dict[int, list[str]] = {}

    def keep(step: int, reason: str) -> None:
        reasons.setdefault(step, []).append(reason)

    for entry in ordered:
        if not entry.committed:
            keep(entry.step, "incomplete (may be being written; never pruned)")
    for entry in committed[-policy.keep_last :]:
        keep(entry.step, f"among the last {policy.keep_last}")
    if policy.keep_every_steps:
        for entry in committed:
            if entry.step % policy.keep_every_steps == 0:
                keep(entry.step, f"milestone (every {policy.keep_every_steps} steps)")
    if policy.keep_best:
        ranked = [
            c for c in committed if c.step in metrics and not math.isnan(float(metrics[c.step]))
        ]
        sign = 1.0 if policy.best_mode == "min" else -1.0
        # Best value first; among equals, the newer checkpoint.
        ranked.sort(key=lambda c: (sign * float(metrics[c.step]), -c.step))
        for entry in ranked[: policy.keep_best]:
            keep(
                entry.step,
                f"best {policy.keep_best} by {policy.best_metric} ({policy.best_mode})",
            )
    if policy.keep_until_evaluated:
        wanted = set(policy.keep_until_evaluated)
        for entry in committed:
            missing = sorted(wanted - set(evaluated.get(entry.step, set())))
            if missing:
                keep(entry.step, f"awaiting evaluation: {', '.join(missing)}")
    protected = set(protect)
    for entry in committed:
        if entry.step in protected:
            keep(entry.step, "newest valid checkpoint")
    parents = parents or {}
    present = {entry.step for entry in committed}
    for step in sorted(reasons, reverse=True):
        child = step
        while parents.get(child) in present and parents[child] not in reasons:
            keep(parents[child], f"base of the kept delta checkpoint {step}")
            child = parents[child]
    kept = [c for c in ordered if c.step in reasons]
    deleted = [c for c in committed if c.step not in reasons]
    return RetentionPlan(keep=kept, delete=deleted, reasons=reasons)


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` decided and did."""

    plan: RetentionPlan
    latest_valid: str
    deleted: list[str]
    dry_run: bool


def prune(
    save_dir: str,
    policy: RetentionPolicy,
    *,
    dry_run: bool = False,
    storage_options: StorageOptions | None = None,
    verify: VerifyLevel = "size",
    on_plan: Callable[[RetentionPlan], None] | None = None,
    on_deleted: Callable[[CheckpointPath], None] | None = None,
) -> PruneResult:
    """Delete the committed checkpoints ``policy`` does not keep; return what happened.

    Safe alongside a running trainer: checkpoints still being written are uncommitted and
    never considered, the newest checkpoint that verifies (``verify`` level) is always kept,
    and each deletion removes the commit marker first. ``dry_run`` plans without deleting.
    ``on_plan`` sees the plan before any deletion, ``on_deleted`` each deleted checkpoint
    (progress reporting).
    """
    assert_save_dir(save_dir, storage_options)
    entries = scan_checkpoints(save_dir, storage_options)
    committed = [c for c in entries if c.committed]
    latest_valid = get_latest_valid_checkpoint(
        save_dir, verify=verify, storage_options=storage_options
    )
    if committed and not latest_valid:
        logger.warning(
            "No checkpoint in %s verifies; pruning nothing (fix or inspect with "
            "`tml checkpoints verify`).",
            save_dir,
        )
        plan = RetentionPlan(
            keep=entries,
            delete=[],
            reasons={c.step: ["no valid checkpoint: nothing is pruned"] for c in entries},
        )
        return PruneResult(plan=plan, latest_valid="", deleted=[], dry_run=dry_run)
    latest_step = next((c.step for c in committed if c.path == latest_valid), None)
    metrics: dict[int, float] = {}
    if policy.keep_best and policy.best_metric:
        for entry in committed:
            value = read_checkpoint_metrics(entry.path, storage_options=storage_options).get(
                policy.best_metric
            )
            if value is not None:
                metrics[entry.step] = value
    evaluated: dict[int, set[str]] = {}
    if policy.keep_until_evaluated:
        for entry in committed:
            evaluated[entry.step] = set(
                evaluated_partitions(entry.path, storage_options=storage_options)
            )
    parents = chain_parents(committed, storage_options)
    plan = plan_retention(
        entries,
        policy,
        metrics,
        evaluated,
        protect=() if latest_step is None else (latest_step,),
        parents=parents,
    )
    if on_plan is not None:
        on_plan(plan)
    deleted: list[str] = []
    for victim in children_first(plan.delete, parents):
        if dry_run:
            continue
        delete_checkpoint(victim.path, storage_options)
        logger.info("Pruned %s.", victim.path)
        deleted.append(victim.path)
        if on_deleted is not None:
            on_deleted(victim)
    return PruneResult(plan=plan, latest_valid=latest_valid, deleted=deleted, dry_run=dry_run)
