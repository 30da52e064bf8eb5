"""The process group a sharded recipe runs in: torchrun's, or a private one-rank group.

TorchRec's ``DistributedModelParallel`` needs a process group even in one process. Giving one
process a one-rank group (in-process ``HashStore``: no port, no network) lets the evaluator and
one-process training build exactly the model N ranks train, so checkpoints move between world
sizes. The group is created once per process and kept: torch allows one default group, and
the tables built on it live as long as the process.
"""

from __future__ import annotations

import threading

import torch.distributed as dist

_lock = threading.Lock()


def ensure_process_group() -> tuple[int, int]:
    """(rank, world size) of the default process group, creating a one-rank group if none."""
    with _lock:
        if not dist.is_initialized():
            # HashStore is in torch.distributed, but not in its __all__ (no explicit re-export).
            store = dist.HashStore()  # type: ignore[attr-defined]
            dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    return dist.get_rank(), dist.get_world_size()


def is_distributed() -> bool:
    """Whether this process is one of several ranks (not alone in a private group)."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
