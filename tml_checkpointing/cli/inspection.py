"""``tml checkpoints inspect``: one checkpoint's manifest (names, types, shapes, dtypes)."""

from __future__ import annotations

import argparse
from collections.abc import Mapping, Sequence
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table
from torchsnapshot.manifest import ShardedTensorEntry

from ..errors import (
    CorruptCheckpointError,
    corrupt_checkpoint,
)
from ..format.chain_link import DELTA_ROOT, ChainLink
from ..format.layout import COMMIT_MARKER
from ..reading.chains import ancestry, link_of, logical_metadata
from ..reading.metadata import read_metadata
from ..reading.verify import verify_checkpoint
from ..storage.filesystem import resolve
from .common import (
    chain_summary,
    chain_text,
    emit,
    err_console,
    format_bytes,
    require_checkpoint,
)
from .exit_codes import EXIT_CORRUPT, EXIT_OK


def checkpoints_inspect(args: argparse.Namespace) -> int:
    require_checkpoint(args.checkpoint)
    fs, root = resolve(args.checkpoint)
    metadata, why = read_metadata(fs, root.rstrip("/"), args.checkpoint)
    if metadata is None:
        raise corrupt_checkpoint(
            args.checkpoint,
            COMMIT_MARKER,
            f"commit marker unreadable as torchsnapshot metadata ({why})",
            kind="marker",
        )
    report = verify_checkpoint(args.checkpoint, level="size", raise_on_corrupt=False)
    link = link_of(metadata, args.checkpoint)
    chained = {f"0/{t.path}" for t in link.tensors} if link is not None else set()
    logical = logical_metadata(metadata, link)
    entries = [_describe_entry(name, entry) for name, entry in _merge_shards(logical.manifest)]
    entries = [
        {**e, "type": "Tensor (rows over a chain)" if e["name"] in chained else e["type"]}
        for e in entries
        if e["type"] not in ("dict", "list", "OrderedDict") and not _is_chain_part(e["name"])
    ]
    chain = chain_summary(link)
    if chain is not None and link is not None:
        chain["base"] = _chain_base(args.checkpoint, metadata, link)
        chain["plain_torchsnapshot_restore"] = not link.is_delta
    payload = {
        "checkpoint": args.checkpoint,
        "world_size": metadata.world_size,
        "version": metadata.version,
        "entries": entries,
        "tensor_bytes": sum(e["bytes"] or 0 for e in entries),
        "chain": chain,
        "state": report.status,
        "problems": [str(p) for p in report.problems],
    }

    def render() -> None:
        table = Table(title=f"{args.checkpoint} (world size {metadata.world_size})")
        for column in ("name", "type", "shape", "dtype", "bytes"):
            table.add_column(column, justify="right" if column == "bytes" else "left")
        for entry in entries:
            table.add_row(
                entry["name"],
                entry["type"],
                "" if entry["shape"] is None else "x".join(map(str, entry["shape"])) or "scalar",
                entry["dtype"] or "",
                format_bytes(entry["bytes"]) if entry["bytes"] is not None else "",
            )
        Console().print(table)
        Console().print(f"tensor data: {format_bytes(payload['tensor_bytes'])}")
        if chain is not None and chain["delta"]:
            Console().print(
                f"incremental: {chain_text(chain)} (depth {chain['depth']}), chain starts at "
                f"{chain['base']}; "
                f"wrote {format_bytes(chain['written_bytes'])} of "
                f"{format_bytes(chain['logical_bytes'])}. Plain torchsnapshot cannot restore "
                "it: restore with tml_checkpointing.Snapshot, or `tml checkpoints materialize`."
            )
        elif chain is not None:
            Console().print("incremental: full checkpoint (starts a chain)")
        for problem in report.problems:
            err_console().print(f"[bold red]corrupt[/]: {escape(str(problem))}")

    emit(args, payload, render)
    return EXIT_CORRUPT if report.status == "corrupt" else EXIT_OK


def _is_chain_part(ranked: str) -> bool:
    logical = ranked.split("/", 1)[-1]
    return logical == DELTA_ROOT or logical.startswith(f"{DELTA_ROOT}/")


def _chain_base(checkpoint: str, metadata: Any, link: ChainLink) -> str | None:
    """The full checkpoint the chain starts at (``None``: the chain is broken; verify says
    why)."""
    if not link.is_delta:
        return checkpoint
    fs, root = resolve(checkpoint)
    try:
        return ancestry(checkpoint, metadata, fs, root)[-1].checkpoint
    except CorruptCheckpointError:
        return None


def _merge_shards(manifest: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Manifest entries, with a sharded tensor shown once with its full shape.

    Each saving rank's entry (``0/model/t``, ``1/model/t``) lists only that rank's shards; the
    row is named by the logical path (``model/t``) and describes the whole table.
    """
    merged: dict[str, Any] = {}
    rows: list[tuple[str, Any]] = []
    for name, entry in manifest.items():
        if not isinstance(entry, ShardedTensorEntry):
            rows.append((name, entry))
            continue
        logical = name.split("/", 1)[1]
        if logical not in merged:
            merged[logical] = ShardedTensorEntry(shards=[])
            rows.append((logical, merged[logical]))
        merged[logical].shards.extend(entry.shards)
    return rows


def _describe_entry(name: str, entry: Any) -> dict[str, Any]:
    shape = getattr(entry, "shape", None)
    if shape is None and getattr(entry, "shards", None):
        shape = [
            max(o + s for o, s in zip(dims, sizes, strict=True))
            for dims, sizes in zip(
                zip(*(shard.offsets for shard in entry.shards), strict=True),
                zip(*(shard.sizes for shard in entry.shards), strict=True),
                strict=True,
            )
        ]
    dtype = getattr(entry, "dtype", None)
    if dtype is None and getattr(entry, "shards", None):
        dtype = entry.shards[0].tensor.dtype
    size: int | None = None
    if shape is not None and dtype:
        size = _numel(shape) * _element_size(dtype)
    elif getattr(entry, "byte_range", None):
        size = int(entry.byte_range[1]) - int(entry.byte_range[0])
    return {
        "name": name,
        "type": entry.type,
        "shape": list(shape) if shape is not None else None,
        "dtype": dtype,
        "bytes": size,
        "value": getattr(entry, "readable", None),
    }


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def _element_size(dtype: str) -> int:
    import torch
    from torchsnapshot.serialization import string_to_dtype

    try:
        return torch.empty((), dtype=string_to_dtype(dtype)).element_size()
    except Exception:
        return 0
