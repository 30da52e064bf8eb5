"""The few decisions ranks must take together: made once (by rank 0) or agreed by all.

Why: N ranks that each list ``save_dir`` can see different answers (a commit lands between two
listings, S3 lists lag), then restore different checkpoints and deadlock in the first
collective. So the checkpoint to resume from is decided by rank 0 and broadcast, side effects
on the directory (moving a corrupt checkpoint aside, retention) are rank 0's alone, and a
preemption signal that reached any rank stops every rank at the same step. In one process
(no group, or a private one-rank group) every function here is the plain local answer.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TypeVar, cast

import torch
import torch.distributed as dist

from recipes.process_group import is_distributed

T = TypeVar("T")


@dataclass(frozen=True)
class _Raised:
    """What rank 0's ``decide()`` raised, sent to every rank to raise there too."""

    error: Exception


def is_primary() -> bool:
    """Whether this process is rank 0 (or alone): the one that changes ``save_dir``."""
    return not is_distributed() or dist.get_rank() == 0


def decided_by_rank0(decide: Callable[[], T]) -> T:
    """``decide()`` run on rank 0 only, its result (or its exception) given to every rank."""
    if not is_distributed():
        return decide()
    answer: list[T | _Raised | None] = [None]
    if dist.get_rank() == 0:
        try:
            answer[0] = decide()
        except Exception as error:  # every rank raises it, so none waits for the others
            answer[0] = _Raised(error)
    dist.broadcast_object_list(answer, src=0)
    outcome = answer[0]
    if isinstance(outcome, _Raised):
        raise outcome.error
    return cast(T, outcome)  # rank 0's decide() result, now on every rank


def any_rank(flag: bool) -> bool:
    """True on every rank when ``flag`` is true on at least one (one small all-reduce)."""
    if not is_distributed():
        return flag
    value = torch.tensor([1 if flag else 0], dtype=torch.int32)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return bool(value.item())
