"""``tml checkpoints verify``: one checkpoint, or every one of a save_dir (exit 1: corrupt)."""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape

from ..catalog.discovery import is_committed, scan_checkpoints
from ..catalog.save_dir import uncommitted_checkpoint
from ..errors import BadInputError
from ..reading.verify import VerifyReport, verify_checkpoint
from ..storage.filesystem import basename
from .common import (
    bytes_progress,
    emit,
    err_console,
    require_directory,
)
from .exit_codes import EXIT_CORRUPT, EXIT_OK


def checkpoints_verify(args: argparse.Namespace) -> int:
    target = args.target
    require_directory(target)
    # A command called verify reads what it vouches for; --quick is the one-listing check.
    level = "size" if args.quick else "full"
    if is_committed(target):
        targets, incomplete = [target], []
    elif why := uncommitted_checkpoint(target):  # a step directory: never read as a save_dir
        raise BadInputError(f"{target} is not a committed checkpoint: {why}")
    else:
        entries = scan_checkpoints(target)
        if not entries:
            raise BadInputError(
                f"{target} is neither a committed checkpoint nor a save_dir holding <step> "
                "checkpoints"
            )
        targets = [e.path for e in entries if e.committed]
        incomplete = [e.path for e in entries if not e.committed]
    reports: list[VerifyReport] = []
    if level == "full":
        sizes = [verify_checkpoint(t, level="size", raise_on_corrupt=False) for t in targets]
        with bytes_progress() as progress:
            task = progress.add_task("verifying", total=sum(r.total_bytes for r in sizes))
            for checkpoint in targets:
                progress.update(task, description=f"verifying {basename(checkpoint)}")
                reports.append(
                    verify_checkpoint(
                        checkpoint,
                        level="full",
                        raise_on_corrupt=False,
                        progress=lambda n: progress.advance(task, n),
                    )
                )
    else:
        reports = [verify_checkpoint(t, level="size", raise_on_corrupt=False) for t in targets]
    corrupt = [r for r in reports if r.status == "corrupt"]
    payload = {
        "target": target,
        "level": level,
        "checkpoints": [r.to_dict() for r in reports],
        "incomplete": incomplete,
        "corrupt": [r.checkpoint for r in corrupt],
        "ok": not corrupt,
    }

    def render() -> None:
        colour = {"valid": "green", "unverified": "yellow", "corrupt": "bold red"}
        for report in reports:
            Console().print(
                f"[{colour[report.status]}]{report.status:10}[/] {escape(report.checkpoint)}  "
                f"{escape(report.summary())}",
                soft_wrap=True,
            )
        for path in incomplete:
            Console().print(f"[dim]incomplete[/] {path}  (no commit marker; ignored)")
        if corrupt:
            err_console().print(
                f"[bold red]{len(corrupt)} corrupt checkpoint(s)[/]: do not resume from them; "
                "get_latest_valid_checkpoint() skips them."
            )

    emit(args, payload, render)
    return EXIT_CORRUPT if corrupt else EXIT_OK
