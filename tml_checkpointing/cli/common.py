"""What every ``tml checkpoints`` command shares: exit codes, argument types, output.

One table of exit codes (see :mod:`tml_checkpointing.cli`), one way to print (``--json``
makes stdout pure JSON), one way to say a storage fault, so every command answers alike.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from collections.abc import Callable
from typing import Any, NoReturn

from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    ProgressColumn,
    TextColumn,
    TimeRemainingColumn,
)

from ..catalog.discovery import is_committed, scan_checkpoints
from ..catalog.save_dir import uncommitted_checkpoint
from ..errors import (
    BadInputError,
    CheckpointError,
)
from ..format.chain_link import ChainLink
from ..format.layout import COMMIT_MARKER
from ..storage.filesystem import invalidate_listing, require_bucket, resolve
from .exit_codes import EXIT_BAD_INPUT


class Parser(argparse.ArgumentParser):
    """argparse that answers in JSON when ``--json`` was given, still with exit code 2."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if Parser.json_errors:
            print(json.dumps({"error": message, "exit_code": EXIT_BAD_INPUT}))
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


_DURATION = re.compile(r"\s*([0-9]+(?:\.[0-9]+)?)\s*([smhdw]?)\s*")
_UNIT_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_duration(text: str) -> float:
    """``30s``, ``10m``, ``1h``, ``2d``, ``1w`` or plain seconds -> seconds (never negative)."""
    match = _DURATION.fullmatch(text.lower())
    if not match:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a duration; use a non-negative number with s, m, h, d or w "
            "(e.g. 30s, 10m, 1h, 2d)"
        )
    return float(match.group(1)) * _UNIT_SECONDS[match.group(2)]


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "?"
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.1f}{unit}"
    return f"{seconds:.0f}s"


def format_bytes(size: int | None) -> str:
    if size is None:
        return "?"
    value = float(size)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if value < 1024 or unit == "GiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TiB"


def err_console() -> Console:
    return Console(stderr=True, soft_wrap=True)


def step_progress() -> Progress:
    """A progress bar counting checkpoints (prune, clean-incomplete)."""
    return _progress(MofNCompleteColumn())


def bytes_progress() -> Progress:
    """A progress bar counting bytes read (verify)."""
    return _progress(DownloadColumn())


def _progress(counter: ProgressColumn) -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        counter,
        TimeRemainingColumn(),
        console=err_console(),
        transient=True,
    )


def require_directory(path: str) -> None:
    """Missing directories are bad input (exit 2), never "nothing to do"."""
    fs, root = resolve(path)
    invalidate_listing(fs, root)
    if not fs.isdir(root):
        require_bucket(fs, root)  # a missing bucket is named as such (exit 2)
        what = "is a file, not a directory" if fs.isfile(root) else "does not exist"
        raise BadInputError(f"{path} {what}")


def require_checkpoint(path: str) -> None:
    require_directory(path)
    if not is_committed(path):
        why = uncommitted_checkpoint(path)
        if why:
            raise BadInputError(f"{path} is not a committed checkpoint: {why}")
        entries = "" if not has_steps(path) else " (it holds <step> checkpoints: a save_dir?)"
        raise BadInputError(
            f"{path} is not a committed checkpoint (no non-empty {COMMIT_MARKER}){entries}"
        )


def has_steps(path: str) -> bool:
    try:
        return bool(scan_checkpoints(path))
    except CheckpointError:
        return False


def emit(args: argparse.Namespace, payload: Any, render: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(payload, indent=None, default=str))
    else:
        render()


def storage_message(error: BaseException) -> str:
    """A storage fault in one line: ours already say what failed; raw ones get their type."""
    if isinstance(error, CheckpointError):
        return f"storage error: {error}"
    return f"storage error: {type(error).__name__}: {error}"


def fail(as_json: bool, message: str, code: int) -> int:
    if as_json:
        print(json.dumps({"error": message, "exit_code": code}))
    err_console().print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return code


def chain_summary(link: ChainLink | None) -> dict[str, Any] | None:
    """What ``list``/``inspect`` say about a checkpoint's place in an incremental chain."""
    if link is None:
        return None
    return {
        "delta": link.is_delta,
        "parent": link.parent,
        "depth": link.depth,
        "written_bytes": link.written_bytes,
        "logical_bytes": link.full_bytes,
    }


def chain_text(chain: dict[str, Any] | None) -> str:
    if chain is None:
        return ""
    return f"delta of {chain['parent']}" if chain["delta"] else "full"
