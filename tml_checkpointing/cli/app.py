"""The ``tml`` command line (grows with the project: other modules add groups to
:func:`build_parser`).

Exit codes every ``tml checkpoints`` command keeps, so scripts can rely on them:

* 0 -- done (for ``verify``: nothing corrupt; incomplete or unverified checkpoints are fine);
* 1 -- verification found at least one corrupt checkpoint;
* 2 -- bad input: missing directory, not a checkpoint, unknown URL scheme, a number out of
  range, a malformed duration. Nothing is deleted when the input is bad;
* 3 -- storage error while working: network down or timing out, permission denied, disk
  full, or the save_dir held by another live writer. Nothing is judged corrupt, moved or
  deleted because storage could not be read.

``--json`` makes stdout pure JSON (errors too: ``{"error": ..., "exit_code": ...}``); tables,
progress bars and messages go to stderr or are left out.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from pydantic import ValidationError

from .._version import __version__
from ..errors import (
    CheckpointError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    SaveDirLockedError,
)
from ..storage.faults import is_storage_fault
from .common import (
    Parser,
    fail,
    parse_duration,
    positive_int,
    storage_message,
)
from .exit_codes import EXIT_BAD_INPUT, EXIT_CORRUPT, EXIT_SAVE_DIR_LOCKED, EXIT_STORAGE
from .inspection import checkpoints_inspect
from .listing import checkpoints_list
from .maintenance import checkpoints_clean_incomplete, checkpoints_materialize, checkpoints_prune
from .verify import checkpoints_verify


def build_parser() -> argparse.ArgumentParser:
    """The whole ``tml`` parser; other modules add their own groups to its subparsers."""
    parser = Parser(prog="tml", description="tml: checkpoints and training runs")
    parser.add_argument("--version", action="version", version=f"tml-checkpointing {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    checkpoints = commands.add_parser(
        "checkpoints",
        help="list, inspect, verify, prune and clean checkpoint directories",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = checkpoints.add_subparsers(dest="checkpoints_command", required=True)

    def command(name: str, help_text: str, handler: Callable[[argparse.Namespace], int]) -> Any:
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        cmd.add_argument("--json", action="store_true", help="print only JSON on stdout")
        cmd.set_defaults(handler=handler)
        return cmd

    listing = command(
        "list", "step, size, age, state and evaluators of each checkpoint", checkpoints_list
    )
    listing.add_argument("save_dir", help="local path or fsspec URL (s3://bucket/run)")

    inspect = command(
        "inspect", "manifest of one checkpoint: names, types, shapes, dtypes", checkpoints_inspect
    )
    inspect.add_argument("checkpoint", help="a checkpoint: <save_dir>/<step>")

    verify = command(
        "verify",
        "verify one checkpoint or every checkpoint of a save_dir (exit 1 if any is corrupt)",
        checkpoints_verify,
    )
    verify.add_argument("target", help="a checkpoint or a save_dir")
    depth = verify.add_mutually_exclusive_group()
    depth.add_argument(
        "--quick",
        action="store_true",
        help="sizes and marker only (one listing), no byte read: fast, but a same-size flipped "
        "byte passes",
    )
    depth.add_argument(
        "--full", action="store_true", help="read and checksum every byte (the default)"
    )

    prune_cmd = command(
        "prune", "delete checkpoints a retention policy does not keep", checkpoints_prune
    )
    prune_cmd.add_argument("save_dir")
    prune_cmd.add_argument("--keep-last", type=positive_int, required=True, metavar="N")
    prune_cmd.add_argument("--keep-every", type=positive_int, metavar="K", help="milestones")
    prune_cmd.add_argument("--keep-best", type=positive_int, metavar="K")
    prune_cmd.add_argument("--metric", help="metrics.json key ranked by --keep-best")
    prune_cmd.add_argument("--mode", choices=("min", "max"), default="min")
    prune_cmd.add_argument(
        "--keep-until-evaluated", action="append", metavar="PARTITION", help="repeatable"
    )
    prune_cmd.add_argument("--dry-run", action="store_true", help="show the plan, delete nothing")

    materialize_cmd = command(
        "materialize",
        "write any checkpoint (a delta of an incremental chain too) as a full, plain one",
        checkpoints_materialize,
    )
    materialize_cmd.add_argument("checkpoint", help="a checkpoint: <save_dir>/<step>")
    materialize_cmd.add_argument("destination", help="a new checkpoint path, e.g. <dir>/<step>")

    clean = command(
        "clean-incomplete",
        "remove checkpoint directories that never committed and are older than a threshold",
        checkpoints_clean_incomplete,
    )
    clean.add_argument("save_dir")
    clean.add_argument(
        "--older-than", type=parse_duration, required=True, metavar="AGE", help="30s, 10m, 1h, 2d"
    )
    clean.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    return parser


# The command groups the training application adds (flows/cli.py), named here only so that the
# library's own `tml` can say where they are instead of argparse's "invalid choice".
APPLICATION_COMMANDS = frozenset({"train", "evaluate", "retrain"})


def _first_positional(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def main(
    argv: Sequence[str] | None = None,
    *,
    extend: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Run ``tml``; ``extend`` adds command groups (the Prefect flows do, in ``flows.cli``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    Parser.json_errors = "--json" in argv
    parser = build_parser()
    if extend is not None:
        extend(parser)
    elif (command := _first_positional(argv)) in APPLICATION_COMMANDS:
        return fail(
            Parser.json_errors,
            f"'tml {command}' belongs to the training application, which is not part of the "
            "tml-checkpointing library: it runs from its repository, where `make setup` gives "
            f"`.venv/bin/tml {command}` (or run `python -m flows.cli {command}` there)",
            EXIT_BAD_INPUT,
        )
    args = parser.parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        return int(args.handler(args))
    except CorruptCheckpointError as error:
        return fail(as_json, str(error), EXIT_CORRUPT)
    except SaveDirLockedError as error:  # nothing is wrong with storage: another run holds it
        return fail(as_json, str(error), EXIT_SAVE_DIR_LOCKED)
    except (CheckpointReadError, CheckpointWriteError) as error:
        return fail(as_json, storage_message(error), EXIT_STORAGE)
    except (CheckpointError, ValidationError) as error:
        return fail(as_json, str(error), EXIT_BAD_INPUT)
    except Exception as error:
        if isinstance(error, FileNotFoundError | NotADirectoryError):
            return fail(as_json, str(error), EXIT_BAD_INPUT)
        if not is_storage_fault(error):
            raise
        return fail(as_json, storage_message(error), EXIT_STORAGE)
