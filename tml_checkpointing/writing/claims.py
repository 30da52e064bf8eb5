"""Save claims: a save in flight is visible on storage, so cleanup never races it.

Why: an uncommitted ``<step>`` directory is either a crashed writer's leftovers or a save being
written right now, and an age threshold alone cannot tell them apart (a 512 MB save is "0.3 s
old" for its whole first second). So :meth:`Snapshot.save` writes ``<step>/.writing`` naming
its process before any data, and the commit removes it after the marker. Cleanup leaves a
claimed directory alone while its claimant's process still runs. A claim from another host
cannot be checked that way; there the age threshold of ``clean-incomplete`` decides, as for an
unclaimed directory. Either way the storage plugin refuses to commit when files it wrote are
gone, so no cleanup (an old version, another host, ``rm -r``) can produce a committed
checkpoint with missing data: the save fails instead.
"""

from __future__ import annotations

import json
import os
import socket
import time
import uuid
from dataclasses import asdict, dataclass

from ..format.layout import SAVE_CLAIM, claim_temporary_name
from ..storage.faults import reading, writing
from ..storage.filesystem import (
    StorageOptions,
    discard,
    fsync_directory,
    is_local,
    join_url,
    replace_file,
    resolve,
    write_temporary,
)


@dataclass(frozen=True)
class SaveClaim:
    """Who is writing a checkpoint, and since when."""

    host: str
    pid: int
    started_at: float

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host}, started {time.time() - self.started_at:.0f}s ago"

    def process_alive(self) -> bool | None:
        """Whether the claimant runs: ``None`` when it is on another host (cannot tell)."""
        if self.host != socket.gethostname():
            return None
        try:
            os.kill(self.pid, 0)
        except ProcessLookupError:
            return False
        except PermissionError:
            return True
        return True


def write_claim(checkpoint: str, storage_options: StorageOptions | None = None) -> None:
    """Claim ``checkpoint`` for the calling process (before any of its data is written).

    The claim lands whole, in one step, in a directory that holds nothing before it: on local
    disk its bytes go to a temporary file in the save_dir
    (:func:`~tml_checkpointing.format.layout.claim_temporary_name`), which is renamed into
    ``<step>/.writing``; on object stores it is one PUT. A temporary file *inside* the step
    directory made the directory a cleanup candidate (uncommitted, unclaimed, 0 s old) in
    the moment between the write and the rename, and ``clean_incomplete(older_than=0)``
    removed it there; an empty directory has no age and is never one.
    """
    claim = SaveClaim(host=socket.gethostname(), pid=os.getpid(), started_at=time.time())
    data = json.dumps(asdict(claim)).encode()
    fs, path = resolve(join_url(checkpoint, SAVE_CLAIM), storage_options)
    with writing(f"the save claim of {checkpoint}"):
        if not is_local(fs):
            replace_file(fs, path, data)  # one PUT: atomic, and nothing else is there
            return
        step_dir = os.path.dirname(path)
        save_dir = os.path.dirname(step_dir) or "."
        os.makedirs(step_dir, exist_ok=True)
        name = claim_temporary_name(os.path.basename(step_dir), uuid.uuid4().hex)
        temporary = write_temporary(os.path.join(save_dir, name), data)
        try:
            os.replace(temporary, path)
        except BaseException:
            discard(temporary)
            raise
        fsync_directory(step_dir)
        fsync_directory(save_dir)


def read_claim(checkpoint: str, storage_options: StorageOptions | None = None) -> SaveClaim | None:
    """The claim on ``checkpoint``; ``None`` when there is none.

    A claim that does not parse (torn by a crash) counts as a dead claimant's.
    """
    fs, path = resolve(join_url(checkpoint, SAVE_CLAIM), storage_options)
    with reading(f"the save claim of {checkpoint}"):
        try:
            raw = fs.cat_file(path)
        except FileNotFoundError:
            return None
    try:
        body = json.loads(raw)
        return SaveClaim(
            host=str(body["host"]), pid=int(body["pid"]), started_at=float(body["started_at"])
        )
    except (ValueError, KeyError, TypeError):
        return SaveClaim(host="", pid=-1, started_at=0.0)
