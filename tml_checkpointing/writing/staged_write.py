"""Writing one staged save: the steps the writer process (or, in-process, a writer thread) runs.

The staging block holds the tensors (:mod:`~tml_checkpointing.writing.staging`); the command
holds the rest as JSON (see :mod:`~tml_checkpointing.writing.writer_main` for its fields). Data
goes first (the block's prefix as one sequential file; for a delta save, then the changed rows
gathered into the delta file), objects next, then the commit protocol of the storage plugin
(sidecar, marker last). One function for both writers, so both write the same bytes in the
same order.
"""

from __future__ import annotations

import base64
from typing import Any

import numpy as np

from ..storage.plugin import FsspecStoragePlugin


def write_staged(plugin: FsspecStoragePlugin, block: memoryview, command: dict[str, Any]) -> None:
    """Write the save ``command`` describes from ``block`` and commit it through ``plugin``."""
    with block[: command["data_size"]] as data:
        plugin._write_data(command["data_file"], data)
    delta = command.get("delta")
    if delta:
        plugin._write_data(delta["file"], gather_rows(block, delta["gathers"]))
    for location, encoded in command["objects"].items():
        plugin._write_data(location, base64.b64decode(encoded))
    plugin._commit(command["metadata"].encode())


def gather_rows(block: memoryview, gathers: list[dict[str, int]]) -> memoryview:
    """The delta file: for each chained tensor, its changed-row indices (int64), then those
    rows' bytes, gathered from the tensor's staged copy straight into the file's buffer (a
    vectorised take, off the training process)."""
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
