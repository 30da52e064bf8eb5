"""The one place that turns a path or URL into an fsspec filesystem, and joins URLs.

Every path the library hands back keeps the caller's spelling: ``s3://bucket/run/100`` stays
an S3 URL and a plain local path stays plain. So paths are built by joining onto the URL the
caller gave, never from what a filesystem's ``ls`` returns (s3fs drops the scheme there).

Object stores end every request in bounded time (issue 8): left to their defaults, s3fs and
botocore retry inside each other (5 x 5 attempts) and botocore's ``Expect: 100-continue`` makes
aiohttp wait for a frozen endpoint's answer with no timeout at all, so a frozen endpoint hung a
save for minutes. :func:`resolve` gives every ``s3://`` filesystem :data:`S3_CONFIG_DEFAULTS`
(overridable per key by ``storage_options["config_kwargs"]``) and turns s3fs's own retry loop
off, so botocore's standard retries are the one retry layer; :func:`put_bytes` gives every
whole-object write a deadline. Nothing here ever creates a bucket: object stores need no
directories (:func:`ensure_parent`), and s3fs's ``makedirs`` would create the bucket.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.asyn import AsyncFileSystem, sync
from fsspec.exceptions import FSTimeoutError
from fsspec.implementations.local import LocalFileSystem

from ..errors import InvalidStorageUrlError, StorageLocationNotFoundError, UnsupportedProtocolError

StorageOptions = dict[str, Any]

#: What every ``s3://`` filesystem is given as botocore ``Config`` unless
#: ``storage_options["config_kwargs"]`` sets the same key: a connection is given up after 5 s,
#: a socket read that brings nothing after 8 s (per read, so a long transfer that keeps
#: moving is never cut), and a request is tried 3 times in all with botocore's "standard"
#: jittered backoff (connection errors, timeouts, throttling, 5xx). A refused endpoint then
#: fails in about 3 s, an unreachable one in about 15 s, a frozen one in about 25 s. When
#: ``AWS_MAX_ATTEMPTS`` or ``AWS_RETRY_MODE`` is set, ``retries`` is left to botocore (it reads
#: them). s3fs's own retry loop (5 attempts around botocore's) is set to a single attempt.
S3_CONFIG_DEFAULTS: dict[str, Any] = {
    "connect_timeout": 5,
    "read_timeout": 8,
    "retries": {"mode": "standard", "total_max_attempts": 3},
}

#: The slowest upload a write request may make before :func:`put_bytes` gives up on it
#: (bytes/s, on top of ``attempts x read_timeout``): no timeout of aiohttp's runs while a
#: request body is being sent or a ``100 Continue`` awaited, so a frozen endpoint would hold
#: an upload forever. With :data:`UPLOAD_PART_SIZE` parts a stalled request fails within
#: 24 s + 8 s with the defaults, whatever the object's size.
MIN_UPLOAD_RATE = 1024 * 1024
#: Objects larger than this go to S3 as multipart uploads of parts this size ...
UPLOAD_PART_SIZE = 8 * 1024 * 1024
#: ... this many at a time (one S3 connection carries ~tens of MB/s; boto3 and s3fs use 10).
UPLOAD_CONCURRENCY = 8

#: Protocols of object stores: no directories, a bucket (or container) first in the path.
#: The one list of them: what is an object store, and what another process reaches too.
OBJECT_STORE_PROTOCOLS = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss", "adl"})
#: Protocols of the local disk.
LOCAL_PROTOCOLS = frozenset({"file", "local"})
_S3_PROTOCOLS = frozenset({"s3", "s3a"})
# Storage options that this library reads itself (the storage plugin's ``tml_verify_reads``):
# never handed to a backend's constructor, which would refuse them.
_LIBRARY_OPTION_PREFIX = "tml_"


def infer_fs(path: str, storage_options: StorageOptions | None = None) -> AbstractFileSystem:
    """Return the fsspec filesystem for ``path`` (local, ``memory://``, ``s3://``, ...).

    ``storage_options`` go to the filesystem's constructor (for s3fs: ``endpoint_url``,
    ``key``, ``secret``, ``profile``, ...); without them the backend's defaults and the
    standard environment variables (``AWS_ENDPOINT_URL``, ...) apply.
    """
    fs, _ = resolve(path, storage_options)
    return fs


def resolve(
    path: str, storage_options: StorageOptions | None = None
) -> tuple[AbstractFileSystem, str]:
    """Return ``(filesystem, path as that filesystem spells it)``.

    ``s3://`` filesystems get :data:`S3_CONFIG_DEFAULTS`; an object-store URL without a
    bucket (``s3://``, ``s3:///run``) raises :class:`InvalidStorageUrlError`.
    """
    if not isinstance(path, str) or not path:
        raise UnsupportedProtocolError(f"expected a non-empty path or URL string, got {path!r}")
    protocol = path.split("://", 1)[0] if "://" in path else "file"
    options = backend_options(protocol, storage_options)
    try:
        fs, fs_path = fsspec.core.url_to_fs(path, **options)
    except ValueError as error:
        if "Protocol not known" in str(error):
            raise UnsupportedProtocolError(
                f"unknown storage protocol {protocol!r} in {path!r}: fsspec has no "
                f"implementation for it (known: {', '.join(sorted(known_protocols()))})"
            ) from error
        raise
    except ImportError as error:
        raise UnsupportedProtocolError(
            f"protocol {protocol!r} in {path!r} needs a package that is not installed: "
            f"{error}. Install it (for gs:// that is `pip install gcsfs`)."
        ) from error
    if is_object_store(fs):
        bucket = fs_path.split("/", 1)[0]
        if not bucket.strip():
            raise InvalidStorageUrlError(
                f"{path!r} names no bucket: an object-store URL is "
                f"{protocol}://<bucket>/<path>, e.g. {protocol}://my-bucket/runs/exp1"
            )
    if protocol in _S3_PROTOCOLS and hasattr(fs, "retries"):
        fs.retries = 1  # botocore retries (S3_CONFIG_DEFAULTS); s3fs's loop would multiply them
    return fs, fs_path


def backend_options(protocol: str, storage_options: StorageOptions | None) -> StorageOptions:
    """What the backend's constructor gets: the caller's options less the library's own
    (``tml_*``), with :data:`S3_CONFIG_DEFAULTS` under ``config_kwargs`` for ``s3://``."""
    options = {
        key: value
        for key, value in (storage_options or {}).items()
        if not key.startswith(_LIBRARY_OPTION_PREFIX)
    }
    if protocol in _S3_PROTOCOLS:
        defaults = dict(S3_CONFIG_DEFAULTS)
        if os.environ.get("AWS_MAX_ATTEMPTS") or os.environ.get("AWS_RETRY_MODE"):
            del defaults["retries"]
        options["config_kwargs"] = {**defaults, **(options.get("config_kwargs") or {})}
    return options


def known_protocols() -> set[str]:
    """Protocols fsspec knows how to open (installed or not)."""
    return set(fsspec.available_protocols())


def is_local(fs: AbstractFileSystem) -> bool:
    """Local disk is the one backend where rename and fsync exist and matter."""
    return isinstance(fs, LocalFileSystem)


def is_object_store(fs: AbstractFileSystem) -> bool:
    """S3, GCS, Azure: buckets, no directories, one PUT per object."""
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return not OBJECT_STORE_PROTOCOLS.isdisjoint(protocols)


def reached_by_any_process(fs: AbstractFileSystem) -> bool:
    """Whether another process reaches the same files with the same URL and options.

    Local disk and object stores do; ``memory://`` is per process, and schemes registered at
    runtime (like the tests' ``faulty://``) are unknown in a fresh interpreter.
    """
    protocols = (fs.protocol,) if isinstance(fs.protocol, str) else tuple(fs.protocol)
    return not (LOCAL_PROTOCOLS | OBJECT_STORE_PROTOCOLS).isdisjoint(protocols)


def ensure_parent(fs: AbstractFileSystem, path: str) -> None:
    """Make ``path``'s parent directory exist where directories exist.

    Object stores have none (a key's "directories" are only a prefix), and s3fs's
    ``makedirs`` would *create the bucket* when it is missing: a typo in a bucket name must
    fail, not create a bucket. So on object stores this does nothing.
    """
    if is_object_store(fs):
        return
    parent = path.rsplit("/", 1)[0]
    if parent and parent != path:
        fs.makedirs(parent, exist_ok=True)


def put_bytes(fs: AbstractFileSystem, path: str, data: bytes, **kwargs: Any) -> Any:
    """Store ``data`` as the whole object ``path``, ending in bounded time.

    ``kwargs`` go to ``pipe_file`` (``mode="create"``, s3fs's ``IfMatch=etag``); returns what
    the backend returns (s3fs: the PUT's response, with its ``ETag``). On object stores every
    request has a deadline of ``attempts x read_timeout + its body / MIN_UPLOAD_RATE`` (a
    frozen endpoint otherwise holds an upload forever: no aiohttp timeout runs while a body is
    sent or a ``100 Continue`` awaited); past it the request is cancelled and
    ``TimeoutError`` raised. On S3, objects over :data:`UPLOAD_PART_SIZE` go up as a multipart
    upload of parts that size, :data:`UPLOAD_CONCURRENCY` at a time, so that the deadline of a
    stalled request stays short however large the object. A missing bucket raises
    :class:`StorageLocationNotFoundError` (it is never created).
    """
    try:
        if not (isinstance(fs, AsyncFileSystem) and is_object_store(fs)):
            return fs.pipe_file(path, data, **kwargs)
        if len(data) > UPLOAD_PART_SIZE and hasattr(fs, "_call_s3") and not kwargs:
            return sync(fs.loop, _put_in_parts, fs, path, data)
        deadline = write_deadline_s(fs, len(data))
        try:
            return fs.pipe_file(path, data, timeout=deadline, **kwargs)  # sync() cancels it
        except FSTimeoutError as error:
            raise _stalled(path, f"a PUT of {len(data)} bytes", deadline) from error
    except FSTimeoutError as error:  # from _put_in_parts, whose message says which request
        raise TimeoutError(str(error.__cause__ or error)) from error.__cause__
    except FileNotFoundError as error:
        if storage_error_code(error) == "NoSuchBucket":
            raise missing_location(fs, path) from error
        raise


def _stalled(path: str, request: str, deadline: float) -> TimeoutError:
    return TimeoutError(
        f"writing {path} stalled: {request} got no answer within {deadline:.0f}s (the "
        "endpoint accepts connections but does not respond)"
    )


async def _put_in_parts(fs: Any, path: str, data: bytes) -> Any:
    """A multipart upload whose every request has its own deadline; aborted on failure."""
    bucket, key, _ = fs.split_path(path)

    async def call(method: str, size: int = 0, **kwargs: Any) -> Any:
        deadline = write_deadline_s(fs, size)
        try:
            return await asyncio.wait_for(
                fs._call_s3(method, Bucket=bucket, Key=key, **kwargs), deadline
            )
        except TimeoutError as error:
            raise _stalled(path, f"{method} ({size} bytes)", deadline) from error

    upload = (await call("create_multipart_upload"))["UploadId"]
    slots = asyncio.Semaphore(UPLOAD_CONCURRENCY)

    async def put_part(number: int, start: int) -> dict[str, Any]:
        async with slots:
            body = data[start : start + UPLOAD_PART_SIZE]  # sliced here: a window's worth
            out = await call(
                "upload_part", len(body), UploadId=upload, PartNumber=number, Body=body
            )
            return {"PartNumber": number, "ETag": out["ETag"]}

    try:
        # A TaskGroup: the first part that fails (or stalls past its deadline) cancels the rest.
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [
                    group.create_task(put_part(number, start))
                    for number, start in enumerate(range(0, len(data), UPLOAD_PART_SIZE), start=1)
                ]
        except BaseExceptionGroup as failed:  # the first error, as a sequential upload says it
            raise failed.exceptions[0] from None
        parts = [task.result() for task in tasks]
        result = await call(
            "complete_multipart_upload", UploadId=upload, MultipartUpload={"Parts": parts}
        )
    except BaseException:
        # Aborted in the background: against a frozen endpoint the abort would wait its own
        # deadline before the error could be reported.
        task = asyncio.ensure_future(_abort_upload(fs, bucket, key, upload))
        _BACKGROUND.add(task)
        task.add_done_callback(_BACKGROUND.discard)
        raise
    fs.invalidate_cache(path)
    return result


_BACKGROUND: set[asyncio.Future[None]] = set()  # keeps background aborts referenced


async def _abort_upload(fs: Any, bucket: str, key: str, upload: str) -> None:
    """Best effort (a lifecycle rule on the bucket reaps what is left of a failed upload)."""
    with contextlib.suppress(Exception):
        await asyncio.wait_for(
            fs._call_s3("abort_multipart_upload", Bucket=bucket, Key=key, UploadId=upload),
            write_deadline_s(fs, 0),
        )


def write_deadline_s(fs: AbstractFileSystem, size: int) -> float:
    """How long one write request carrying ``size`` bytes may take (see :func:`put_bytes`)."""
    config = getattr(fs, "config_kwargs", None) or {}
    read_timeout = float(config.get("read_timeout", S3_CONFIG_DEFAULTS["read_timeout"]))
    retries = config.get("retries") or {}
    if "total_max_attempts" in retries:
        attempts = int(retries["total_max_attempts"])
    elif "max_attempts" in retries:  # botocore counts retries there, not attempts
        attempts = int(retries["max_attempts"]) + 1
    else:
        attempts = int(os.environ.get("AWS_MAX_ATTEMPTS") or 3)
    return max(1, attempts) * read_timeout + size / MIN_UPLOAD_RATE


def storage_error_code(error: BaseException) -> str | None:
    """The S3 error code (``NoSuchBucket``, ``PreconditionFailed``, ...) behind ``error``.

    s3fs turns botocore's ``ClientError`` into ``OSError``/``FileNotFoundError``, keeping the
    original as ``__cause__``; the code says which of several "not found"s it was.
    """
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        response = getattr(current, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
        current = current.__cause__ or current.__context__
    return None


def require_bucket(fs: AbstractFileSystem, path: str) -> None:
    """Raise :class:`StorageLocationNotFoundError` when ``path``'s bucket does not exist.

    For telling "no such bucket" from "no such directory" once a path was found missing (one
    HEAD request); a no-op on anything but S3. Other faults (refused, denied) propagate.
    """
    if not (is_object_store(fs) and hasattr(fs, "call_s3")):
        return
    bucket = path.lstrip("/").split("/", 1)[0]
    try:
        fs.call_s3("head_bucket", Bucket=bucket)
    except FileNotFoundError as error:
        raise missing_location(fs, path) from error


def missing_location(fs: AbstractFileSystem, path: str) -> StorageLocationNotFoundError:
    """The error for a bucket that does not exist (this library never creates one)."""
    bucket = path.lstrip("/").split("/", 1)[0]
    scheme = fs.protocol if isinstance(fs.protocol, str) else fs.protocol[0]
    return StorageLocationNotFoundError(
        f"bucket {bucket!r} does not exist ({scheme}://{bucket}); checkpoints never create "
        f"buckets: create it (e.g. `aws s3 mb {scheme}://{bucket}`) or fix the URL"
    )


def join_url(base: str, *parts: str) -> str:
    """Join path components onto a URL or local path, keeping its scheme."""
    joined = base.rstrip("/") if base.rstrip("/") else base
    for part in parts:
        part = part.strip("/")
        if part:
            joined = f"{joined}/{part}" if not joined.endswith("/") else f"{joined}{part}"
    return joined


def parent_url(path: str) -> str:
    """The URL or path one level up (``s3://b/run/100`` -> ``s3://b/run``)."""
    stripped = path.rstrip("/")
    return stripped.rsplit("/", 1)[0] if "/" in stripped else "."


def basename(path: str) -> str:
    """Last component of a URL or path; a trailing slash is ignored."""
    return path.rstrip("/").rsplit("/", 1)[-1]


def fsync_directory(path: str) -> None:
    """Make a local directory's entries (new files, renames, removals) durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def replace_file(fs: AbstractFileSystem, path: str, data: bytes) -> None:
    """Write ``path`` whole or not at all, so a reader (or a crash) never sees half a file.

    Local disk: a fsynced temporary file renamed over ``path``, then the directory fsynced.
    Object stores and memory: one PUT, which is atomic already (bounded: :func:`put_bytes`).
    """
    parent = path.rsplit("/", 1)[0]
    if not is_local(fs):
        ensure_parent(fs, path)
        put_bytes(fs, path, data)
        return
    os.makedirs(parent, exist_ok=True)
    temporary = write_temporary(f"{path}.{uuid.uuid4().hex}.tmp", data)
    try:
        os.replace(temporary, path)
    except BaseException:
        discard(temporary)
        raise
    fsync_directory(parent)


def write_temporary(temporary: str, data: bytes) -> str:
    """Write ``data`` to the local file ``temporary``, fsynced; return its path.

    A write that fails (a full disk, a kill of the thread) removes the file again before the
    error propagates: a failed replace must not leave ``<name>.<hex>.tmp`` files behind,
    one per attempt, on a disk that is already full.
    """
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
    except BaseException:
        discard(temporary)
        raise
    return temporary


def discard(path: str) -> None:
    """Remove a local file if it is there (cleanup after a failure: never raises)."""
    with contextlib.suppress(OSError):
        os.unlink(path)


def invalidate_listing(fs: AbstractFileSystem, path: str) -> None:
    """Forget cached listings so that another process's new files become visible.

    s3fs caches directory listings per filesystem instance; a poller that never
    invalidates would never see a checkpoint written by the trainer. ``invalidate_cache``
    drops only ``path`` and its parents, but ``find`` also caches every directory *below*
    it: a stale ``<step>/batched`` listing from before a checkpoint was rewritten made a
    freshly committed file look missing. So the whole subtree is dropped too.
    """
    fs.invalidate_cache(path)
    cache = getattr(fs, "dircache", None)
    if cache:
        root = fs._strip_protocol(path).rstrip("/")
        for key in [k for k in list(cache) if k == root or k.startswith(f"{root}/")]:
            cache.pop(key, None)


def find_tree(fs: AbstractFileSystem, root: str, *, withdirs: bool = False) -> dict[str, Any]:
    """``fs.find(root, detail=True)``, but a directory that cannot be listed raises.

    fsspec's generic ``find`` walks with ``on_error="omit"``: a listing that fails (permission
    denied, a reset connection) silently drops that directory, and "could not look" turns
    into "nothing there". (Object stores list with their own ``find``, which raises.) A
    missing ``root`` gives ``{}``; a subdirectory removed during the walk (a concurrent prune)
    makes it walk again.
    """
    options: dict[str, Any] = {"detail": True, "withdirs": withdirs}
    if type(fs).find is AbstractFileSystem.find:
        options["on_error"] = "raise"
    for _ in range(3):
        try:
            found: dict[str, Any] = fs.find(root, **options)
            return found
        except FileNotFoundError:
            if not fs.exists(root):
                return {}
            invalidate_listing(fs, root)
    found = fs.find(root, **options)
    return found


def mtime_of(info: dict[str, Any]) -> float | None:
    """Modification time (epoch seconds) from an fsspec ``info`` dict of any backend."""
    for key in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(key)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None
