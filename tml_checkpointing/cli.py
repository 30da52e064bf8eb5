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
import json
import re
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, NoReturn

from pydantic import ValidationError
from rich.console import Console
from rich.markup import escape
from rich.progress import (
    BarColumn,
    DownloadColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeRemainingColumn,
)
from rich.table import Table
from torchsnapshot.manifest import ShardedTensorEntry

from . import __version__
from .chains import ancestry, link_of, logical_metadata, read_chain_link
from .cleanup import IncompleteCheckpoint, clean_incomplete, find_incomplete, scan_incomplete
from .discovery import is_committed, non_canonical_entries, scan_checkpoints, stored_bytes
from .errors import (
    CheckpointError,
    CheckpointNotFoundError,
    CheckpointReadError,
    CheckpointWriteError,
    CorruptCheckpointError,
    SaveDirLockedError,
)
from .evaluation import evaluated_partitions
from .faults import is_storage_fault
from .filesystem import basename, invalidate_listing, require_bucket, resolve
from .incremental import DELTA_ROOT, ChainLink
from .integrity import VerifyReport, read_metadata, verify_checkpoint
from .layout import COMMIT_MARKER
from .materialize import materialize
from .retention import RetentionPlan, RetentionPolicy, assert_save_dir, prune

EXIT_OK = 0
EXIT_CORRUPT = 1
EXIT_BAD_INPUT = 2
EXIT_STORAGE = 3


class BadInputError(CheckpointError, ValueError):
    """What the user asked for cannot be done as asked (exit code 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse that answers in JSON when ``--json`` was given, still with exit code 2."""

    json_errors = False

    def error(self, message: str) -> NoReturn:
        if _Parser.json_errors:
            print(json.dumps({"error": message, "exit_code": EXIT_BAD_INPUT}))
        self.print_usage(sys.stderr)
        self.exit(EXIT_BAD_INPUT, f"{self.prog}: error: {message}\n")


# -- argument types ------------------------------------------------------------------------------

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


# -- helpers ---------------------------------------------------------------------------------------


def _err() -> Console:
    return Console(stderr=True, soft_wrap=True)


def _progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=_err(),
        transient=True,
    )


def _bytes_progress() -> Progress:
    return Progress(
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        DownloadColumn(),
        TimeRemainingColumn(),
        console=_err(),
        transient=True,
    )


def _require_directory(path: str) -> None:
    """Missing directories are bad input (exit 2), never "nothing to do"."""
    fs, root = resolve(path)
    invalidate_listing(fs, root)
    if not fs.isdir(root):
        require_bucket(fs, root)  # a missing bucket is named as such (exit 2)
        what = "is a file, not a directory" if fs.isfile(root) else "does not exist"
        raise BadInputError(f"{path} {what}")


def _require_checkpoint(path: str) -> None:
    _require_directory(path)
    if not is_committed(path):
        entries = "" if not _has_steps(path) else " (it holds <step> checkpoints: a save_dir?)"
        raise BadInputError(
            f"{path} is not a committed checkpoint (no non-empty {COMMIT_MARKER}){entries}"
        )


def _has_steps(path: str) -> bool:
    try:
        return bool(scan_checkpoints(path))
    except CheckpointError:
        return False


def _emit(args: argparse.Namespace, payload: Any, render: Callable[[], None]) -> None:
    if args.json:
        print(json.dumps(payload, indent=None, default=str))
    else:
        render()


# -- list ------------------------------------------------------------------------------------------


def _checkpoints_list(args: argparse.Namespace) -> int:
    _require_directory(args.save_dir)
    assert_save_dir(args.save_dir)
    now = time.time()
    incomplete = {e.step: e for e in scan_incomplete(args.save_dir, now=now)}
    rows: list[dict[str, Any]] = []
    for entry in scan_checkpoints(args.save_dir):
        row: dict[str, Any] = {"step": entry.step, "path": entry.path, "committed": entry.committed}
        if entry.committed:
            try:
                report = verify_checkpoint(entry.path, level="size", raise_on_corrupt=False)
                link = read_chain_link(entry.path)
                row.update(
                    state=report.status,
                    size=report.total_bytes,
                    logical_size=link.full_bytes if link is not None else None,
                    chain=_chain_summary(link),
                    age_s=None if report.newest_mtime is None else now - report.newest_mtime,
                    problems=[str(p) for p in report.problems],
                )
            except CheckpointNotFoundError:  # pruned between the listing and now
                row.update(state="incomplete", size=None, age_s=None, problems=[], chain=None)
            row["evaluated_by"] = evaluated_partitions(entry.path)
        else:
            stale: IncompleteCheckpoint | None = incomplete.get(entry.step)
            row.update(
                state="incomplete",
                size=stale.size if stale else None,
                age_s=stale.age_s if stale else None,
                problems=[],
                evaluated_by=[],
                chain=None,
            )
        rows.append(row)

    ignored = non_canonical_entries(args.save_dir)

    def render() -> None:
        table = Table(title=f"checkpoints in {args.save_dir}")
        columns = ("step", "state", "size", "logical", "chain", "age", "evaluated by", "path")
        for column in columns:
            table.add_column(column, justify="right" if column in SIZE_COLUMNS else "left")
        colour = {"valid": "green", "unverified": "yellow", "corrupt": "bold red"}
        for row in rows:
            state = row["state"]
            table.add_row(
                str(row["step"]),
                f"[{colour.get(state, 'dim')}]{state}[/]",
                format_bytes(row["size"]),
                format_bytes(row.get("logical_size") or row["size"]),
                _chain_text(row["chain"]),
                format_age(row["age_s"]),
                ", ".join(row["evaluated_by"]),
                row["path"],
            )
        Console().print(table)
        for row in rows:
            for problem in row["problems"]:
                _err().print(f"[red]{escape(row['path'])}[/]: {escape(problem)}")
        for path in ignored:
            _err().print(
                f"[yellow]ignored[/] {escape(path)}: not a canonical step name (write "
                f"{escape(str(int(path.rstrip('/').rsplit('/', 1)[-1])))}, not a zero-padded one)"
            )

    _emit(args, rows, render)
    return EXIT_OK


SIZE_COLUMNS = ("step", "size", "logical")


def _chain_summary(link: ChainLink | None) -> dict[str, Any] | None:
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


def _chain_text(chain: dict[str, Any] | None) -> str:
    if chain is None:
        return ""
    return f"delta of {chain['parent']}" if chain["delta"] else "full"


# -- inspect ---------------------------------------------------------------------------------------


def _checkpoints_inspect(args: argparse.Namespace) -> int:
    _require_checkpoint(args.checkpoint)
    fs, root = resolve(args.checkpoint)
    metadata, why = read_metadata(fs, root.rstrip("/"), args.checkpoint)
    if metadata is None:
        raise CorruptCheckpointError(
            f"{args.checkpoint}: commit marker unreadable as torchsnapshot metadata ({why})",
            checkpoint=args.checkpoint,
            path=COMMIT_MARKER,
        )
    report = verify_checkpoint(args.checkpoint, level="size", raise_on_corrupt=False)
    link = link_of(metadata, args.checkpoint)
    chained = {f"0/{t.path}" for t in link.tensors} if link is not None else set()
    logical = logical_metadata(metadata, link)
    entries = [_describe_entry(name, entry) for name, entry in _merge_shards(logical.manifest)]
    entries = [
        {**e, "type": "Tensor (rows over a chain)" if e["name"] in chained else e["type"]}
        for e in entries
        if e["type"] not in ("dict", "list", "OrderedDict") and not _is_chain_part(e["name"])
    ]
    chain = _chain_summary(link)
    if chain is not None and link is not None:
        chain["base"] = _chain_base(args.checkpoint, metadata, link)
        chain["plain_torchsnapshot_restore"] = not link.is_delta
    payload = {
        "checkpoint": args.checkpoint,
        "world_size": metadata.world_size,
        "version": metadata.version,
        "entries": entries,
        "tensor_bytes": sum(e["bytes"] or 0 for e in entries),
        "chain": chain,
        "state": report.status,
        "problems": [str(p) for p in report.problems],
    }

    def render() -> None:
        table = Table(title=f"{args.checkpoint} (world size {metadata.world_size})")
        for column in ("name", "type", "shape", "dtype", "bytes"):
            table.add_column(column, justify="right" if column == "bytes" else "left")
        for entry in entries:
            table.add_row(
                entry["name"],
                entry["type"],
                "" if entry["shape"] is None else "x".join(map(str, entry["shape"])) or "scalar",
                entry["dtype"] or "",
                format_bytes(entry["bytes"]) if entry["bytes"] is not None else "",
            )
        Console().print(table)
        Console().print(f"tensor data: {format_bytes(payload['tensor_bytes'])}")
        if chain is not None and chain["delta"]:
            Console().print(
                f"incremental: {_chain_text(chain)} (depth {chain['depth']}), chain starts at "
                f"{chain['base']}; "
                f"wrote {format_bytes(chain['written_bytes'])} of "
                f"{format_bytes(chain['logical_bytes'])}. Plain torchsnapshot cannot restore "
                "it: restore with tml_checkpointing.Snapshot, or `tml checkpoints materialize`."
            )
        elif chain is not None:
            Console().print("incremental: full checkpoint (starts a chain)")
        for problem in report.problems:
            _err().print(f"[bold red]corrupt[/]: {escape(str(problem))}")

    _emit(args, payload, render)
    return EXIT_CORRUPT if report.status == "corrupt" else EXIT_OK


def _is_chain_part(ranked: str) -> bool:
    logical = ranked.split("/", 1)[-1]
    return logical == DELTA_ROOT or logical.startswith(f"{DELTA_ROOT}/")


def _chain_base(checkpoint: str, metadata: Any, link: ChainLink) -> str | None:
    """The full checkpoint the chain starts at (``None``: the chain is broken; verify says
    why)."""
    if not link.is_delta:
        return checkpoint
    fs, root = resolve(checkpoint)
    try:
        return ancestry(checkpoint, metadata, fs, root)[-1].checkpoint
    except CorruptCheckpointError:
        return None


def _merge_shards(manifest: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Manifest entries, with a sharded tensor shown once with its full shape.

    Each saving rank's entry (``0/model/t``, ``1/model/t``) lists only that rank's shards; the
    row is named by the logical path (``model/t``) and describes the whole table.
    """
    merged: dict[str, Any] = {}
    rows: list[tuple[str, Any]] = []
    for name, entry in manifest.items():
        if not isinstance(entry, ShardedTensorEntry):
            rows.append((name, entry))
            continue
        logical = name.split("/", 1)[1]
        if logical not in merged:
            merged[logical] = ShardedTensorEntry(shards=[])
            rows.append((logical, merged[logical]))
        merged[logical].shards.extend(entry.shards)
    return rows


def _describe_entry(name: str, entry: Any) -> dict[str, Any]:
    shape = getattr(entry, "shape", None)
    if shape is None and getattr(entry, "shards", None):
        shape = [
            max(o + s for o, s in zip(dims, sizes, strict=True))
            for dims, sizes in zip(
                zip(*(shard.offsets for shard in entry.shards), strict=True),
                zip(*(shard.sizes for shard in entry.shards), strict=True),
                strict=True,
            )
        ]
    dtype = getattr(entry, "dtype", None)
    if dtype is None and getattr(entry, "shards", None):
        dtype = entry.shards[0].tensor.dtype
    size: int | None = None
    if shape is not None and dtype:
        size = _numel(shape) * _element_size(dtype)
    elif getattr(entry, "byte_range", None):
        size = int(entry.byte_range[1]) - int(entry.byte_range[0])
    return {
        "name": name,
        "type": entry.type,
        "shape": list(shape) if shape is not None else None,
        "dtype": dtype,
        "bytes": size,
        "value": getattr(entry, "readable", None),
    }


def _numel(shape: Sequence[int]) -> int:
    total = 1
    for dim in shape:
        total *= int(dim)
    return total


def _element_size(dtype: str) -> int:
    import torch
    from torchsnapshot.serialization import string_to_dtype

    try:
        return torch.empty((), dtype=string_to_dtype(dtype)).element_size()
    except Exception:
        return 0


# -- verify ----------------------------------------------------------------------------------------


def _checkpoints_verify(args: argparse.Namespace) -> int:
    target = args.target
    _require_directory(target)
    level = "full" if args.full else "size"
    if is_committed(target):
        targets, incomplete = [target], []
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
        with _bytes_progress() as progress:
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
            _err().print(
                f"[bold red]{len(corrupt)} corrupt checkpoint(s)[/]: do not resume from them; "
                "get_latest_valid_checkpoint() skips them."
            )

    _emit(args, payload, render)
    return EXIT_CORRUPT if corrupt else EXIT_OK


# -- prune -----------------------------------------------------------------------------------------


def _checkpoints_prune(args: argparse.Namespace) -> int:
    _require_directory(args.save_dir)
    if (args.keep_best is None) != (args.metric is None):
        raise BadInputError("--keep-best and --metric go together")
    policy = RetentionPolicy(
        keep_last=args.keep_last,
        keep_every_steps=args.keep_every,
        keep_best=args.keep_best,
        best_metric=args.metric,
        best_mode=args.mode,
        keep_until_evaluated=args.keep_until_evaluated or [],
    )
    with _progress() as progress:
        task = progress.add_task("pruning", total=None)

        sizes: dict[int, int] = {}

        def planned(plan: RetentionPlan) -> None:
            progress.update(task, total=0 if args.dry_run else len(plan.delete))
            sizes.update({victim.step: stored_bytes(victim.path) for victim in plan.delete})

        result = prune(
            args.save_dir,
            policy,
            dry_run=args.dry_run,
            on_plan=planned,
            on_deleted=lambda _: progress.advance(task),
        )
    plan = result.plan
    payload = {
        "save_dir": args.save_dir,
        "dry_run": args.dry_run,
        "policy": policy.model_dump(),
        "latest_valid": result.latest_valid,
        "keep": [
            {"step": c.step, "path": c.path, "reasons": plan.reasons[c.step]} for c in plan.keep
        ],
        "delete": [{"step": c.step, "path": c.path, "bytes": sizes[c.step]} for c in plan.delete],
        "deleted": result.deleted,
        "freed_bytes": 0 if args.dry_run else sum(sizes.values()),
    }

    def render() -> None:
        table = Table(title=f"prune {args.save_dir}{' (dry run)' if args.dry_run else ''}")
        for column in ("step", "action", "why"):
            table.add_column(column)
        rows = [(c.step, "keep", "; ".join(plan.reasons[c.step])) for c in plan.keep]
        verb = "would delete" if args.dry_run else "deleted"
        rows += [(c.step, verb, "") for c in plan.delete]
        for step, action, why in sorted(rows):
            style = "green" if action == "keep" else "red"
            table.add_row(str(step), f"[{style}]{action}[/]", why)
        Console().print(table)
        freed = sum(sizes.values())
        Console().print(f"{'would free' if args.dry_run else 'freed'} {format_bytes(freed)}")

    _emit(args, payload, render)
    return EXIT_OK


# -- materialize -----------------------------------------------------------------------------------


def _checkpoints_materialize(args: argparse.Namespace) -> int:
    _require_checkpoint(args.checkpoint)
    with _progress() as progress:
        progress.add_task(f"materializing {args.checkpoint}", total=None)
        written = materialize(args.checkpoint, args.destination)
    payload = {
        "checkpoint": args.checkpoint,
        "destination": written,
        "bytes": stored_bytes(written),
    }

    def render() -> None:
        Console().print(
            f"wrote {escape(written)} ({format_bytes(payload['bytes'])}): a full, plain "
            "torchsnapshot checkpoint of the state "
            f"{escape(args.checkpoint)} restores"
        )

    _emit(args, payload, render)
    return EXIT_OK


# -- clean-incomplete ------------------------------------------------------------------------------


def _checkpoints_clean_incomplete(args: argparse.Namespace) -> int:
    _require_directory(args.save_dir)
    found = find_incomplete(args.save_dir, args.older_than)
    if args.dry_run:
        removed: list[IncompleteCheckpoint] = []
    else:
        removed = clean_incomplete(args.save_dir, args.older_than)
    listed = found if args.dry_run else removed
    payload = {
        "save_dir": args.save_dir,
        "older_than_s": args.older_than,
        "dry_run": args.dry_run,
        "incomplete": [
            {"step": e.step, "path": e.path, "age_s": e.age_s, "size": e.size} for e in found
        ],
        "removed": [e.path for e in removed],
    }

    def render() -> None:
        verb = "would remove" if args.dry_run else "removed"
        if not listed:
            Console().print(
                f"no incomplete checkpoint older than {format_age(args.older_than)} in "
                f"{args.save_dir}"
            )
        for entry in listed:
            Console().print(
                f"{verb} {entry.path}  (age {format_age(entry.age_s)}, {format_bytes(entry.size)})"
            )

    _emit(args, payload, render)
    return EXIT_OK


# -- parser ----------------------------------------------------------------------------------------


def build_parser() -> argparse.ArgumentParser:
    """The whole ``tml`` parser; other modules add their own groups to its subparsers."""
    parser = _Parser(prog="tml", description="tml: checkpoints and training runs")
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
        "list", "step, size, age, state and evaluators of each checkpoint", _checkpoints_list
    )
    listing.add_argument("save_dir", help="local path or fsspec URL (s3://bucket/run)")

    inspect = command(
        "inspect", "manifest of one checkpoint: names, types, shapes, dtypes", _checkpoints_inspect
    )
    inspect.add_argument("checkpoint", help="a checkpoint: <save_dir>/<step>")

    verify = command(
        "verify",
        "verify one checkpoint or every checkpoint of a save_dir (exit 1 if any is corrupt)",
        _checkpoints_verify,
    )
    verify.add_argument("target", help="a checkpoint or a save_dir")
    verify.add_argument("--full", action="store_true", help="also compare checksums (reads all)")

    prune_cmd = command(
        "prune", "delete checkpoints a retention policy does not keep", _checkpoints_prune
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
        _checkpoints_materialize,
    )
    materialize_cmd.add_argument("checkpoint", help="a checkpoint: <save_dir>/<step>")
    materialize_cmd.add_argument("destination", help="a new checkpoint path, e.g. <dir>/<step>")

    clean = command(
        "clean-incomplete",
        "remove checkpoint directories that never committed and are older than a threshold",
        _checkpoints_clean_incomplete,
    )
    clean.add_argument("save_dir")
    clean.add_argument(
        "--older-than", type=parse_duration, required=True, metavar="AGE", help="30s, 10m, 1h, 2d"
    )
    clean.add_argument("--dry-run", action="store_true", help="list, remove nothing")
    return parser


def main(
    argv: Sequence[str] | None = None,
    *,
    extend: Callable[[argparse.ArgumentParser], None] | None = None,
) -> int:
    """Run ``tml``; ``extend`` adds command groups (the Prefect flows do, in ``flows.cli``)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    _Parser.json_errors = "--json" in argv
    parser = build_parser()
    if extend is not None:
        extend(parser)
    args = parser.parse_args(argv)
    as_json = bool(getattr(args, "json", False))
    try:
        return int(args.handler(args))
    except CorruptCheckpointError as error:
        return _fail(as_json, str(error), EXIT_CORRUPT)
    except (CheckpointReadError, CheckpointWriteError, SaveDirLockedError) as error:
        return _fail(as_json, storage_message(error), EXIT_STORAGE)
    except (CheckpointError, ValidationError) as error:
        return _fail(as_json, str(error), EXIT_BAD_INPUT)
    except Exception as error:
        if isinstance(error, FileNotFoundError | NotADirectoryError):
            return _fail(as_json, str(error), EXIT_BAD_INPUT)
        if not is_storage_fault(error):
            raise
        return _fail(as_json, storage_message(error), EXIT_STORAGE)


def storage_message(error: BaseException) -> str:
    """A storage fault in one line: ours already say what failed; raw ones get their type."""
    if isinstance(error, CheckpointError):
        return f"storage error: {error}"
    return f"storage error: {type(error).__name__}: {error}"


def _fail(as_json: bool, message: str, code: int) -> int:
    if as_json:
        print(json.dumps({"error": message, "exit_code": code}))
    _err().print(f"[bold red]error:[/] {escape(message)}", highlight=False)
    return code


if __name__ == "__main__":
    sys.exit(main())
