"""The ``tml`` command line (grows with the project)."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence

from rich.console import Console
from rich.table import Table

from . import __version__
from .discovery import scan_checkpoints
from .errors import CheckpointError
from .evaluation import evaluated_partitions


def _checkpoints_list(args: argparse.Namespace) -> int:
    entries = scan_checkpoints(args.save_dir)
    rows = [
        {
            "step": entry.step,
            "path": entry.path,
            "state": "committed" if entry.committed else "incomplete",
            "evaluated_by": evaluated_partitions(entry.path) if entry.committed else [],
        }
        for entry in entries
    ]
    if args.json:
        print(json.dumps(rows))
        return 0
    table = Table(title=f"checkpoints in {args.save_dir}")
    for column in ("step", "state", "evaluated by", "path"):
        table.add_column(column)
    for row in rows:
        table.add_row(str(row["step"]), row["state"], ", ".join(row["evaluated_by"]), row["path"])
    Console().print(table)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="tml", description=__doc__)
    parser.add_argument("--version", action="version", version=f"tml-checkpointing {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    checkpoints = commands.add_parser("checkpoints", help="inspect checkpoint directories")
    checkpoint_commands = checkpoints.add_subparsers(dest="checkpoints_command", required=True)
    listing = checkpoint_commands.add_parser("list", help="list the checkpoints of a save_dir")
    listing.add_argument("save_dir", help="local path or fsspec URL (s3://bucket/run)")
    listing.add_argument("--json", action="store_true", help="print JSON instead of a table")
    listing.set_defaults(handler=_checkpoints_list)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except CheckpointError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
