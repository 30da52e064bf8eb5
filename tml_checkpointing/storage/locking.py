"""One writer per ``save_dir``: a lock that can be held once, on local disk and on object stores.

Two training runs writing the same ``save_dir`` would interleave checkpoints and retention;
the second one must be refused with a clear error instead. ``<save_dir>/.writer.lock`` holds a
JSON record naming its holder (token, owner, host, pid, times), always written whole.

The protocol is the same on every backend; only its compare-and-swap differs:

* **acquire**: create the record only if no lock exists (complete-or-nothing). If one exists,
  read it together with its *version*. A live holder is refused (:class:`SaveDirLockedError`);
  a stale one is taken over by *compare-and-swap*: the record is replaced only if it is still
  the version read. Of any number of contenders that saw the same stale record exactly one
  swap succeeds; the others read again and find a live holder. Never delete-then-create: two
  contenders could both delete "the stale lock" (the second deleting the first's new one)
  and both create.
* **stale**: the holder's heartbeat is older than ``ttl_seconds``, or it ran on this host and
  its process is gone (SIGKILL, OOM: taken over at once). A record that does not parse (a
  foreign file) counts as a holder whose heartbeat is the file's modification time, so it is
  not mistaken for a dead one while it may still be being written.
* **heartbeat**: every ``ttl_seconds / 4`` the holder swaps its own last version for a fresh
  record. A failed swap means someone took the lock over: the lock is *lost*.
* **lost**: :func:`assert_holding` (called by ``Snapshot.save`` and right before every commit
  marker) raises :class:`SaveDirLockedError`, so a holder that lost its lock stops writing
  and its run fails instead of interleaving with the new holder.
* **release**: delete the record only if it is still this holder's version.

Compare-and-swap per backend:

* **S3** (s3fs): create is a PUT with ``If-None-Match: *``; a swap is a PUT with
  ``If-Match: <ETag read>``; release is a DELETE with ``If-Match`` (compare-then-delete where a
  store refuses conditional DELETEs). S3 evaluates the condition atomically with the write, so
  the store itself picks the one winner. This needs a store that honours conditional PUTs
  (AWS S3 since 2024, MinIO, moto's server); one that ignored them would make the last
  writer win.
* **Local disk** has no conditional write. A record is written to a temporary file and
  ``os.link``-ed to the lock name to create it (fails if the name exists: a reader never sees
  an empty or half-written lock) or ``os.replace``-d over it to swap. The compare and the swap
  happen while holding ``fcntl.flock`` on ``.writer.lock.guard``, a file that is never
  deleted: the guard is held for microseconds around a hand-over only, never for the run,
  and the kernel drops it when its process dies, so it can neither go stale nor need a
  take-over itself (on NFS, Linux maps it to a POSIX lock that the server arbitrates).
  Alternatives rejected: renaming the stale file to a private name and re-checking it is
  open to ABA (between two contenders' renames the name can already hold a fresh lock, which
  the second rename would steal and could not put back without clobbering a third); holding
  ``flock`` for the whole run needs the record and heartbeat anyway (for other hosts and for
  object stores) and would make local disk a second protocol.
* **memory:// and other filesystems**: the same compare-and-swap under a lock of this
  process, so atomic between the threads of one process only (memory:// is per process).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from types import TracebackType
from typing import Any

from fsspec import AbstractFileSystem
from fsspec.asyn import sync

from ..errors import CheckpointError, SaveDirLockedError
from ..format.layout import WRITER_LOCK, WRITER_LOCK_GUARD
from .faults import reading, writing
from .filesystem import (
    StorageOptions,
    discard,
    ensure_parent,
    fsync_directory,
    is_local,
    is_object_store,
    join_url,
    put_bytes,
    resolve,
    storage_error_code,
    write_temporary,
)

logger = logging.getLogger(__name__)

_ATTEMPTS = 5  # rounds of create / read / take over before giving up on a lock that churns
_LOST_RACE_CODES = frozenset({"PreconditionFailed", "ConditionalRequestConflict"})
_NO_CONDITIONAL_DELETE = frozenset({"NotImplemented", "InvalidArgument", "InvalidRequest"})


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


@dataclass(frozen=True)
class _Seen:
    """A lock record as read, with the version a compare-and-swap must match."""

    data: bytes
    version: Any  # S3: the ETag; elsewhere: the bytes themselves (every record is unique)
    modified: float  # the file's modification time (heartbeat of an unparsable record)


# -- compare-and-swap, per backend -----------------------------------------------------------


class _Store:
    """Where a lock record lives; every mutation is conditional on what is there."""

    def read(self) -> _Seen | None:
        raise NotImplementedError

    def create(self, data: bytes) -> Any | None:
        """Store ``data`` if no record exists; its version, or ``None`` when one exists."""
        raise NotImplementedError

    def swap(self, expected: Any, data: bytes) -> Any | None:
        """Replace the record if it is still ``expected``; the new version, or ``None``."""
        raise NotImplementedError

    def delete(self, expected: Any) -> bool:
        """Remove the record if it is still ``expected``."""
        raise NotImplementedError


class _LocalStore(_Store):
    """Local disk: temp file + link/replace, compared under an flock'd guard file."""

    def __init__(self, path: str, guard: str) -> None:
        self.path = path
        self.guard = guard
        self.directory = os.path.dirname(path) or "."

    @contextmanager
    def _guarded(self) -> Iterator[None]:
        os.makedirs(self.directory, exist_ok=True)
        descriptor = os.open(self.guard, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(descriptor, fcntl.LOCK_EX)  # released by close, or by death
            yield
        finally:
            os.close(descriptor)

    def read(self) -> _Seen | None:
        try:
            with open(self.path, "rb") as handle:
                data = handle.read()
                modified = os.fstat(handle.fileno()).st_mtime
        except FileNotFoundError:
            return None
        return _Seen(data, data, modified)

    def _temporary(self, data: bytes) -> str:
        os.makedirs(self.directory, exist_ok=True)
        return write_temporary(f"{self.path}.{uuid.uuid4().hex}.tmp", data)

    def create(self, data: bytes) -> Any | None:
        temporary = self._temporary(data)
        try:
            os.link(temporary, self.path)  # atomic, and fails if the name exists
        except FileExistsError:
            return None
        finally:
            os.unlink(temporary)
        fsync_directory(self.directory)
        return data

    def swap(self, expected: Any, data: bytes) -> Any | None:
        with self._guarded():
            current = self.read()
            if current is None or current.version != expected:
                return None
            temporary = self._temporary(data)
            try:
                os.replace(temporary, self.path)
            except BaseException:
                discard(temporary)
                raise
        fsync_directory(self.directory)
        return data

    def delete(self, expected: Any) -> bool:
        with self._guarded():
            current = self.read()
            if current is None or current.version != expected:
                return False
            os.unlink(self.path)
        fsync_directory(self.directory)
        return True


class _S3Store(_Store):
    """S3: conditional PUT/DELETE on the ETag; the store arbitrates."""

    def __init__(self, fs: AbstractFileSystem, path: str) -> None:
        self.fs: Any = fs
        self.path = path
        self.bucket, self.key, _ = fs.split_path(path)

    def read(self) -> _Seen | None:
        async def get() -> _Seen | None:
            try:
                response = await self.fs._call_s3("get_object", Bucket=self.bucket, Key=self.key)
            except FileNotFoundError:
                return None
            try:
                data = await response["Body"].read()
            finally:
                response["Body"].close()
            return _Seen(data, response["ETag"], response["LastModified"].timestamp())

        result: _Seen | None = sync(self.fs.loop, get)
        return result

    def _put(self, data: bytes, **condition: str) -> Any | None:
        try:
            response = put_bytes(self.fs, self.path, data, **condition)
        except FileExistsError:  # If-None-Match: the lock exists
            return None
        except FileNotFoundError as error:  # If-Match on a lock removed meanwhile
            if storage_error_code(error) == "NoSuchKey":
                return None
            raise
        except OSError as error:
            if storage_error_code(error) in _LOST_RACE_CODES:
                return None
            raise
        return response["ETag"]

    def create(self, data: bytes) -> Any | None:
        return self._put(data, mode="create")

    def swap(self, expected: Any, data: bytes) -> Any | None:
        return self._put(data, IfMatch=expected)

    def delete(self, expected: Any) -> bool:
        try:
            self.fs.call_s3("delete_object", Bucket=self.bucket, Key=self.key, IfMatch=expected)
        except FileNotFoundError:
            return False
        except OSError as error:
            code = storage_error_code(error)
            if code in _LOST_RACE_CODES:
                return False
            if code not in _NO_CONDITIONAL_DELETE:
                raise
            # A store without conditional DELETE: compare, then delete. A take-over landing
            # in between loses its record; its next save's check finds that and stops it.
            seen = self.read()
            if seen is None or seen.version != expected:
                return False
            self.fs.rm_file(self.path)
        finally:
            self.fs.invalidate_cache(self.path)
        return True


_PROCESS_GUARD = threading.Lock()


class _InProcessStore(_Store):
    """memory:// and other filesystems: compare-and-swap under this process's lock."""

    def __init__(self, fs: AbstractFileSystem, path: str) -> None:
        self.fs = fs
        self.path = path

    def read(self) -> _Seen | None:
        try:
            data = self.fs.cat_file(self.path)
        except FileNotFoundError:
            return None
        try:
            modified = self.fs.modified(self.path).timestamp()
        except (NotImplementedError, OSError, AttributeError):
            modified = 0.0
        return _Seen(data, data, modified)

    def create(self, data: bytes) -> Any | None:
        with _PROCESS_GUARD:
            if self.read() is not None:
                return None
            ensure_parent(self.fs, self.path)
            put_bytes(self.fs, self.path, data)
        return data

    def swap(self, expected: Any, data: bytes) -> Any | None:
        with _PROCESS_GUARD:
            current = self.read()
            if current is None or current.version != expected:
                return None
            put_bytes(self.fs, self.path, data)
        return data

    def delete(self, expected: Any) -> bool:
        with _PROCESS_GUARD:
            current = self.read()
            if current is None or current.version != expected:
                return False
            self.fs.rm_file(self.path)
        return True


def _store_for(fs: AbstractFileSystem, path: str) -> _Store:
    if is_local(fs):
        return _LocalStore(path, f"{path.rsplit('/', 1)[0]}/{WRITER_LOCK_GUARD}")
    if is_object_store(fs) and hasattr(fs, "_call_s3"):
        return _S3Store(fs, path)
    return _InProcessStore(fs, path)


# -- the lock ----------------------------------------------------------------------------------

# save_dir (as its filesystem spells it) -> the lock this process took on it. A lock stays
# here when lost, so that every later save into that save_dir keeps failing.
_HELD: dict[tuple[str, str], WriterLock] = {}
_HELD_GUARD = threading.Lock()


def _key(fs: AbstractFileSystem, save_dir_path: str) -> tuple[str, str]:
    protocol = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return protocol, save_dir_path.rstrip("/")


def assert_holding(save_dir: str, storage_options: StorageOptions | None = None) -> None:
    """Raise :class:`SaveDirLockedError` if this process took the writer lock on ``save_dir``
    and has lost it (taken over, or removed). No-op when it never took one.

    Reads the lock (one small read), so a loss is seen at once, not at the next heartbeat.
    """
    if not _HELD:
        return
    fs, path = resolve(save_dir, storage_options)
    with _HELD_GUARD:
        lock = _HELD.get(_key(fs, path))
    if lock is not None:
        lock.check()


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
        self.path = join_url(save_dir, WRITER_LOCK)
        self.owner = owner
        self.ttl_seconds = ttl_seconds
        self._fs, self._fs_path = resolve(self.path, storage_options)
        self._key = _key(self._fs, self._fs_path.rsplit("/", 1)[0])
        self._store = _store_for(self._fs, self._fs_path)
        self._token = uuid.uuid4().hex
        self._acquired_at = 0.0
        self._version: Any | None = None  # of the record this holder wrote last
        self._state = threading.Lock()  # heartbeat vs check vs release
        self._lost_to: LockHolder | None = None
        self._lost = False
        self._stop = threading.Event()
        self._heartbeat: threading.Thread | None = None

    # -- reading ---------------------------------------------------------------------------

    def holder(self) -> LockHolder | None:
        """Who holds the lock now (``None``: nobody)."""
        with reading(f"the writer lock {self.path}"):
            seen = self._store.read()
        return None if seen is None else _parse(seen)

    def _record(self) -> bytes:
        holder = LockHolder(
            token=self._token,
            owner=self.owner,
            host=socket.gethostname(),
            pid=os.getpid(),
            acquired_at=self._acquired_at,
            heartbeat_at=time.time(),
        )
        return json.dumps(asdict(holder)).encode()

    def _is_stale(self, holder: LockHolder) -> bool:
        if time.time() - holder.heartbeat_at > self.ttl_seconds:
            return True
        if holder.host == socket.gethostname() and holder.pid > 0:
            try:
                os.kill(holder.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                return False
        return False

    # -- taking, keeping, losing, giving back ----------------------------------------------

    def acquire(self) -> None:
        """Take the lock, or raise :class:`SaveDirLockedError` naming the live holder.

        A missing bucket raises :class:`StorageLocationNotFoundError` (it is never created);
        a storage fault raises :class:`CheckpointWriteError`.
        """
        self._acquired_at = time.time()
        with writing(f"the writer lock {self.path}"):
            ensure_parent(self._fs, self._fs_path)
            for _ in range(_ATTEMPTS):
                record = self._record()
                version = self._store.create(record)
                if version is not None:
                    return self._won(version)
                seen = self._store.read()
                if seen is None:
                    continue  # released in between: try to create again
                holder = _parse(seen)
                if not self._is_stale(holder):
                    raise SaveDirLockedError(
                        f"{self.save_dir} is being written by {holder.describe()}; refusing to "
                        "write into it at the same time. Wait for that run to finish, or use "
                        f"another save_dir. (If it is dead, delete {self.path}.)"
                    )
                version = self._store.swap(seen.version, record)
                if version is not None:
                    logger.warning(
                        "Took over the stale writer lock of %s on %s.",
                        holder.describe(),
                        self.save_dir,
                    )
                    return self._won(version)
                # Another contender changed the lock first: look at what it holds now.
        raise SaveDirLockedError(
            f"could not acquire {self.path}: it changed hands {_ATTEMPTS} times while trying; "
            "several writers are starting on this save_dir at once"
        )

    def _won(self, version: Any) -> None:
        with self._state:
            self._version = version
            self._lost = False
            self._lost_to = None
        with _HELD_GUARD:
            _HELD[self._key] = self
        self._stop.clear()
        self._heartbeat = threading.Thread(target=self._beat, name="tml-writer-lock", daemon=True)
        self._heartbeat.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.ttl_seconds / 4):
            try:
                self._refresh()
            except SaveDirLockedError as error:
                logger.error("%s", error)
                return
            except Exception as error:  # storage trouble: try again at the next beat
                logger.warning("Could not refresh the writer lock %s: %s", self.path, error)

    def _refresh(self) -> None:
        with self._state:
            if self._lost or self._stop.is_set():
                return
            with writing(f"the writer lock {self.path}"):
                version = self._store.swap(self._version, self._record())
            if version is None:
                self._lost = True
                try:  # only to name the new holder in the error
                    seen = self._store.read()
                    self._lost_to = None if seen is None else _parse(seen)
                except Exception:
                    self._lost_to = None
                raise self._lost_error()
            self._version = version

    def check(self) -> None:
        """Raise :class:`SaveDirLockedError` if this lock was taken over or removed."""
        with self._state:
            if not self._lost and self._version is not None:
                with writing(f"the writer lock {self.path}"):
                    seen = self._store.read()
                holder = None if seen is None else _parse(seen)
                if holder is None or holder.token != self._token:
                    self._lost, self._lost_to = True, holder
            if self._lost:
                raise self._lost_error()

    def _lost_error(self) -> SaveDirLockedError:
        now = "nobody holds it now"
        if self._lost_to is not None:
            now = f"now held by {self._lost_to.describe()}"
        return SaveDirLockedError(
            f"this run lost the writer lock on {self.save_dir} ({now}): another writer took it "
            "over (this run looked dead: no heartbeat for longer than its "
            f"{self.ttl_seconds:g}s TTL) or the lock was removed. Saving stopped so that two "
            "writers never interleave; restart the run once the other writer is done."
        )

    @property
    def lost(self) -> bool:
        """Whether this holder has found its lock taken over (or removed)."""
        return self._lost

    def release(self) -> None:
        """Stop the heartbeat and remove the lock if it is still this holder's.

        Never raises for storage trouble (it runs on the way out of a failing run too): a lock
        that could not be removed is logged and goes stale after ``ttl_seconds``.
        """
        self._stop.set()
        if self._heartbeat is not None:
            self._heartbeat.join()
            self._heartbeat = None
        with self._state:
            version, self._version = self._version, None
            lost = self._lost
        if not lost:
            with _HELD_GUARD:
                if _HELD.get(self._key) is self:
                    del _HELD[self._key]
        if version is None or lost:
            return
        try:
            with writing(f"the writer lock {self.path}"):
                self._store.delete(version)
        except CheckpointError as error:
            logger.warning("Could not remove %s (it will go stale): %s", self.path, error)

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


def _parse(seen: _Seen) -> LockHolder:
    try:
        body = json.loads(seen.data)
        return LockHolder(
            token=str(body["token"]),
            owner=str(body.get("owner", "")),
            host=str(body["host"]),
            pid=int(body["pid"]),
            acquired_at=float(body["acquired_at"]),
            heartbeat_at=float(body["heartbeat_at"]),
        )
    except (ValueError, TypeError, KeyError, AttributeError):
        # Not ours, or from an older version: a holder whose heartbeat is the file's time.
        return LockHolder("", "an unreadable lock", "", -1, seen.modified, seen.modified)
