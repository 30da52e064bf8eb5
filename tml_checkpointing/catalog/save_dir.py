"""Which directory is a ``save_dir``: the guard every command that works on one runs first.

Why: inside a checkpoint, its rank directory ``0/`` looks like an incomplete checkpoint, so
cleaning or pruning a checkpoint taken for a save_dir would delete its data. The guard
refuses a committed checkpoint and anything directly inside one.
"""

from __future__ import annotations

from ..errors import NotASaveDirError
from ..storage.filesystem import StorageOptions, parent_url
from .discovery import is_committed


def assert_save_dir(save_dir: str, storage_options: StorageOptions | None = None) -> None:
    """Refuse to treat a checkpoint as a ``save_dir``: inside one, its rank directory ``0/``
    looks like an incomplete checkpoint and would be deleted."""
    if is_committed(save_dir, storage_options):
        raise NotASaveDirError(
            f"{save_dir!r} is a checkpoint, not a save_dir; give the directory that holds the "
            "<step> checkpoints (its parent)"
        )
    parent = parent_url(save_dir)
    if _parent_is_checkpoint(parent, save_dir, storage_options):
        raise NotASaveDirError(
            f"{save_dir!r} is inside the checkpoint {parent!r}, not a save_dir; give the "
            "directory that holds the <step> checkpoints"
        )


def _parent_is_checkpoint(
    parent: str, save_dir: str, storage_options: StorageOptions | None
) -> bool:
    if parent in (".", "", save_dir) or parent.endswith(":/"):
        return False
    try:
        return is_committed(parent, storage_options)
    except (OSError, ValueError):
        # A guard against typos, best effort: the bucket root has nothing above it, and a
        # parent outside the caller's permissions is not theirs to prune. The operation
        # itself then reads save_dir and reports any storage fault there.
        return False
