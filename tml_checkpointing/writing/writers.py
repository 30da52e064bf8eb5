"""Which writer takes a save, and starting it: the writer process, a writer thread, torchsnapshot.

Why a choice: the writer process keeps hashing and writing off the training process's GIL,
but it reaches only stores another process can open with the same URL and options, and it
takes only plain CPU state of one process. A writer thread writes the same staged bytes for a
store only this process reaches (an incremental save to ``memory://``); anything else (sharded,
GPU, several ranks) goes through torchsnapshot's own thread. Every path ends in the same commit.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any, Literal

import torch.distributed as dist
import torchsnapshot
from fsspec import AbstractFileSystem

from ..errors import InvalidArgumentError, SnapshotStateError
from ..format.chain_link import ChainLink
from ..storage.filesystem import StorageOptions, reached_by_any_process
from .chain_cursor import ChainCursor
from .staging import SavePlan, StagingArea, flatten_state, plan_key, plan_save, shared_memory_room
from .torchsnapshot_writer import start_torchsnapshot_save
from .writer_process import WriterSave, shared_writer
from .writer_thread import ThreadSave

logger = logging.getLogger(__name__)

WriterChoice = Literal["auto", "process", "torchsnapshot"]
WRITER_CHOICES: tuple[WriterChoice, ...] = ("auto", "process", "torchsnapshot")
Started = torchsnapshot.snapshot.PendingSnapshot | WriterSave | ThreadSave


def writer_process_reaches(fs: AbstractFileSystem, storage_options: StorageOptions) -> bool:
    """Whether the writer process can write where ``fs`` writes, with these options."""
    if not reached_by_any_process(fs):
        return False
    try:
        json.dumps(dict(storage_options))
    except (TypeError, ValueError):
        return False  # options that cannot be sent to another process (client objects, ...)
    return True


class Staging:
    """A Snapshot's staging block: planned for one state layout, replaced when it changes."""

    def __init__(self) -> None:
        self.area: StagingArea | None = None

    def fits(self, leaves: Mapping[str, Any]) -> bool:
        return self.area is not None and self.area.plan.key == plan_key(leaves)

    def replan(self, plan: SavePlan) -> None:
        self.release()
        self.area = StagingArea(plan, on_free=_forget_block)

    def release(self) -> None:
        area, self.area = self.area, None
        if area is not None:
            area.close()


def _forget_block(name: str) -> None:
    shared_writer().forget(name)


class Writers:
    """The writer paths of one Snapshot, and what it learned about its state."""

    def __init__(
        self,
        save_dir: str,
        storage_options: StorageOptions,
        fs: AbstractFileSystem,
        *,
        writer: WriterChoice,
        incremental: bool,
        min_chained_bytes: int,
        staging: Staging,
    ) -> None:
        if writer not in WRITER_CHOICES:
            raise SnapshotStateError(f"writer must be one of {WRITER_CHOICES}, got {writer!r}")
        if incremental and writer == "torchsnapshot":
            raise SnapshotStateError(
                "incremental saves need the staging writer (it holds the last saved copy to "
                "compare with); use writer='auto' or 'process'"
            )
        if not isinstance(min_chained_bytes, int) or min_chained_bytes < 1:
            raise InvalidArgumentError(
                f"min_chained_bytes must be a positive integer, got {min_chained_bytes!r}"
            )
        self.save_dir = save_dir
        self.storage_options = storage_options
        self.writer = writer
        self.incremental = incremental
        self.min_chained_bytes = min_chained_bytes
        self.staging = staging
        self.reachable = writer_process_reaches(fs, storage_options)
        # Why this state cannot be staged (sharded, GPU, ...): found once, not on every save
        # (finding out costs a state_dict() walk); forgotten when the state is replaced.
        self._unstageable = ""
        self._warned_full = False

    def forget_state(self) -> None:
        self._unstageable = ""

    def start(
        self, path: str, state: Mapping[str, Any], chain: ChainCursor
    ) -> tuple[Started, str, ChainLink | None]:
        """Stage ``state`` and start writing it to ``path``: through the writer process if
        it can take it, else through torchsnapshot's writer thread; ``(handle, how, link)``."""
        staged = self._stage_for_writer(path, state, chain)
        if staged is not None:
            save, link = staged
            how = "staged for the writer process"
            if isinstance(save, ThreadSave):
                how = "staged for a writer thread"
            if link is not None:
                how += f", {'delta' if link.is_delta else 'full'} (chain depth {link.depth})"
            return save, how, link
        return start_torchsnapshot_save(path, state, self.storage_options), "staged", None

    def _stage_for_writer(
        self, path: str, state: Mapping[str, Any], chain: ChainCursor
    ) -> tuple[WriterSave | ThreadSave, ChainLink | None] | None:
        """Stage the state and hand it to the writer process (or, for an incremental save to
        a store only this process reaches, a writer thread); ``None``: use torchsnapshot."""
        if self.writer == "torchsnapshot":
            return None
        why_not = self._why_not_writer_process()
        containers, leaves = flatten_state(state) if not why_not else ({}, {})
        if not why_not and not self.staging.fits(leaves):
            chain.reset()  # a new block holds no saved copy to compare with
            plan = plan_save(leaves, self.incremental, self.min_chained_bytes)
            if plan is None:
                why_not = "the state holds sharded, distributed or non-CPU tensors"
                self._unstageable = why_not
            elif not shared_memory_room(plan.size):
                why_not = f"/dev/shm has no room for a {plan.size / 2**20:.0f} MiB staging block"
                logger.warning("Saving through torchsnapshot's writer thread: %s.", why_not)
            else:
                self.staging.replan(plan)
        if why_not:
            if self.writer == "process":
                raise SnapshotStateError(f"writer='process' cannot save this state: {why_not}")
            if self.incremental and not self._warned_full:
                logger.warning("Incremental saves are off for %s: %s.", self.save_dir, why_not)
                self._warned_full = True
            return None
        area = self.staging.area
        assert area is not None
        request = chain.request(self.storage_options) if self.incremental else None
        staged = area.stage(containers, leaves, chain=request)
        if not self.reachable:
            return ThreadSave(path, self.storage_options, area, staged), staged.link
        writer = shared_writer()
        writer.start()
        save = writer.submit(path, self.save_dir, self.storage_options, area, staged)
        return save, staged.link

    def _why_not_writer_process(self) -> str:
        if self._unstageable:
            return self._unstageable
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            return "several ranks save collectively through torchsnapshot"
        if not self.reachable and not self.incremental:
            return "the writer process cannot reach this storage (memory:// or a custom scheme)"
        return ""
