"""The one place that turns a path or URL into an fsspec filesystem, and joins URLs.

Every path the library hands back keeps the caller's spelling: ``s3://bucket/run/100`` stays
an S3 URL and a plain local path stays plain. So paths are built by joining onto the URL the
caller gave, never from what a filesystem's ``ls`` returns (s3fs drops the scheme there).
"""

from __future__ import annotations

import os
import uuid
from typing import Any

import fsspec
from fsspec import AbstractFileSystem
from fsspec.implementations.local import LocalFileSystem

from .errors import UnsupportedProtocolError

StorageOptions = dict[str, Any]


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
    """Return ``(filesystem, path as that filesystem spells it)``."""
    if not isinstance(path, str) or not path:
        raise UnsupportedProtocolError(f"expected a non-empty path or URL string, got {path!r}")
    protocol = path.split("://", 1)[0] if "://" in path else "file"
    try:
        return fsspec.core.url_to_fs(path, **(storage_options or {}))
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


def known_protocols() -> set[str]:
    """Protocols fsspec knows how to open (installed or not)."""
    return set(fsspec.available_protocols())


def is_local(fs: AbstractFileSystem) -> bool:
    """Local disk is the one backend where rename and fsync exist and matter."""
    return isinstance(fs, LocalFileSystem)


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
    Object stores and memory: one PUT, which is atomic already.
    """
    parent = path.rsplit("/", 1)[0]
    fs.makedirs(parent, exist_ok=True)
    if not is_local(fs):
        fs.pipe_file(path, data)
        return
    temporary = f"{path}.{uuid.uuid4().hex}.tmp"
    with open(temporary, "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)
    fsync_directory(parent)


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
