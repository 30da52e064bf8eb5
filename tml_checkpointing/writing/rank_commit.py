"""One checkpoint from several ranks: each rank's writer writes its part, rank 0 commits.

The protocol is the one-process protocol stretched over ranks: every rank's data files and
integrity records first, the marker last, one checkpoint for all ranks or none.

1. Every rank stages its local state and its writer process writes its data files (fsynced,
   hashed as written), without committing (:meth:`WriterProcess.submit`, ``commit=False``).
2. Each rank other than 0 reports its part to rank 0: its manifest fragment and the integrity
   records of its files (or the error that stopped it).
3. Rank 0 waits for every part, merges the manifests and the records, and has its writer
   commit: sidecar covering every rank's files, the files-still-there check, the marker.
4. Rank 0 posts the outcome; every rank's :class:`PendingSave` ends with it.

Why a channel of its own: the reports travel through the job's c10d store (a connection of
our own to the store ``torchrun`` started, under a key prefix of ours), never through a
collective on the training process group. A collective issued from this background thread
would interleave with training's own collectives on the same group and deadlock a training
step (measured; DCP's async save needs a group of its own for the same reason). A rank (or
its writer) that dies mid-save leaves rank 0 without its part: rank 0 commits nothing and
fails with :class:`~tml_checkpointing.errors.RankSaveError` within the rank timeout, and the
other ranks get the same outcome from rank 0 (or fail on their own timeout if rank 0 is gone).
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import threading
from collections.abc import Callable
from dataclasses import dataclass
from datetime import timedelta
from types import TracebackType
from typing import Any

import torch.distributed as dist
from torch._C._distributed_c10d import PrefixStore, Store
from torchsnapshot.manifest import SnapshotMetadata

from .. import events
from ..errors import RankSaveError
from ..format.chain_link import CHAIN_ENTRY, ChainLink, chain_link
from ..format.torchsnapshot_compat import parse_metadata_as_json_first
from ..storage.filesystem import StorageOptions
from .staging import ChainVote, StagedSave, StagingArea
from .writer_process import WriterProcess

ExcInfo = tuple[type[BaseException], BaseException, TracebackType | None]

#: How long rank 0 waits for the other ranks' parts (after its own are written), and the
#: other ranks for rank 0's outcome. Parts are written in parallel, so this bounds the skew
#: between ranks, not the time to write a checkpoint.
DEFAULT_RANK_TIMEOUT = timedelta(minutes=5)
KEY_PREFIX = "tml-checkpointing/"


class RankChannel:
    """This process's own connection to the job's c10d store, for checkpoint reports."""

    def __init__(self, store: Store, rank: int, world_size: int, timeout: timedelta) -> None:
        self.store = store
        self.rank = rank
        self.world_size = world_size
        self.timeout = timeout

    @classmethod
    def of_job(cls, timeout: timedelta = DEFAULT_RANK_TIMEOUT) -> RankChannel | None:
        """The channel of the default process group's job; ``None`` in one process."""
        if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() < 2:
            return None
        store = dist.distributed_c10d._get_default_store()
        # A connection of our own: our waits never hold up training's store calls (a store
        # that cannot be cloned is still thread-safe, only shared).
        with contextlib.suppress(RuntimeError, NotImplementedError, AttributeError):
            store = store.clone()  # type: ignore[attr-defined]
        return cls(
            PrefixStore(KEY_PREFIX, store),
            dist.get_rank(),
            dist.get_world_size(),
            timeout,
        )

    def post(self, key: str, message: dict[str, Any]) -> None:
        self.store.set(key, json.dumps(message))

    def remove(self, key: str) -> None:
        with contextlib.suppress(RuntimeError):  # a store without deletion keeps it
            self.store.delete_key(key)

    def receive(
        self, keys: dict[int, str], waiting_for: str, *, delete: bool = True
    ) -> list[dict[str, Any]]:
        """The messages under ``keys`` (``{rank: key}``), once all are there;
        :class:`RankSaveError` after the timeout, naming the ranks whose message did not come."""
        try:
            self.store.wait(list(keys.values()), self.timeout)
        except (RuntimeError, dist.DistStoreError) as error:
            missing = [str(rank) for rank, key in keys.items() if not self.store.check([key])]
            raise RankSaveError(
                f"{waiting_for} did not arrive within {self.timeout.total_seconds():.0f} s "
                f"(missing: rank {', '.join(missing) or 'none'}); nothing was committed. A "
                "rank or its writer process died, or is far slower than the others."
            ) from error
        messages = [json.loads(self.store.get(key)) for key in keys.values()]
        for key in keys.values() if delete else ():
            self.remove(key)
        return messages


@dataclass(frozen=True)
class SaveKeys:
    """The store keys of one collective save (``sequence``: this save's number in the job,
    the same on every rank because every rank calls ``save`` in the same order)."""

    path: str
    sequence: int

    def vote(self, rank: int) -> str:
        return f"{self.sequence}:{self.path}/vote/{rank}"

    def part(self, rank: int) -> str:
        return f"{self.sequence}:{self.path}/part/{rank}"

    def outcome(self, rank: int) -> str:
        return f"{self.sequence}:{self.path}/outcome/{rank}"


class RankSave:
    """One rank's share of a collective save; ``thread`` ends when the checkpoint is committed
    for all ranks or has failed (shaped like the other writers' handles)."""

    def __init__(
        self,
        channel: RankChannel,
        keys: SaveKeys,
        writer: WriterProcess,
        *,
        url: str,
        save_dir: str,
        storage_options: StorageOptions,
        area: StagingArea,
        staged: StagedSave,
    ) -> None:
        self.exc_info: ExcInfo | None = None
        self._channel = channel
        self._keys = keys
        self._writer = writer
        self._url = url
        self._save_dir = save_dir
        self._storage_options = storage_options
        self._metadata = staged.metadata
        self._data = writer.submit(url, save_dir, storage_options, area, staged, commit=False)
        self.thread = threading.Thread(target=self._run, name="tml-rank-commit", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            if self._channel.rank == 0:
                self._commit_for_all()
            else:
                self._report_and_wait()
        except BaseException as error:
            self.exc_info = (type(error), error, error.__traceback__)

    def _own_part(self) -> dict[str, Any]:
        self._data.thread.join()
        if self._data.exc_info is not None:
            error = self._data.exc_info[1]
            return {"ok": False, "error": f"{type(error).__name__}: {error}"}
        records = self._data.records
        assert records is not None
        return {"ok": True, "metadata": self._metadata, "records": records.decode()}

    def _own_error(self) -> BaseException | None:
        return self._data.exc_info[1] if self._data.exc_info is not None else None

    def _report_and_wait(self) -> None:
        rank = self._channel.rank
        part = self._own_part()
        self._channel.post(self._keys.part(rank), part)
        if not part["ok"]:  # chained to the writer's error: "disk full" stays recognisable
            raise RankSaveError(
                f"rank {rank}'s part of {self._url} failed: {part['error']}"
            ) from self._own_error()
        events.emit(events.SAVE_RANK_REPORTED, path=self._url, rank=rank)
        (outcome,) = self._channel.receive(
            {0: self._keys.outcome(rank)}, f"rank 0's commit of {self._url}"
        )
        if not outcome["ok"]:
            raise RankSaveError(f"{self._url} was not committed: {outcome['error']}")

    def _commit_for_all(self) -> None:
        world_size = self._channel.world_size
        try:
            own = self._own_part()
            if not own["ok"]:
                raise RankSaveError(
                    f"rank 0's part of {self._url} failed: {own['error']}"
                ) from self._own_error()
            events.emit(events.SAVE_RANK_REPORTED, path=self._url, rank=0)
            others = self._channel.receive(
                {rank: self._keys.part(rank) for rank in range(1, world_size)},
                f"the other ranks' parts of {self._url}",
            )
            parts = [own, *others]
            failed = [(rank, part["error"]) for rank, part in enumerate(parts) if not part["ok"]]
            if failed:
                rank, error = failed[0]
                raise RankSaveError(f"rank {rank}'s part of {self._url} failed: {error}")
            events.emit(events.SAVE_RANKS_JOINED, path=self._url, ranks=world_size)
            metadata = merge_metadata([part["metadata"] for part in parts], world_size)
            commit = self._writer.commit(
                self._url,
                self._save_dir,
                self._storage_options,
                metadata,
                [part["records"].encode() for part in parts],
            )
            commit.thread.join()
            if commit.exc_info is not None:
                raise commit.exc_info[1]
        except BaseException as error:
            self._announce({"ok": False, "error": f"{type(error).__name__}: {error}"})
            raise
        self._announce({"ok": True})

    def _announce(self, outcome: dict[str, Any]) -> None:
        for rank in range(1, self._channel.world_size):
            # The store gone (the job is ending): the others time out instead.
            with contextlib.suppress(RuntimeError):
                self._channel.post(self._keys.outcome(rank), outcome)


def merge_metadata(fragments: list[str], world_size: int) -> str:
    """The marker's content: every rank's manifest (each under its own ``<rank>/`` prefix).

    An incremental save's chain link is rank 0's, listing every rank's delta tensors (each
    rank's own link names only its own); links that disagree on where the checkpoint sits in
    its chain fail the commit: the ranks did not take the same decision.
    """
    parse_metadata_as_json_first()
    manifest: dict[str, Any] = {}
    version = ""
    links: list[ChainLink] = []
    for rank, fragment in enumerate(fragments):
        metadata = SnapshotMetadata.from_yaml(fragment)
        own = {path: entry for path, entry in metadata.manifest.items()}
        link_entry = own.pop(f"{rank}/{CHAIN_ENTRY}", None)
        if link_entry is not None:
            link = chain_link({CHAIN_ENTRY: link_entry})
            assert link is not None
            links.append(link)
        manifest.update(own)
        version = metadata.version
    if links:
        first = links[0]
        if len(links) != len(fragments) or any(
            (link.parent, link.depth, link.written_bytes)
            != (first.parent, first.depth, first.written_bytes)
            for link in links
        ):
            raise RankSaveError(
                "the ranks disagree on the checkpoint's place in its chain "
                f"({[(link.parent, link.depth) for link in links]}); nothing was committed"
            )
        tensors = tuple(tensor for link in links for tensor in link.tensors)
        manifest[f"0/{CHAIN_ENTRY}"] = dataclasses.replace(first, tensors=tensors).entry()
    return SnapshotMetadata(version=version, world_size=world_size, manifest=manifest).to_yaml()


def agree_on_chain(channel: RankChannel, keys: SaveKeys) -> Callable[[ChainVote], ChainVote]:
    """The vote of an incremental save, gathered from every rank through the store (in the
    training thread, during ``save()``: one small message per rank, no collective)."""

    def agree(own: ChainVote) -> ChainVote:
        channel.post(keys.vote(channel.rank), dataclasses.asdict(own))
        votes = channel.receive(
            {rank: keys.vote(rank) for rank in range(channel.world_size)},
            f"the other ranks' incremental decision for {keys.path}",
            delete=False,  # every rank reads every vote; each removes its own next time
        )
        return ChainVote.total([ChainVote(**vote) for vote in votes])

    return agree
