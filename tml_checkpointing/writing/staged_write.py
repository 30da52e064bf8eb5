"""Writing one staged save: the steps the writer process (or, in-process, a writer thread) runs.

The staging block holds the tensors (:mod:`~tml_checkpointing.writing.staging`); the command
holds the rest as JSON (see :mod:`~tml_checkpointing.writing.writer_main` for its fields). Data
goes first (the block's prefix as one sequential file; for a delta save, then the changed rows
gathered into the delta file), objects next, then the commit protocol of the storage plugin
(sidecar, marker last). One function for both writers, so both write the same bytes in the
same order.

A save written in pieces (one per rank) stops before the commit: its writer hands back the
records of what it wrote, and one writer commits them all (``commit=False`` here, then
:meth:`~tml_checkpointing.storage.checkpoint_files.CheckpointFiles.merge_records` and
``commit`` there). No torch here: the writer process imports this module.
"""

from __future__ import annotations

import base64
from typing import TYPE_CHECKING, Any

from ..storage.checkpoint_files import CheckpointFiles

if TYPE_CHECKING:
    from ..storage.plugin import FsspecStoragePlugin


def write_staged(
    target: CheckpointFiles | FsspecStoragePlugin,
    block: memoryview,
    command: dict[str, Any],
    *,
    commit: bool = True,
) -> None:
    """Write the save ``command`` describes from ``block`` and, if ``commit``, commit it.

    ``target``: the checkpoint's files (or a storage plugin, whose files they are). Without
    ``commit`` the data, delta and object files are written (fsynced, recorded) and nothing
    else: no sidecar, no marker, the claim stays; ``target.records()`` then says what was
    written, for the writer that commits.
    """
    files = target if isinstance(target, CheckpointFiles) else target.files
    with block[: command["data_size"]] as data:
        files.write_data(command["data_file"], data)
    delta = command.get("delta")
    if delta:
        files.write_data(delta["file"], gather_rows(block, delta["gathers"]))
    for location, encoded in command["objects"].items():
        files.write_data(location, base64.b64decode(encoded))
    if commit:
        files.commit(command["metadata"].encode())


def gather_rows(block: memoryview, gathers: list[dict[str, int]]) -> memoryview:
    """The delta file: for each chained tensor, its changed-row indices (int64), then those
    rows' bytes, gathered from the tensor's staged copy straight into the file's buffer (a
    vectorised take, off the training process)."""
    # Imported here, not with the module: only a delta save needs numpy, and a fresh writer
    # that imports it up front reaches its first (always full) save ~0.1 s later.
    import numpy as np

    total = sum(gather["count"] * (8 + gather["row_bytes"]) for gather in gathers)
    out = np.empty(total, dtype=np.uint8)
    position = 0
    for gather in gathers:
        count, width = gather["count"], gather["row_bytes"]
        rows = np.frombuffer(block, dtype=np.int64, count=count, offset=gather["rows_offset"])
        out[position : position + count * 8] = rows.view(np.uint8)
        position += count * 8
        if count:
            top = int(rows.max()) + 1
            table = np.frombuffer(
                block, dtype=np.uint8, count=top * width, offset=gather["slot_offset"]
            ).reshape(top, width)
            np.take(
                table,
                rows,
                axis=0,
                out=out[position : position + count * width].reshape(count, width),
            )
        position += count * width
    return memoryview(out.data)
