"""One writer per ``save_dir``: a lock file that works on local disk and on object stores.

Two training runs writing the same ``save_dir`` would interleave checkpoints and retention;
the second one must be refused with a clear error instead. ``<save_dir>/.writer.lock`` is
created with an exclusive create (``O_EXCL`` on disk, a conditional ``If-None-Match: *`` PUT on
S3), names its holder, and is refreshed by a heartbeat thread while held. A lock left by a
writer that died is taken over: at once when the holder was on this host and its process is
gone (SIGKILL, OOM), otherwise once its heartbeat is older than ``ttl_seconds``.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from types import TracebackType

from .errors import SaveDirLockedError
from .filesystem import StorageOptions, is_local, join_url, replace_file, resolve

logger = logging.getLogger(__name__)

LOCK_NAME = ".writer.lock"


@dataclass(frozen=True)
class LockHolder:
    token: str
    owner: str
    host: str
    pid: int
    acquired_at: float
    heartbeat_at: float

    def describe(self) -> str:
        since = time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(self.acquired_at))
        return f"{self.owner or 'a writer'} (pid {self.pid} on {self.host}, since {since} UTC)"


class WriterLock:
    """Exclusive right to write checkpoints into ``save_dir``; a context manager."""

    def __init__(
        self,
        save_dir: str,
        *,
        owner: str = "",
        ttl_seconds: float = 120,
        storage_options: StorageOptions | None = None,
    ) -> None:
        self.save_dir = save_dir
        self.path = join_url(save_dir, LOCK_NAME)
        self.owner = owner
        self.ttl_seconds = ttl_seconds
        self._fs, self._fs_path = resolve(self.path, storage_options)
        self._token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    def _record(self, acquired_at: float) -> bytes:
        holder = LockHolder(
            token=self._token,
            owner=self.owner,
            host=socket.gethostname(),
            pid=os.getpid(),
            acquired_at=acquired_at,
            heartbeat_at=time.time(),
        )
        return json.dumps(asdict(holder)).encode()

    def holder(self) -> LockHolder | None:
        try:
            return LockHolder(**json.loads(self._fs.cat_file(self._fs_path)))
        except FileNotFoundError:
            return None
        except (ValueError, TypeError):  # torn or foreign file: treat as a dead holder
            return LockHolder("", "unreadable lock", "", -1, 0.0, 0.0)

    def _is_stale(self, holder: LockHolder) -> bool:
        if holder.host == socket.gethostname() and holder.pid > 0:
            try:
                os.kill(holder.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
            return False
        return time.time() - holder.heartbeat_at > self.ttl_seconds

    def acquire(self) -> None:
        """Take the lock, or raise :class:`SaveDirLockedError` naming the live holder."""
        self._acquired_at = time.time()
        for _ in range(3):
            if self._create_exclusive(self._record(self._acquired_at)):
                self._start_heartbeat()
                return
            holder = self.holder()
            if holder is None:
                continue  # released in between: try again
            if not self._is_stale(holder):
                raise SaveDirLockedError(
                    f"{self.save_dir} is being written by {holder.describe()}; refusing to "
                    "write into it at the same time. Wait for that run to finish, or use "
                    f"another save_dir. (If it is dead, delete {self.path}.)"
                )
            logger.warning(
                "Taking over the stale lock of %s on %s.", holder.describe(), self.save_dir
            )
            self._fs.rm_file(self._fs_path)
        raise SaveDirLockedError(f"could not acquire {self.path}: it keeps changing hands")

    def _create_exclusive(self, data: bytes) -> bool:
        self._fs.makedirs(self._fs_path.rsplit("/", 1)[0], exist_ok=True)
        try:
            if is_local(self._fs):
                with open(self._fs_path, "xb") as handle:
                    handle.write(data)
            else:
                self._fs.pipe_file(self._fs_path, data, mode="create")
        except FileExistsError:
            return False
        return True

    def _start_heartbeat(self) -> None:
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="tml-writer-lock", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_seconds / 4):
            holder = self.holder()
            if holder is None or holder.token != self._token:
                logger.error("Lost the writer lock on %s to %s.", self.save_dir, holder)
                return
            # Replaced whole: a reader must never see a torn record and take it for a dead
            # holder's lock.
            replace_file(self._fs, self._fs_path, self._record(self._acquired_at))

    def release(self) -> None:
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        holder = self.holder()
        if holder is not None and holder.token == self._token:
            self._fs.rm_file(self._fs_path)

    def __enter__(self) -> WriterLock:
        self.acquire()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        self.release()
