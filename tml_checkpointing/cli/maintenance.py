"""The commands that change a save_dir: ``prune``, ``materialize``, ``clean-incomplete``.

Each refuses bad input before it touches anything (exit 2: ``materialize`` into a save_dir
too), and deletes only through the library's own protocols (retention, cleanup), never by
listing and removing files itself; ``clean-incomplete`` moves a step with an empty (torn)
commit marker aside instead of removing it.
"""

from __future__ import annotations

import argparse

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..catalog.discovery import stored_bytes
from ..errors import BadInputError
from ..lifecycle.cleanup import (
    IncompleteCheckpoint,
    clean_incomplete,
    find_incomplete,
)
from ..lifecycle.retention import RetentionPlan, RetentionPolicy, prune
from ..writing.materialize import materialize
from .common import (
    emit,
    format_age,
    format_bytes,
    require_checkpoint,
    require_directory,
    step_progress,
)
from .exit_codes import EXIT_OK


def checkpoints_prune(args: argparse.Namespace) -> int:
    require_directory(args.save_dir)
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
    with step_progress() as progress:
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

    emit(args, payload, render)
    return EXIT_OK


def checkpoints_materialize(args: argparse.Namespace) -> int:
    require_checkpoint(args.checkpoint)
    with step_progress() as progress:
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

    emit(args, payload, render)
    return EXIT_OK


def checkpoints_clean_incomplete(args: argparse.Namespace) -> int:
    require_directory(args.save_dir)
    found = find_incomplete(args.save_dir, args.older_than)
    if args.dry_run:
        handled: list[IncompleteCheckpoint] = []
    else:
        handled = clean_incomplete(args.save_dir, args.older_than)
    listed = found if args.dry_run else handled
    payload = {
        "save_dir": args.save_dir,
        "older_than_s": args.older_than,
        "dry_run": args.dry_run,
        "incomplete": [
            {"step": e.step, "path": e.path, "age_s": e.age_s, "size": e.size, "torn": e.torn}
            for e in found
        ],
        "removed": [e.path for e in handled if not e.moved_to],
        # A step whose commit marker is empty is moved aside, never removed (data kept).
        "moved_aside": [{"path": e.path, "to": e.moved_to} for e in handled if e.moved_to],
    }

    def render() -> None:
        if not listed:
            Console().print(
                f"no incomplete checkpoint older than {format_age(args.older_than)} in "
                f"{args.save_dir}"
            )
        for entry in listed:
            what = f"(age {format_age(entry.age_s)}, {format_bytes(entry.size)})"
            if entry.torn:
                verb = "would move aside" if args.dry_run else "moved aside"
                where = f" to {escape(entry.moved_to)}" if entry.moved_to else ""
                what += ": its commit marker is empty (torn); its data is kept"
                Console().print(f"{verb} {escape(entry.path)}{where}  {what}")
            else:
                verb = "would remove" if args.dry_run else "removed"
                Console().print(f"{verb} {escape(entry.path)}  {what}")

    emit(args, payload, render)
    return EXIT_OK
