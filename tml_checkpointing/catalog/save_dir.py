"""Which directory is a ``save_dir``: the guard every command that works on one runs first.

Why: inside a checkpoint, its rank directory ``0/`` looks like an incomplete checkpoint, so
cleaning or pruning a checkpoint taken for a save_dir would delete its data. The guard
refuses a committed checkpoint and anything directly inside one. The other way round,
:func:`holds_run` tells a command that writes a checkpoint somewhere of its own choosing
(``materialize``) that it is about to write into a run's save_dir.
"""

from __future__ import annotations

from ..errors import NotASaveDirError
from ..format.layout import (
    COMMIT_MARKER,
    INTEGRITY_SIDECAR,
    RUN_INFO,
    SAVE_CLAIM,
    WRITER_LOCK,
    marker_torn,
    parse_step,
)
from ..storage.faults import reading
from ..storage.filesystem import StorageOptions, basename, parent_url, resolve
from .discovery import is_committed


def assert_save_dir(save_dir: str, storage_options: StorageOptions | None = None) -> None:
    """Refuse to treat a checkpoint as a ``save_dir``: inside one, its rank directory ``0/``
    looks like an incomplete checkpoint and would be deleted."""
    if is_committed(save_dir, storage_options):
        raise NotASaveDirError(
            f"{save_dir!r} is a checkpoint, not a save_dir; give the directory that holds the "
            "<step> checkpoints (its parent)"
        )
    why = uncommitted_checkpoint(save_dir, storage_options)
    if why:
        raise NotASaveDirError(
            f"{save_dir!r} is a checkpoint's directory, not a save_dir: {why}. Give the "
            "directory that holds the <step> checkpoints (its parent)"
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


def holds_run(directory: str, storage_options: StorageOptions | None = None) -> bool:
    """Whether ``directory`` holds what a save_dir holds: ``<step>`` directories, a writer
    lock, or a run's ``run.json`` (one listing; a directory that does not exist holds none)."""
    fs, root = resolve(directory, storage_options)
    with reading(f"the entries of {directory}"):
        try:
            entries = fs.ls(root.rstrip("/") or root, detail=True)
        except (FileNotFoundError, NotADirectoryError):
            return False
    for entry in entries:
        name = basename(entry["name"])
        if name in (WRITER_LOCK, RUN_INFO):
            return True
        if entry.get("type") == "directory" and parse_step(name) is not None:
            return True
    return False


def uncommitted_checkpoint(path: str, storage_options: StorageOptions | None = None) -> str:
    """Why ``path`` (not committed) is a checkpoint's directory nonetheless, or ``""``.

    Its own commit files say so (one listing): an empty marker (a commit torn mid-write, over
    data that may be whole), a save claim or a sidecar. Such a directory is never a save_dir:
    its rank directory ``0/`` is no step, and cleaning it as one would delete its data.
    """
    fs, root = resolve(path, storage_options)
    with reading(f"the entries of {path}"):
        try:
            entries = {basename(e["name"]): e for e in fs.ls(root.rstrip("/") or root, detail=True)}
        except (FileNotFoundError, NotADirectoryError):
            return ""
    marker = entries.get(COMMIT_MARKER)
    if marker is not None and marker_torn(marker.get("size")):
        return (
            f"its commit marker {COMMIT_MARKER} is empty (a commit torn mid-write), so nothing "
            "vouches for its data, which is kept; `tml checkpoints clean-incomplete` on its "
            "save_dir moves it aside (to <step>.torn-marker-<time>), and so does the next save "
            "of that step"
        )
    if SAVE_CLAIM in entries or INTEGRITY_SIDECAR in entries:
        return (
            "it has no commit marker yet (a save in flight, or one that crashed): wait for it, "
            "or run `tml checkpoints clean-incomplete` on its save_dir once it is old"
        )
    return ""
