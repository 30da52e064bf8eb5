"""Which writer takes a save, and starting it: the writer process, a writer thread, torchsnapshot.

Why a choice: the writer process keeps hashing and writing off the training process's GIL,
but it reaches only stores another process can open with the same URL and options. In a job
of several ranks every rank stages its local state (shards, and the replicated part once) for
its own writer process, and rank 0 commits (:mod:`.rank_commit`). A writer thread writes the
same staged bytes for a store only this process reaches (an incremental save to
``memory://``); anything else (DTensor, quantized tensors, several ranks on ``memory://``) goes
through torchsnapshot's own thread. Every path ends in the same commit.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Mapping
from typing import Any, Literal

import torch.distributed as dist
from fsspec import AbstractFileSystem

from ..errors import InvalidArgumentError, SnapshotStateError
from ..format.chain_link import ChainLink
from ..storage.filesystem import StorageOptions, reached_by_any_process
from .background import BackgroundSave, UpdateGate, detach_objects
from .chain_cursor import ChainCursor
from .pending import Writing
from .rank_commit import RankChannel, RankSave, SaveKeys, agree_on_chain
from .save_plan import SavePlan, flatten_state, plan_key, plan_save
from .staging import ChainVote, StagingArea, shared_memory_room
from .torchsnapshot_writer import start_torchsnapshot_save
from .writer_process import shared_writer
from .writer_thread import ThreadSave

logger = logging.getLogger(__name__)

WriterChoice = Literal["auto", "process", "torchsnapshot"]
WRITER_CHOICES: tuple[WriterChoice, ...] = ("auto", "process", "torchsnapshot")
Started = Writing  # every writer's handle, torchsnapshot's pending snapshot too


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
        background_staging: bool = False,
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
        self.background_staging = bool(background_staging)
        self.gate = UpdateGate()  # holds training's updates while a background copy runs
        self.reachable = writer_process_reaches(fs, storage_options)
        # Why this state cannot be staged (sharded, GPU, ...): found once, not on every save
        # (finding out costs a state_dict() walk); forgotten when the state is replaced.
        self._unstageable = ""
        self._warned_full = False
        self._channel: RankChannel | None = None  # several ranks: reports to rank 0
        self._sequence = 0  # collective saves so far (the same count on every rank)
        self._last_vote: str | None = None  # store key of this rank's previous chain vote

    def forget_state(self) -> None:
        self._unstageable = ""
        self.gate.wait()  # a copy of the old state still running keeps its hooks until done
        self.gate.release_hooks()  # hooked on the old state's objects

    def start_writer_soon(self) -> None:
        """Start the writer process in the background if saves may go through it, so that
        the first save finds it ready (its interpreter starts while training does)."""
        if self.writer != "torchsnapshot" and self.reachable:
            shared_writer().start_soon()

    def start(
        self, path: str, state: Mapping[str, Any], chain: ChainCursor
    ) -> tuple[Started, str, ChainLink | None]:
        """Stage ``state`` and start writing it to ``path``: through the writer process if
        it can take it, else through torchsnapshot's writer thread; ``(handle, how, link)``.

        With ``background_staging`` the copy itself runs in a thread (``link`` is then
        ``None`` here and known to the handle once staged); see :mod:`.background`."""
        prepared = self._prepare(path, state, chain)
        if prepared is None:
            return start_torchsnapshot_save(path, state, self.storage_options), "staged", None
        how, stage_and_start = prepared
        if self.background_staging:
            self.gate.guard(state)
            save = BackgroundSave(self.gate, stage_and_start)
            return save, f"staging in the background {how}", None
        writing, link = stage_and_start()
        if link is not None:
            how += f", {'delta' if link.is_delta else 'full'} (chain depth {link.depth})"
        return writing, f"staged {how}", link

    def _prepare(
        self, path: str, state: Mapping[str, Any], chain: ChainCursor
    ) -> tuple[str, Callable[[], tuple[Writing, ChainLink | None]]] | None:
        """Everything of a staged save that must happen in the training thread (the state's
        ``state_dict()``, the plan, the chain's parent); ``(how, stage and start)``, or
        ``None``: use torchsnapshot."""
        if self.writer == "torchsnapshot":
            return None
        why_not = self._why_not_writer_process()
        rank, world_size = _rank_and_world_size()
        incremental = self.incremental
        containers, leaves = flatten_state(state) if not why_not else ({}, {})
        if not why_not and not self.staging.fits(leaves):
            self.gate.wait()  # the block is about to be replaced: no copy may be running
            chain.reset()  # a new block holds no saved copy to compare with
            plan = plan_save(
                leaves, incremental, self.min_chained_bytes, rank=rank, world_size=world_size
            )
            if plan is None:
                why_not = "the state holds DTensors, quantized or sparse tensors"
                self._unstageable = why_not
            elif not shared_memory_room(plan.size):
                why_not = f"/dev/shm has no room for a {plan.size / 2**20:.0f} MiB staging block"
                if world_size > 1:  # the other ranks stage: a lone torchsnapshot take would hang
                    raise SnapshotStateError(
                        f"rank {rank}: {why_not}; every rank of a job saves the same way. "
                        "Enlarge /dev/shm (docker: --shm-size) or give every rank's Snapshot "
                        "writer='torchsnapshot'"
                    )
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
        request = chain.request(self.storage_options) if incremental else None
        keys = self._next_keys(path) if world_size > 1 else None
        if request is not None and keys is not None:
            request = dataclasses.replace(request, agree=self._agree(keys))
        if self.background_staging:
            leaves = detach_objects(leaves)
        if keys is not None:
            how = "for this rank's writer process"
        elif not self.reachable:
            how = "for a writer thread"
        else:
            how = "for the writer process"
        if keys is not None or self.reachable:
            shared_writer().start()  # from the thread that saves (not from the stager)

        def stage_and_start() -> tuple[Writing, ChainLink | None]:
            staged = area.stage(containers, leaves, chain=request)
            if keys is not None:
                return self._start_rank_save(keys, area, staged), staged.link
            if not self.reachable:
                return ThreadSave(path, self.storage_options, area, staged), staged.link
            writer = shared_writer()
            save = writer.submit(path, self.save_dir, self.storage_options, area, staged)
            return save, staged.link

        return how, stage_and_start

    def _next_keys(self, path: str) -> SaveKeys:
        """The store keys of this collective save (numbered alike on every rank)."""
        self._sequence += 1
        return SaveKeys(path, self._sequence)

    def _rank_channel(self) -> RankChannel:
        if self._channel is None:
            self._channel = RankChannel.of_job()
        assert self._channel is not None
        return self._channel

    def _agree(self, keys: SaveKeys) -> Callable[[ChainVote], ChainVote]:
        """The job's incremental decision (this rank's previous vote is removed first: every
        rank read it before the previous save could commit)."""
        channel = self._rank_channel()
        if self._last_vote is not None:
            channel.remove(self._last_vote)
        self._last_vote = keys.vote(channel.rank)
        return agree_on_chain(channel, keys)

    def _start_rank_save(self, keys: SaveKeys, area: StagingArea, staged: Any) -> RankSave:
        """This rank's writer writes its part; rank 0 commits for all (see :mod:`.rank_commit`)."""
        return RankSave(
            self._rank_channel(),
            keys,
            shared_writer(),
            url=keys.path,
            save_dir=self.save_dir,
            storage_options=self.storage_options,
            area=area,
            staged=staged,
        )

    def _why_not_writer_process(self) -> str:
        if self._unstageable:
            return self._unstageable
        several = _rank_and_world_size()[1] > 1
        if not self.reachable and (several or not self.incremental):
            return "the writer process cannot reach this storage (memory:// or a custom scheme)"
        return ""


def _rank_and_world_size() -> tuple[int, int]:
    """This process's rank and the job's size (``(0, 1)`` without a process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1
