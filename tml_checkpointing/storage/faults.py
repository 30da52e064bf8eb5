"""Naming storage faults: a failure to read or write is not corruption.

Why: a checkpoint whose sidecar could not be *read* (permission denied, connection reset, a
timeout) is not a corrupt checkpoint, and treating it as one moves good work aside. Every place
that reads or writes storage wraps the call in :func:`reading` or :func:`writing`, which turn
the backend's own exceptions (``OSError``, botocore's and aiohttp's, timeouts) into
:class:`~tml_checkpointing.errors.CheckpointReadError` /
:class:`~tml_checkpointing.errors.CheckpointWriteError`, naming what was being done. Errors the
library raises on purpose (any :class:`CheckpointError`) and ``FileNotFoundError`` (absence is
an answer, not a fault) pass through unchanged.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from contextlib import contextmanager

from ..errors import CheckpointError, CheckpointReadError, CheckpointWriteError

# Exception families of the storage backends, by module prefix: they do not derive from
# OSError (botocore's EndpointConnectionError, ReadTimeoutError; aiohttp's ClientError).
_BACKEND_MODULES = ("botocore", "aiobotocore", "aiohttp", "urllib3", "s3fs", "gcsfs", "fsspec")


def is_storage_fault(error: BaseException) -> bool:
    """Whether ``error`` says the storage could not be reached or refused the operation."""
    if isinstance(error, CheckpointError):
        return False
    if isinstance(error, OSError | TimeoutError | asyncio.TimeoutError | ConnectionError):
        return True
    for klass in type(error).__mro__:
        if klass.__module__.split(".", 1)[0] in _BACKEND_MODULES and issubclass(klass, Exception):
            return True
    return False


def describe(error: BaseException) -> str:
    """``ExceptionType: message`` of the deepest storage error (the useful one)."""
    return f"{type(error).__name__}: {error}"


@contextmanager
def reading(what: str) -> Iterator[None]:
    """Around a read of storage: a fault becomes :class:`CheckpointReadError` naming ``what``."""
    try:
        yield
    except (CheckpointError, FileNotFoundError):
        raise
    except BaseException as error:
        if not is_storage_fault(error):
            raise
        raise CheckpointReadError(
            f"could not read {what}: {describe(error)}. This is a storage error, not "
            "corruption: nothing was skipped, moved or deleted; fix access and retry."
        ) from error


@contextmanager
def writing(what: str) -> Iterator[None]:
    """Around a write to storage: a fault becomes :class:`CheckpointWriteError`."""
    try:
        yield
    except CheckpointError:
        raise
    except BaseException as error:
        if not is_storage_fault(error):
            raise
        raise CheckpointWriteError(f"could not write {what}: {describe(error)}") from error
