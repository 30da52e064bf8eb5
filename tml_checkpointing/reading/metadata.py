"""Reading a checkpoint's two small files: the commit marker (metadata) and the sidecar.

Both are read whole with one request. A storage fault raises
:class:`~tml_checkpointing.errors.CheckpointReadError` (unreadable is not corrupt); only bytes
that were read and do not parse make a file unusable. Verification, chains, restore and the CLI
all read them through here.
"""

from __future__ import annotations

from collections.abc import Iterable

from fsspec import AbstractFileSystem
from torchsnapshot.manifest import SnapshotMetadata

from ..errors import CheckpointNotFoundError, corrupt_checkpoint
from ..format.layout import COMMIT_MARKER, INTEGRITY_SIDECAR
from ..format.markers import parse_marker
from ..format.sidecar import Sidecar, SidecarFormatError, parse_sidecar
from ..storage.faults import reading


def _read_small_file(fs: AbstractFileSystem, root: str, name: str, checkpoint: str) -> bytes:
    with reading(f"{name} of checkpoint {checkpoint}"):
        data: bytes = fs.cat_file(f"{root}/{name}")
        return data


def read_metadata(
    fs: AbstractFileSystem, root: str, checkpoint: str
) -> tuple[SnapshotMetadata | None, str]:
    """The parsed commit marker, or ``(None, why it does not parse)``.

    Storage faults raise :class:`~tml_checkpointing.errors.CheckpointReadError`; only bytes
    that were read and do not parse make the marker unusable (corrupt).
    """
    try:
        raw = _read_small_file(fs, root, COMMIT_MARKER, checkpoint)
    except FileNotFoundError as error:
        raise CheckpointNotFoundError(
            f"{checkpoint} is no longer committed (its marker went away while being read; "
            "pruned meanwhile?)"
        ) from error
    return parse_marker(raw)


def read_sidecar(fs: AbstractFileSystem, root: str, checkpoint: str) -> Sidecar | None:
    """The checkpoint's sidecar; ``None`` when it has none. Unparsable bytes raise
    :class:`~tml_checkpointing.format.sidecar.SidecarFormatError`, storage faults
    :class:`~tml_checkpointing.errors.CheckpointReadError`."""
    try:
        raw = _read_small_file(fs, root, INTEGRITY_SIDECAR, checkpoint)
    except FileNotFoundError:
        return None
    return parse_sidecar(raw)


def read_sidecars(
    fs: AbstractFileSystem, roots: Iterable[str], checkpoint: str
) -> dict[str, Sidecar | None]:
    """The sidecar of each checkpoint directory a read spans (a chain spans several); one
    that does not parse makes ``checkpoint`` corrupt."""
    sidecars: dict[str, Sidecar | None] = {}
    for root in roots:
        try:
            sidecars[root] = read_sidecar(fs, root, checkpoint)
        except SidecarFormatError as error:
            raise corrupt_checkpoint(
                checkpoint, f"{root}/{INTEGRITY_SIDECAR}", str(error), kind="sidecar"
            ) from error
    return sidecars
