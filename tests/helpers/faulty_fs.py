"""A local filesystem that fails on purpose: ``faulty:///path`` is ``/path`` with injected faults.

Real bytes on a real disk, reached through fsspec like any backend; only the operations a rule
names raise (a permission error on one sidecar, a connection reset while listing, a timeout
reading a shard). Tests are root here, so ``chmod 000`` cannot produce a permission error:
this can. A subprocess gets the same rules through ``TML_TEST_FAULTS`` (JSON) when it runs
``python -m tests.helpers.faulty_fs <module> <args...>``.

Rules: ``{"op": "read"|"write"|"list"|"stat"|"any", "glob": "*/21/.integrity.json",
"error": "PermissionError"|"ConnectionResetError"|"TimeoutError"|"ENOSPC", "times": N}``
(``times`` absent = every time).
"""

from __future__ import annotations

import errno
import fnmatch
import json
import os
import runpy
import sys
import threading
from dataclasses import dataclass
from typing import Any, ClassVar

import fsspec
from fsspec.implementations.local import LocalFileSystem

PROTOCOL = "faulty"
ENV = "TML_TEST_FAULTS"


@dataclass
class Fault:
    op: str
    glob: str
    error: str = "PermissionError"
    times: int | None = None
    hits: int = 0

    def matches(self, op: str, path: str) -> bool:
        if self.op not in (op, "any") or not fnmatch.fnmatch(path, self.glob):
            return False
        return self.times is None or self.hits < self.times

    def raise_it(self, path: str) -> None:
        self.hits += 1
        if self.error == "ENOSPC":
            raise OSError(errno.ENOSPC, "No space left on device (injected)", path)
        kind: type[BaseException] = {
            "PermissionError": PermissionError,
            "ConnectionResetError": ConnectionResetError,
            "TimeoutError": TimeoutError,
        }[self.error]
        raise kind(f"injected {self.error} on {path}")


class FaultyFileSystem(LocalFileSystem):
    """``LocalFileSystem`` whose reads, writes, listings and stats can be made to fail."""

    protocol = (PROTOCOL,)
    faults: ClassVar[list[Fault]] = []
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def _check(self, op: str, path: str) -> None:
        with self._lock:
            for fault in self.faults:
                if fault.matches(op, path):
                    fault.raise_it(path)

    def _open(self, path: Any, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        self._check("read" if "r" in mode else "write", self._strip_protocol(path))
        return super()._open(path, mode, *args, **kwargs)

    def ls(self, path: Any, detail: bool = False, **kwargs: Any) -> Any:
        self._check("list", self._strip_protocol(path))
        return super().ls(path, detail=detail, **kwargs)

    def info(self, path: Any, **kwargs: Any) -> Any:
        self._check("stat", self._strip_protocol(path))
        return super().info(path, **kwargs)


def install(*faults: Fault) -> None:
    """Register ``faulty://`` (once) and replace the active faults."""
    fsspec.register_implementation(PROTOCOL, FaultyFileSystem, clobber=True)
    with FaultyFileSystem._lock:
        FaultyFileSystem.faults = list(faults)


def clear() -> None:
    install()


def url(path: str | os.PathLike[str]) -> str:
    return f"{PROTOCOL}://{os.fspath(path)}"


def env_for(*faults: Fault) -> dict[str, str]:
    """Environment entries that make a subprocess run with ``faults`` (see the docstring)."""
    return {
        ENV: json.dumps(
            [{"op": f.op, "glob": f.glob, "error": f.error, "times": f.times} for f in faults]
        )
    }


if __name__ == "__main__":
    install(*(Fault(**rule) for rule in json.loads(os.environ.get(ENV, "[]"))))
    module, sys.argv = sys.argv[1], sys.argv[1:]
    runpy.run_module(module, run_name="__main__", alter_sys=True)
