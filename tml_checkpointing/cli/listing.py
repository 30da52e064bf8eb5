"""``tml checkpoints list``: step, size, age, state and evaluators of each checkpoint, and
which one is the best (``★ best``: the lowest ``validation/loss``, by the rule of
:mod:`tml_checkpointing.catalog.best` that the Prefect tables use too).

``--json`` lists the same entries as the table: each step, then each entry the table reports
as ignored (``007``: not a canonical step name) with ``"state": "ignored"``, ``"step": null``
and the reason in ``problems``. Every row has ``"best"`` (``true`` on one committed
checkpoint at most; all ``false`` when nothing evaluated a loss).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from ..catalog.best import BEST_MARK, best_metric, best_step
from ..catalog.discovery import non_canonical_entries, scan_checkpoints
from ..catalog.evaluation import evaluated_partitions, read_checkpoint_metrics
from ..catalog.save_dir import assert_save_dir
from ..errors import (
    CheckpointNotFoundError,
)
from ..lifecycle.cleanup import (
    IncompleteCheckpoint,
    scan_incomplete,
)
from ..reading.chains import read_chain_link
from ..reading.verify import verify_checkpoint
from .common import (
    chain_summary,
    chain_text,
    emit,
    err_console,
    format_age,
    format_bytes,
    require_directory,
)
from .exit_codes import EXIT_OK


def checkpoints_list(args: argparse.Namespace) -> int:
    require_directory(args.save_dir)
    assert_save_dir(args.save_dir)
    now = time.time()
    incomplete = {e.step: e for e in scan_incomplete(args.save_dir, now=now)}
    rows: list[dict[str, Any]] = []
    metrics: dict[int, dict[str, float]] = {}  # committed steps: what evaluators recorded
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
                    chain=chain_summary(link),
                    age_s=None if report.newest_mtime is None else now - report.newest_mtime,
                    problems=[str(p) for p in report.problems],
                )
            except CheckpointNotFoundError:  # pruned between the listing and now
                row.update(state="incomplete", size=None, age_s=None, problems=[], chain=None)
            row["evaluated_by"] = evaluated_partitions(entry.path)
            metrics[entry.step] = read_checkpoint_metrics(entry.path)
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
    best = best_step(metrics)
    for row in rows:
        row["best"] = row["committed"] and row["step"] == best
    metric = best_metric(name for recorded in metrics.values() for name in recorded)

    ignored = non_canonical_entries(args.save_dir)
    # --json holds what the table shows: an ignored entry is a row too (no step: its name is
    # not one), after the steps, saying why it is ignored.
    listed = rows + [_ignored_row(path) for path in ignored]

    def render() -> None:
        table = Table(
            title=f"checkpoints in {args.save_dir}",
            caption=f"{BEST_MARK}: lowest {metric}" if best is not None else None,
        )
        columns = (
            "step",
            "state",
            "size",
            "logical",
            "chain",
            "age",
            "evaluated by",
            "best",
            "path",
        )
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
                chain_text(row["chain"]),
                format_age(row["age_s"]),
                ", ".join(row["evaluated_by"]),
                BEST_MARK if row["best"] else "",
                row["path"],
            )
        Console().print(table)
        for row in rows:
            for problem in row["problems"]:
                err_console().print(f"[red]{escape(row['path'])}[/]: {escape(problem)}")
        for path in ignored:
            err_console().print(f"[yellow]ignored[/] {escape(path)}: {escape(_why_ignored(path))}")

    emit(args, listed, render)
    return EXIT_OK


def _why_ignored(path: str) -> str:
    name = path.rstrip("/").rsplit("/", 1)[-1]
    return f"not a canonical step name (write {int(name)}, not a zero-padded one)"


def _ignored_row(path: str) -> dict[str, Any]:
    """The ``--json`` row of an entry the table reports as ignored (``007``)."""
    return {
        "step": None,
        "path": path,
        "committed": False,
        "state": "ignored",
        "size": None,
        "age_s": None,
        "problems": [_why_ignored(path)],
        "evaluated_by": [],
        "chain": None,
        "best": False,
    }


SIZE_COLUMNS = ("step", "size", "logical")
