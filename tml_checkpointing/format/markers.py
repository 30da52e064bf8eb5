"""The commit marker's content: torchsnapshot metadata, and the files its manifest names.

Why a module of its own: the marker is both "is committed" (:func:`~.layout.marker_commits`,
its size) and the checkpoint's table of contents (its YAML). Parsing the YAML, and walking the
manifest for every file it points into, are pure functions of the bytes; reading them from a
store is :mod:`tml_checkpointing.reading.metadata`.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from torchsnapshot.manifest import SnapshotMetadata


def parse_marker(raw: bytes) -> tuple[SnapshotMetadata | None, str]:
    """The marker's bytes as torchsnapshot metadata, or ``(None, why they do not parse)``.

    Any parse failure of bytes already read means a broken marker (corrupt), never a fault of
    the store.
    """
    try:
        metadata = SnapshotMetadata.from_yaml(raw.decode())
        if not isinstance(metadata.manifest, dict):
            raise TypeError("manifest is not a mapping")
        return metadata, ""
    except Exception as error:  # any parse failure of bytes we hold means a broken marker
        return None, f"{type(error).__name__}: {str(error)[:120]}"


def manifest_locations(metadata: SnapshotMetadata) -> Iterator[tuple[str, int | None]]:
    """``(file, last byte read or None)`` for every file the manifest points into."""

    def walk(entry: Any) -> Iterator[tuple[str, int | None]]:
        location = getattr(entry, "location", None)
        if isinstance(location, str):
            byte_range = getattr(entry, "byte_range", None)
            yield location, (int(byte_range[1]) if byte_range else None)
        for nested in ("shards", "chunks"):
            for shard in getattr(entry, nested, None) or []:
                tensor = getattr(shard, "tensor", None)
                if tensor is not None:
                    yield from walk(tensor)

    ends: dict[str, int | None] = {}
    for entry in metadata.manifest.values():
        for location, end in walk(entry):
            previous = ends.get(location)
            ends[location] = end if previous is None else max(previous, end or 0)
    yield from ends.items()
