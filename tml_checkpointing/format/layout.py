"""The on-disk layout of a ``save_dir``: every file name, step naming, and "is committed".

Why one module: a reader and a writer that spell a file name differently, or disagree on what
makes a checkpoint committed, lose data silently. Everything that names a file inside a
``save_dir`` asks here; nothing else spells a file name. The layout::

    <save_dir>/
      .writer.lock                 one live writer (tml_checkpointing.storage.locking)
      .writer.lock.guard           local disk only: flock'd around lock hand-overs, never deleted
      run.json                     what the run is (training.run_info)
      lineage.json                 where a retrained run came from (flows.retrain)
      <step>/                      a checkpoint; <step> is canonical decimal: 0, 7, 120
        .writing                   claim of a save in flight (removed at commit)
        <rank>/...                 torchsnapshot data files
        batched/<uuid>             the writer process's data file (one per save)
        delta/<uuid>               an incremental save's changed rows (chain_link.py)
        .integrity.json            sizes and checksums of the data files (of every rank)
        .integrity.json.rank-<r>   rank r's records while a multi-rank save is in flight
        .snapshot_metadata         torchsnapshot manifest = the commit marker, written last
        evaled_by/<partition>_DONE evaluator done-markers (added after commit)
        eval/<partition>.json      per-partition metrics (added after commit)
        metrics.json               metrics ranked by retention (added after commit)
        train_losses.json          the training loss of each step since the previous
                                   checkpoint (training.step_losses; added after commit)
      .writing.<step>.<hex>.tmp    a save claim being written (renamed into <step>/.writing)
      <step>.<reason>-<UTC time>/  a checkpoint moved aside (not a step name: ignored); a
                                   step whose marker is empty goes to <step>.torn-marker-<time>

Step names are canonical: ``7``, never ``007``. A directory named ``007`` is not a checkpoint
for any reader (and so can never shadow or be confused with ``7``); ``tml checkpoints list``
reports it as ignored.
"""

from __future__ import annotations

import re
import time
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..errors import InvalidStepError

# -- names -----------------------------------------------------------------------------------

#: torchsnapshot's own marker (its ``SNAPSHOT_METADATA_FNAME``), spelled here rather than
#: imported: this module is imported by the writer process, which never imports torch.
COMMIT_MARKER = ".snapshot_metadata"
INTEGRITY_SIDECAR = ".integrity.json"
SAVE_CLAIM = ".writing"
EVALUATED_BY_DIR = "evaled_by"
DONE_SUFFIX = "_DONE"
METRICS_FILE = "metrics.json"
STEP_LOSSES_FILE = "train_losses.json"
PARTITION_METRICS_DIR = "eval"
WRITER_LOCK = ".writer.lock"
WRITER_LOCK_GUARD = ".writer.lock.guard"
RUN_INFO = "run.json"
LINEAGE = "lineage.json"
#: The state entry every Snapshot adds (``step``, ``walltime``): ``<rank>/extra_state/...``.
EXTRA_STATE = "extra_state"
BATCHED_DIR = "batched"  # inside a checkpoint: the writer's data files (torchsnapshot's name)
DELTA_DIR = "delta"  # inside a checkpoint: the changed rows of an incremental save

_CANONICAL_STEP = re.compile(r"0|[1-9][0-9]*")
_STEP_LIKE = re.compile(r"[0-9]+")


# -- steps -----------------------------------------------------------------------------------


def step_name(step: int) -> str:
    """The directory name of ``step``'s checkpoint (canonical decimal)."""
    if isinstance(step, bool) or not isinstance(step, int) or step < 0:
        raise InvalidStepError(f"a step must be a non-negative integer, got {step!r}")
    return str(step)


def parse_step(name: str) -> int | None:
    """The step a directory name stands for, or ``None`` (not canonical, not a number)."""
    return int(name) if _CANONICAL_STEP.fullmatch(name) else None


def is_non_canonical_step(name: str) -> bool:
    """``007``-style names: look like a step, are not one (see the module docstring)."""
    return bool(_STEP_LIKE.fullmatch(name)) and parse_step(name) is None


def quarantine_name(step_dir: str, reason: str, now: float | None = None) -> str:
    """``<step>.<reason>-<UTC time>``: where a checkpoint moved aside goes."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime(now))
    return f"{step_dir.rstrip('/')}.{reason}-{stamp}"


# -- files inside one checkpoint -------------------------------------------------------------


def integrity_part_name(rank: int) -> str:
    """``.integrity.json.rank-<rank>``: one rank's sidecar records, merged by rank 0 at commit.

    Named under the sidecar's prefix, so it is never taken for data (:func:`is_data_file`).
    """
    return f"{INTEGRITY_SIDECAR}.rank-{rank}"


def done_marker_name(partition: str) -> str:
    """``evaled_by/<partition>_DONE``, relative to the checkpoint."""
    return f"{EVALUATED_BY_DIR}/{partition}{DONE_SUFFIX}"


def partition_metrics_name(partition: str) -> str:
    """``eval/<partition>.json``, relative to the checkpoint."""
    return f"{PARTITION_METRICS_DIR}/{partition}.json"


def batched_file_name() -> str:
    """``batched/<uuid>``: a fresh name for one save attempt's data file.

    Fresh per attempt, as torchsnapshot names its batched files: a writer of an earlier,
    killed attempt at the same step can never write into this attempt's file.
    """
    return f"{BATCHED_DIR}/{uuid.uuid4()}"


def delta_file_name() -> str:
    """``delta/<uuid>``: a fresh name for one incremental save's changed rows."""
    return f"{DELTA_DIR}/{uuid.uuid4()}"


def is_data_file(relative: str) -> bool:
    """Whether a file inside a checkpoint is data the integrity sidecar covers.

    Not data: the commit files (marker, its temporary names, the sidecar, the save claim) and
    what training and evaluators add after commit (done-markers, metrics, step losses).
    """
    name = relative.lstrip("/")
    return not (
        name in (COMMIT_MARKER, INTEGRITY_SIDECAR, METRICS_FILE, STEP_LOSSES_FILE, SAVE_CLAIM)
        or name.startswith(f"{COMMIT_MARKER}.")
        or name.startswith(f"{INTEGRITY_SIDECAR}.")
        or name.startswith(f"{SAVE_CLAIM}.")
        or name.startswith(f"{EVALUATED_BY_DIR}/")
        or name.startswith(f"{PARTITION_METRICS_DIR}/")
    )


def marker_commits(size: int | None) -> bool:
    """The one rule of "committed": the marker exists and is not empty.

    (The marker is replaced atomically, so a non-empty one is a complete one; an empty one is
    what plain torchsnapshot can leave behind when killed mid-write.)
    """
    return bool(size) and int(size or 0) > 0


def marker_torn(size: int | None) -> bool:
    """A marker that is there but empty (``size`` 0; ``None``: no marker): a commit torn by a
    crash mid-write (plain torchsnapshot writes it in place) over data that may be whole.
    Not committed, yet never deleted: it is moved aside (``<step>.torn-marker-<time>``)."""
    return size is not None and int(size) == 0


#: The reason in the name of a step directory moved aside for its torn marker.
TORN_MARKER_REASON = "torn-marker"


def claim_temporary_name(step: str, token: str) -> str:
    """``.writing.<step>.<token>.tmp``, in the *save_dir*: a claim's bytes before they are
    renamed into ``<step>/.writing``. Outside the step directory, so that the directory is
    empty (no age, never a cleanup candidate) until the claim is in it, whole."""
    return f"{SAVE_CLAIM}.{step}.{token}.tmp"


# -- a listing grouped by step ---------------------------------------------------------------


@dataclass
class StepListing:
    """Everything found under one ``<save_dir>/<name>`` directory, from one listing."""

    name: str
    step: int
    committed: bool = False
    torn: bool = False  # its marker is there but empty (see marker_torn)
    claimed: bool = False  # a save claim (.writing) is present
    files: dict[str, dict[str, Any]] = field(default_factory=dict)  # relative -> fsspec info


def group_by_step(root: str, listing: Mapping[str, Mapping[str, Any]]) -> dict[str, StepListing]:
    """Group a recursive listing (``fs.find(root, detail=True)``) by step directory.

    Keys of ``listing`` are filesystem paths below ``root``; entries outside canonical step
    directories are dropped, as are files named like a step (a file is not a checkpoint).
    """
    prefix = f"{root.rstrip('/')}/"
    groups: dict[str, StepListing] = {}
    for key, info in listing.items():
        key = key.rstrip("/")
        if not key.startswith(prefix):
            continue
        parts = key[len(prefix) :].split("/", 1)
        step = parse_step(parts[0])
        if step is None:
            continue
        if len(parts) == 1:
            if info.get("type") == "directory":
                groups.setdefault(parts[0], StepListing(parts[0], step))
            continue
        group = groups.setdefault(parts[0], StepListing(parts[0], step))
        relative = parts[1]
        if info.get("type") == "directory":
            continue
        group.files[relative] = dict(info)
        if relative == COMMIT_MARKER:
            group.committed = marker_commits(info.get("size"))
            group.torn = marker_torn(info.get("size"))
        elif relative == SAVE_CLAIM:
            group.claimed = True
    return groups
