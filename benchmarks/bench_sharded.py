"""Sharded saves (issue 19): training stall, drain slowdown, commit, bytes, restore, in one run.

Why: several ranks save through torchsnapshot's writer thread today; the replacement (each rank
stages its shards into a reused shared-memory block, its own writer process writes it, rank 0
commits once every rank reported) must beat DCP's asynchronous save where it counts for a
trainer: how long ``save()`` holds training, how much slower training runs until the save is
durable, and how fast a verified restore is. This script measures ours and the alternatives on
the same state, on the same machine, in one run, so the ratios can be trusted even where the
absolute numbers cannot (a shared 2-core box). It only uses ``tml_checkpointing``'s public API
(``Snapshot``, ``PendingSave.wait``, ``Snapshot.restore(..., verify="full")``), so it measures
whatever the library does when it runs.

State, as a user trains it: 2 ranks under ``torchrun`` (gloo, CPU), the TorchRec ranking recipe
(``recipes.torchrec_ranking``): an ``EmbeddingBagCollection`` of ``--tables`` tables of
``--table-rows`` x ``--dim`` float32, row-wise sharded by ``DistributedModelParallel``, fused
row-wise Adagrad applied in the backward pass plus Adam on the dense tower, one
``CombinedOptimizer``; Zipf-distributed ids, batch 512 per rank. Then one process with a plain
MLP + Adam of ``--single-mb`` MiB (default 1 GiB).

Writers (rows): ``tml full`` (``Snapshot(save_dir, state)``), ``tml incremental``
(``incremental=True``), ``DCP async thread`` / ``DCP async process`` (``dcp.async_save`` with
``BlockingAsyncStager(cache_staged_state_dict=True)`` -- the default stager fails on a
ShardedTensor -- on its own gloo group, since the training group deadlocks), ``DCP save`` (then
fsync of its files, as durable as ours), ``torchsnapshot`` (``Snapshot.async_take``, then fsync),
and in one process ``torch-checkpointing`` 0.1.1 (``CheckpointManager``, background writer
process; ``optimizer.step()`` runs under its ``lock()`` as its docs require; O_DIRECT writes fail
on this ext4, so buffered writes, then fsync).

What is measured per writer (median over ``--repeat``; with 2 ranks each figure is the slowest
rank's):

* *stall*: how long ``save()`` holds the training loop, plus what the following steps wait for
  on the writer's behalf (torch-checkpointing's ``lock()`` while its staging runs; for tml,
  which copies in the background, the time its update hooks held training,
  ``PendingSave.held_training_s``); also per GiB
  of the rank's local state. *first-step excess*: the first training step after ``save()``
  minus an idle step (work a writer pushes onto training right after returning).
* *drain slowdown*: training steps run from ``save()`` until the save is committed; their mean
  time over the mean idle step time (idle windows just before and just after). Every step ends
  with a 2-int ``all_reduce`` that decides, on all ranks at once, whether the save is committed
  (the training loop does a similar one per step); idle steps include it too.
* *committed*: seconds from ``save()`` until durable and committed, with training paused (the
  ``--repeat`` idle saves); ``committed under training`` is the same during the drain runs.
  For foreign writers: until their future/handle resolves and rank 0 fsynced every file.
* *bytes*: apparent size of one checkpoint directory (all ranks' files), 5 training steps
  after the previous save. ``tml incremental`` also builds a separate chain of a full save and
  10 deltas (5 steps apart, training paused): its bytes are the deltas' median, and the chain's
  tip is restored.
* *restore*: ``Snapshot.restore(checkpoint, verify="full")`` of the last full checkpoint and of
  the chain's tip, ``dcp.load`` + ``load_state_dict`` of a DCP checkpoint; 2->2 ranks, and 2->1
  (a 1-rank job with the same model restores the 2-rank checkpoints; DCP reshards). The state
  is overwritten before each restore and compared after it with a fingerprint taken at save time
  (per tensor: sum, row-weighted sum, sum of magnitudes in float64, rank-independent), so a fast
  restore that restores the wrong thing fails. Throughput: the whole state's bytes / seconds.
* *first save of a fresh process*: a newly started 2-rank job builds the state, trains 5 steps,
  saves once: seconds from ``save()`` to committed; with ``--busy`` also under two
  ``yes > /dev/null`` processes (always killed afterwards).
* *1 process*: all of the above on the MLP (training the MLP itself, 2 steps between saves); the
  first save of each writer in that process is reported apart (writer process start-up).

Run::

    .venv/bin/pip install -e '.[bench]'   # or: pip install torch-checkpointing==0.1.1 --no-deps
    .venv/bin/python benchmarks/bench_sharded.py --quick          # 2-3 min: small tables
    .venv/bin/python benchmarks/bench_sharded.py --busy --json    # full: 4 x 400,000 x 64 and
                                                                  # a 1 GiB MLP; 8-12 min
    .venv/bin/python benchmarks/bench_sharded.py --show benchmarks/results/sharded.json

``--json`` writes ``benchmarks/results/sharded.json``. The driver starts every job itself
(``torch.distributed.run`` with ``--worker``), streams their ``[bench]`` lines, keeps partial
results when a job fails or times out (rank 0 rewrites its result file after every writer), and
removes every process it started and its temporary directory. A writer that fails is recorded
with its error, in the JSON and the table, instead of ending the run.

Caveats: 2 cores for 2 ranks (and the writers' threads and processes), machine shared with other
people's runs, restores from a warm page cache (no root to drop it): trust ratios within one run
more than absolute numbers. See docs/benchmarks-sharded.md.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "sharded.json"
GIB = 1024**3
WRITERS = (
    "tml full",
    "tml incremental",
    "DCP async thread",
    "DCP async process",
    "DCP save",
    "torchsnapshot",
    "torch-checkpointing",
)
OURS = ("tml full", "tml incremental")
DCP_ASYNC = ("DCP async thread", "DCP async process")
SYNCHRONOUS = ("DCP save",)
# Measured in this order: ours first (the figures that matter most if a later writer hangs),
# DCP's process writer last (it spawns a process group of its own).
MEASURE_ORDER = (
    "tml full",
    "tml incremental",
    "DCP save",
    "torchsnapshot",
    "torch-checkpointing",
    "DCP async thread",
    "DCP async process",
)
PHASES = ("sharded", "restore1", "first", "single")
Json = dict[str, Any]


def log(message: str) -> None:
    """Progress on stderr; the driver shows lines starting with ``[bench]`` as they come."""
    print(f"[bench] {time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)


def describe(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".strip().splitlines()
    return (text[0] if text else type(error).__name__)[:300]


# -- files -------------------------------------------------------------------------------------


def fsync_tree(path: Path) -> None:
    """Make a foreign writer's checkpoint as durable as ours: every file and directory."""
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fd = os.open(root, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def disk_bytes(path: Path) -> int:
    """Apparent bytes of every file under ``path`` (what a save wrote)."""
    if path.is_file():
        return path.stat().st_size
    return sum(
        os.path.getsize(os.path.join(root, name))
        for root, _, files in os.walk(path)
        for name in files
    )


def write_json(path: Path, data: Json) -> None:
    """Atomically: the driver may read it while a job is being killed."""
    partial = path.with_suffix(".partial")
    partial.write_text(json.dumps(data, indent=1))
    partial.replace(path)


# -- a save in flight --------------------------------------------------------------------------


class Waiter:
    """Runs ``finish`` (the writer's own wait, then fsync where needed) in a thread and records
    when it returned: the commit time. ``finish=None``: committed when the call returned."""

    def __init__(self, finish: Callable[[], object] | None, started: float) -> None:
        self.started = started
        self.finished_at: float | None = None
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        if finish is None:
            self.finished_at = time.perf_counter()
            return

        def run() -> None:
            try:
                finish()
            except BaseException as error:
                self.error = error
            finally:
                self.finished_at = time.perf_counter()

        self._thread = threading.Thread(target=run, name="bench-commit", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return self.finished_at is not None

    def wait(self, timeout: float) -> float:
        """Seconds from the call until committed; raises the writer's error or TimeoutError."""
        if self._thread is not None:
            self._thread.join(timeout)
            if self._thread.is_alive():
                raise TimeoutError(f"not committed after {timeout:.0f}s")
        if self.error is not None:
            raise self.error
        assert self.finished_at is not None
        return self.finished_at - self.started


# -- one process's training job ----------------------------------------------------------------


@dataclass
class Job:
    """One rank: its state, its training step and its process groups."""

    rank: int
    world: int
    state: dict[str, Any]  # {"model": module, "optimizer": optimizer}
    step_fn: Callable[[Callable[[], contextlib.AbstractContextManager[None]]], None]
    work: Path
    control: Any  # gloo group for the benchmark's own bookkeeping (long timeout)
    dcp_group: Any  # gloo group for DCP's async saves (never the training group)
    timeout: float
    guard: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext
    steps_done: int = 0
    lock_wait: float = 0.0
    local_bytes: int = 0
    total_bytes: int = 0
    report: Callable[[], None] = lambda: None  # rank 0 saves the results measured so far

    def state_dicts(self) -> dict[str, Any]:
        return {key: value.state_dict() for key, value in self.state.items()}

    @contextlib.contextmanager
    def _guarded(self) -> Iterator[None]:
        started = time.perf_counter()
        with self.guard():
            self.lock_wait += time.perf_counter() - started
            yield

    def step(self) -> float:
        started = time.perf_counter()
        self.step_fn(self._guarded)
        self.steps_done += 1
        return time.perf_counter() - started

    def steps(self, count: int) -> None:
        for _ in range(count):
            self.step()

    def agree(self, done: bool, late: bool) -> tuple[bool, bool]:
        """(all ranks done, any rank late): one small all_reduce on the training group."""
        import torch
        import torch.distributed as dist

        flags = torch.tensor([int(done), int(late)], dtype=torch.int32)
        if self.world > 1:
            dist.all_reduce(flags)
        return int(flags[0]) == self.world, int(flags[1]) > 0

    def idle_steps(self, min_steps: int, min_seconds: float) -> list[float]:
        """Training with no save running, each step with the same all_reduce as a drain step."""
        times: list[float] = []
        started = time.perf_counter()
        while True:
            times.append(self.step())
            enough = len(times) >= min_steps and time.perf_counter() - started >= min_seconds
            all_enough, _ = self.agree(enough, False)
            if all_enough:
                return times

    def drain(self, waiter: Waiter) -> list[float]:
        """Train until every rank's save is committed; the step times."""
        times: list[float] = []
        while True:
            started = time.perf_counter()
            self.step()
            late = time.perf_counter() - waiter.started > self.timeout
            all_done, any_late = self.agree(waiter.done(), late)
            times.append(time.perf_counter() - started)
            if all_done:
                return times
            if any_late:
                raise TimeoutError(f"save not committed after {self.timeout:.0f}s of training")

    def barrier(self) -> None:
        import torch.distributed as dist

        if self.world > 1:
            dist.barrier(group=self.control)

    def max_over_ranks(self, values: list[float]) -> list[float]:
        import torch
        import torch.distributed as dist

        if self.world == 1 or not values:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX, group=self.control)
        return [float(v) for v in tensor]


def walk(value: Any, prefix: str = "") -> Iterator[tuple[str, Any]]:
    if isinstance(value, dict):
        for key in sorted(value, key=str):
            yield from walk(value[key], f"{prefix}/{key}")
    elif isinstance(value, list | tuple):
        for index, item in enumerate(value):
            yield from walk(item, f"{prefix}/{index}")
    else:
        yield prefix, value


def local_tensors(job: Job) -> Iterator[tuple[str, Any, int]]:
    """(key, tensor, first global row) of this rank's tensors: local shards and plain tensors."""
    import torch
    from torch.distributed._shard.sharded_tensor.api import ShardedTensor

    for key, value in walk(job.state_dicts()):
        if isinstance(value, ShardedTensor):
            for shard in value.local_shards():
                yield key, shard.tensor, int(shard.metadata.shard_offsets[0])
        elif isinstance(value, torch.Tensor):
            yield key, value, -1  # -1: a plain (replicated) tensor


def count_bytes(job: Job) -> None:
    """Local bytes (this rank's shards and its copy of the dense part) and the whole state's
    bytes (every shard once, replicated tensors once)."""
    import torch
    import torch.distributed as dist

    local = unique = 0
    for _, tensor, row in local_tensors(job):
        size = tensor.numel() * tensor.element_size()
        local += size
        if row >= 0 or job.rank == 0:
            unique += size
    total = torch.tensor([unique], dtype=torch.int64)
    if job.world > 1:
        dist.all_reduce(total, group=job.control)
    job.local_bytes, job.total_bytes = local, int(total)


def fingerprint(job: Job) -> dict[str, list[float]]:
    """Per state-dict key: sum, row-weighted sum and sum of magnitudes (float64), over the
    whole tensor whatever the sharding (replicated tensors counted once): equal for the same
    state saved by 2 ranks and restored into 1."""
    import torch
    import torch.distributed as dist

    sums: dict[str, list[float]] = {}
    for key, tensor, row in local_tensors(job):
        entry = sums.setdefault(key, [0.0, 0.0, 0.0])
        if not tensor.is_floating_point() or (row < 0 and job.rank != 0):
            continue
        data = tensor.detach().double()
        data = data.reshape(1, 1) if data.dim() == 0 else data.reshape(data.shape[0], -1)
        first = max(row, 0)
        weights = torch.arange(first, first + data.shape[0], dtype=torch.float64) % 101 + 1
        rows = data.sum(dim=1)
        entry[0] += float(rows.sum())
        entry[1] += float((rows * weights).sum())
        entry[2] += float(data.abs().sum())
    keys = sorted(sums)
    table = torch.tensor([sums[key] for key in keys], dtype=torch.float64)
    if job.world > 1:
        dist.all_reduce(table, group=job.control)
    return {key: [float(v) for v in table[i]] for i, key in enumerate(keys)}


def same_state(left: dict[str, list[float]], right: dict[str, list[float]]) -> bool:
    if set(left) != set(right):
        return False
    for key, (a0, a1, a2) in left.items():
        b0, b1, b2 = right[key]
        scale = 1e-9 * (abs(a2) + 1.0)
        if abs(a0 - b0) > scale or abs(a1 - b1) > 101 * scale or abs(a2 - b2) > scale:
            return False
    return True


def scramble(job: Job) -> None:
    """Untimed: overwrite every local tensor, so a restore that reads nothing cannot pass."""
    import torch

    with torch.no_grad():
        for _, tensor, _ in local_tensors(job):
            if tensor.is_floating_point() and tensor.numel() > 0:
                tensor.fill_(0.5)


# -- writers -----------------------------------------------------------------------------------


class Writer:
    """One way of saving; ``start`` returns ``(finish, path)`` once training may go on; the
    caller runs ``finish`` in a :class:`Waiter` (``None``: committed already)."""

    name = ""
    asynchronous = True
    delete_old = True  # remove checkpoints once measured (an incremental chain needs them)

    def __init__(self, job: Job, slug: str) -> None:
        self.job = job
        self.dir = job.work / slug
        if job.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
        job.barrier()
        self._count = 0
        self.note = ""

    def fresh(self) -> Path:
        self._count += 1
        return self.dir / f"ckpt-{self._count}"

    def start(self, step: int) -> tuple[Callable[[], object] | None, Path]:
        raise NotImplementedError

    def guard(self) -> contextlib.AbstractContextManager[Any]:
        return contextlib.nullcontext()

    def close(self) -> None:
        return None

    def rank0_fsync(self, path: Path) -> None:
        if self.job.rank == 0:
            fsync_tree(path)


class TmlWriter(Writer):
    """Ours: one ``Snapshot`` for all saves of a run, as in training."""

    pending: Any = None  # the last save's PendingSave

    def __init__(self, job: Job, name: str, incremental: bool, full_every: int = 0) -> None:
        from tml_checkpointing import Snapshot

        super().__init__(job, name.replace(" ", "-"))
        self.name = name
        self.delete_old = not incremental
        # As ``tml train`` saves: the copy runs in the background, and the next update of the
        # state (optimizer step, fused backward) waits for it; that wait is counted as stall.
        options: dict[str, Any] = {"background_staging": True}
        if incremental:
            options["incremental"] = True
        if incremental and full_every:
            options["full_every"] = full_every
        self.snapshot = Snapshot(str(self.dir), job.state, **options)
        self.links: list[str] = []

    def held_training_s(self) -> float:
        """Seconds training's updates waited for the last save's background copy (measured
        by the library, around its hooks' waits)."""
        return self.pending.held_training_s if self.pending is not None else 0.0

    def start(self, step: int) -> tuple[Callable[[], object] | None, Path]:
        pending = self.snapshot.save(step)
        self.pending = pending
        # Informational only (not the measured API): was it a delta, how deep in its chain.
        link = getattr(pending, "link", None)
        if link is not None:
            kind = "delta" if getattr(link, "is_delta", False) else "full"
            self.links.append(f"{kind}@{getattr(link, 'depth', '?')}")
        else:
            self.links.append("full")
        return pending.wait, Path(str(pending.path))

    def close(self) -> None:
        self.snapshot.close()


class DcpSaveWriter(Writer):
    name = "DCP save"
    asynchronous = False

    def __init__(self, job: Job) -> None:
        super().__init__(job, "dcp-save")

    def start(self, step: int) -> tuple[Callable[[], object] | None, Path]:
        from torch.distributed.checkpoint.state_dict_saver import save

        path = self.fresh()
        save(self.job.state_dicts(), checkpoint_id=str(path))
        self.rank0_fsync(path)  # every rank's file is written once save() returned (collective)
        return None, path


def cached_stager(share_memory: bool) -> tuple[Any, str]:
    """DCP's fastest CPU staging: ``BlockingAsyncStager(cache_staged_state_dict=True)`` (one
    staging copy, allocated once, reused). Its cache is pinned memory, which torch 2.13's CPU
    build cannot allocate ("Cannot access accelerator device"); then the same stager with an
    unpinned cache (shared memory for the process writer, so the pipe to it passes handles)."""
    import torch
    from torch.distributed._state_dict_utils import _copy_state_dict, _create_cpu_state_dict
    from torch.distributed.checkpoint.staging import BlockingAsyncStager

    if torch.accelerator.is_available():
        return BlockingAsyncStager(cache_staged_state_dict=True), ""

    class UnpinnedCachedStager(BlockingAsyncStager):
        def stage(self, state_dict: dict[str, Any]) -> dict[str, Any]:
            if self.state_dict_cache is None:
                self.state_dict_cache = _create_cpu_state_dict(
                    state_dict, share_memory=share_memory
                )
            staged: dict[str, Any] = _copy_state_dict(state_dict, self.state_dict_cache)
            return staged

    memory = "shared" if share_memory else "plain"
    note = (
        "BlockingAsyncStager(cache_staged_state_dict=True) pins its cache, which fails without "
        f"an accelerator: same stager, unpinned {memory}-memory cache"
    )
    return UnpinnedCachedStager(cache_staged_state_dict=True), note


class DcpAsyncWriter(Writer):
    """``dcp.async_save``, fastest CPU configuration: a cached blocking stager (reused staging
    memory; the default stager fails on ShardedTensor), a gloo group of its own."""

    def __init__(self, job: Job, kind: str) -> None:
        super().__init__(job, f"dcp-async-{kind}")
        self.name = f"DCP async {kind}"
        self.kind = kind
        self.stager, self.note = cached_stager(share_memory=kind == "process")

    def start(self, step: int) -> tuple[Callable[[], object] | None, Path]:
        from torch.distributed.checkpoint.state_dict_saver import (
            AsyncCheckpointerType,
            async_save,
        )

        path = self.fresh()
        kind = (
            AsyncCheckpointerType.THREAD if self.kind == "thread" else AsyncCheckpointerType.PROCESS
        )
        response = async_save(
            self.job.state_dicts(),
            checkpoint_id=str(path),
            process_group=self.job.dcp_group,
            async_checkpointer_type=kind,
            async_stager=self.stager,
        )
        future: Future[Any] = (
            response if isinstance(response, Future) else response.upload_completion
        )

        def finish() -> None:
            future.result()  # resolves on every rank once rank 0 wrote the metadata
            self.rank0_fsync(path)

        return finish, path

    def close(self) -> None:
        self.stager.close()


class TorchsnapshotWriter(Writer):
    name = "torchsnapshot"

    def __init__(self, job: Job) -> None:
        super().__init__(job, "torchsnapshot")

    def start(self, step: int) -> tuple[Callable[[], object] | None, Path]:
        import torchsnapshot

        path = self.fresh()
        pending = torchsnapshot.Snapshot.async_take(str(path), dict(self.job.state))

        def finish() -> None:
            pending.wait()
            self.rank0_fsync(path)  # its fs plugin does not fsync

        return finish, path


class TorchCheckpointingWriter(Writer):
    """torch-checkpointing 0.1.1's ``CheckpointManager`` (async: staging into shared memory in
    a thread, writing in a background process). ``save()`` returns before staging is done, so
    training must run ``optimizer.step()`` under ``manager.lock()``: that wait is stall too."""

    name = "torch-checkpointing"

    def __init__(self, job: Job) -> None:
        from torch_checkpointing import CheckpointManager
        from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

        super().__init__(job, "torch-checkpointing")
        # O_DIRECT writes fail on close on this ext4 (EINVAL, unaligned tail): buffered.
        self.manager = CheckpointManager(
            CheckpointManager.Config(
                storage_config=LocalFileSystemStorageConfig(use_direct_io=False)
            )
        )
        self.note = "buffered I/O (O_DIRECT fails here), fsync added"

    def start(self, step: int) -> tuple[Callable[[], object] | None, Path]:
        path = self.fresh()
        future = self.manager.save(str(path), self.job.state_dicts())
        assert future is not None

        def finish() -> None:
            future.result()
            self.rank0_fsync(path)  # it writes without fsync

        return finish, path

    def guard(self) -> contextlib.AbstractContextManager[Any]:
        return self.manager.lock()

    def close(self) -> None:
        self.manager.close()


# -- measuring one writer ----------------------------------------------------------------------


def new_record() -> Json:
    return {
        "first": None,
        "stall_s": [],  # drain runs: save() + waits on the writer's guard
        "call_s": [],  # drain runs: save() alone
        "lock_wait_s": [],
        "first_step_excess_s": [],
        "stall_idle_s": [],  # idle saves: save() + an immediate guard
        "committed_s": [],
        "committed_under_training_s": [],
        "drain": [],
        "drain_steps": [],
        "drain_s": [],
        "idle_step_ms": [],
        "bytes": [],
    }


@dataclass
class Plan:
    repeat: int
    between: int  # training steps between two saves
    idle_steps: int
    idle_seconds: float


def idle_save(job: Job, writer: Writer, plan: Plan) -> tuple[float, float, Path, int]:
    """``plan.between`` steps, then a save waited for with training paused:
    (stall, committed, path, bytes); the bytes are rank 0's count (0 elsewhere)."""
    job.steps(plan.between)
    job.barrier()
    started = time.perf_counter()
    finish, path = writer.start(job.steps_done)
    with writer.guard():  # torch-checkpointing: wait for its staging, as the next step would
        pass
    stall = time.perf_counter() - started
    committed = Waiter(finish, started).wait(job.timeout)
    stall, committed = job.max_over_ranks([stall, committed])
    job.barrier()
    size = disk_bytes(path) if job.rank == 0 else 0
    return stall, committed, path, size


def discard(job: Job, writer: Writer, path: Path) -> None:
    job.barrier()
    if writer.delete_old and job.rank == 0:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def measure_writer(job: Job, writer: Writer, plan: Plan, record: Json) -> tuple[Path, Json]:
    """First save, ``repeat`` idle saves, ``repeat`` drain runs; returns the kept checkpoint
    (the last idle save, state unchanged since) and its fingerprint."""
    tag = f"{writer.name} ({job.world} rank{'s' if job.world > 1 else ''})"
    stall, committed, path, size = idle_save(job, writer, plan)
    record["first"] = {"stall_s": stall, "committed_s": committed, "bytes": size}
    job.report()
    if job.rank == 0:
        log(f"{tag}: first save: stall {stall:.3f}s, committed {committed:.3f}s")
    discard(job, writer, path)
    kept: Path | None = None
    kept_print: dict[str, list[float]] = {}
    for repeat in range(plan.repeat):
        stall, committed, path, size = idle_save(job, writer, plan)
        record["stall_idle_s"].append(stall)
        record["committed_s"].append(committed)
        record["bytes"].append(size)
        job.report()
        if job.rank == 0:
            log(
                f"{tag} [{repeat + 1}/{plan.repeat}] idle save: stall {stall:.3f}s, "
                f"committed {committed:.3f}s, {size / 1e6:.1f} MB"
            )
        if repeat == plan.repeat - 1:
            kept, kept_print = path, fingerprint(job)
        else:
            discard(job, writer, path)
    if writer.asynchronous:
        for repeat in range(plan.repeat):
            job.steps(plan.between)
            before = job.idle_steps(plan.idle_steps, plan.idle_seconds)
            job.barrier()
            job.lock_wait = 0.0
            started = time.perf_counter()
            finish, path = writer.start(job.steps_done)
            call = time.perf_counter() - started
            waiter = Waiter(finish, started)
            times = job.drain(waiter)
            lock = job.lock_wait
            under_training = waiter.wait(job.timeout)
            after = job.idle_steps(plan.idle_steps, plan.idle_seconds)
            idle = (statistics.fmean(before) + statistics.fmean(after)) / 2
            ratio = statistics.fmean(times) / idle
            excess = times[0] - idle
            if isinstance(writer, TmlWriter):
                lock = writer.held_training_s()  # what its update hooks held training for
            values = job.max_over_ranks([call + lock, call, lock, excess, under_training, ratio])
            record["stall_s"].append(values[0])
            record["call_s"].append(values[1])
            record["lock_wait_s"].append(values[2])
            record["first_step_excess_s"].append(values[3])
            record["committed_under_training_s"].append(values[4])
            record["drain"].append(values[5])
            record["drain_steps"].append(len(times))
            record["drain_s"].append(sum(times))
            record["idle_step_ms"].append(idle * 1e3)
            job.report()
            if job.rank == 0:
                log(
                    f"{tag} [{repeat + 1}/{plan.repeat}] drain: stall {values[0]:.3f}s, "
                    f"drain {values[5]:.2f}x over {len(times)} steps (idle {idle * 1e3:.1f} ms), "
                    f"committed {values[4]:.3f}s"
                )
            discard(job, writer, path)
    else:
        record["stall_s"] = list(record["committed_s"])  # synchronous: all of it
    assert kept is not None
    return kept, {"path": str(kept), "fingerprint": kept_print}


def build_chain(job: Job, plan: Plan, deltas: int) -> Json:
    """A fresh incremental Snapshot: one full save, then ``deltas`` saves ``plan.between``
    steps apart (training paused while each commits). Its tip is restored later."""
    writer = TmlWriter(job, "tml chain", incremental=True, full_every=deltas + 1)
    out: Json = {"bytes": [], "committed_s": [], "stall_s": [], "kinds": []}
    try:
        for _ in range(deltas + 1):
            stall, committed, path, size = idle_save(job, writer, plan)
            out["bytes"].append(size)
            out["committed_s"].append(committed)
            out["stall_s"].append(stall)
        out["kinds"] = writer.links
        out["save_dir"] = str(writer.dir)
        out["tip"] = str(path)
        out["fingerprint"] = fingerprint(job)
    finally:
        writer.close()
    if job.rank == 0:
        log(
            f"tml chain: root {out['bytes'][0] / 1e6:.1f} MB, deltas median "
            f"{statistics.median(out['bytes'][1:]) / 1e6:.2f} MB ({deltas} saves after the root)"
        )
    return out


RESTORE_SOURCES = {
    "tml full": "tml full",
    "tml chain tip": "tml chain tip",
    "tml incremental": "tml incremental",
    "DCP load": "DCP save",
    "torchsnapshot restore": "torchsnapshot",
    "torch-checkpointing load": "torch-checkpointing",
}


def make_writer(job: Job, name: str, plan: Plan) -> Writer:
    if name == "tml full":
        return TmlWriter(job, "tml full", incremental=False)
    if name == "tml incremental":
        # No full save forced inside the measured saves (first + idle + drain runs).
        return TmlWriter(job, name, incremental=True, full_every=2 * plan.repeat + 2)
    if name == "DCP save":
        return DcpSaveWriter(job)
    if name in DCP_ASYNC:
        return DcpAsyncWriter(job, name.rsplit(" ", 1)[1])
    if name == "torchsnapshot":
        return TorchsnapshotWriter(job)
    if name == "torch-checkpointing":
        return TorchCheckpointingWriter(job)
    raise ValueError(name)


def run_writer(
    job: Job, name: str, plan: Plan, chain_deltas: int, record: Json, kept: Json
) -> None:
    """One writer: the measurements, then (``tml incremental``) the chain for its restore."""
    writer = make_writer(job, name, plan)
    job.guard = writer.guard  # torch-checkpointing: optimizer.step() under its lock
    if writer.note:
        record["note"] = writer.note
    _, info = measure_writer(job, writer, plan, record)
    kept[name] = {**info, "save_dir": str(writer.dir)}
    if isinstance(writer, TmlWriter):
        record["links"] = list(writer.links)
    writer.close()
    job.guard = contextlib.nullcontext
    if name == "tml incremental" and chain_deltas > 0:
        chain = build_chain(job, plan, chain_deltas)
        record["chain"] = {k: chain[k] for k in ("bytes", "committed_s", "stall_s", "kinds")}
        kept["tml chain tip"] = {
            "path": chain["tip"],
            "save_dir": chain["save_dir"],
            "fingerprint": chain["fingerprint"],
        }


def run_restore(job: Job, name: str, kept: Json, plan: Plan, entry: Json, label: str) -> None:
    """Restore one kept checkpoint ``repeat`` times (state overwritten before, compared with
    the save-time fingerprint after); seconds are the slowest rank's, between barriers."""
    info = kept[RESTORE_SOURCES[name]]
    action = restore_action(job, name, info)
    for repeat in range(plan.repeat):
        scramble(job)
        if repeat == 0:
            entry["scramble_effective"] = not same_state(fingerprint(job), info["fingerprint"])
        job.barrier()
        started = time.perf_counter()
        action()
        seconds = time.perf_counter() - started
        job.barrier()
        entry["s"].append(job.max_over_ranks([seconds])[0])
        entry["verified"] &= same_state(fingerprint(job), info["fingerprint"])
        if job.rank == 0:
            log(
                f"restore {label} {name} [{repeat + 1}/{plan.repeat}]: {entry['s'][-1]:.3f}s, "
                f"state equal: {entry['verified']}"
            )


def error_file(work: Path, task: str, rank: int) -> Path:
    slug = "".join(c if c.isalnum() else "-" for c in task)
    return work / "errors" / f"{slug}.rank{rank}.txt"


def run_tasks(job: Job, config: Json, out: Json, out_path: Path, plan: Plan, label: str) -> None:
    """Run the writers and restores named in ``config["tasks"]``, in order.

    Rank 0 rewrites ``out_path`` after each task and sample, so a job that dies keeps what it
    measured. A task that fails in a multi-rank job ends the job: the failing rank writes its
    error to a file and exits, torchrun ends the other ranks (which may be stuck in a collective
    the failing rank never joined), and the driver starts a fresh job for the remaining tasks.
    A 1-process job records the failure and goes on.
    """
    kept: Json = out.setdefault("kept", {})
    if config.get("kept_file"):
        kept.update(json.loads(Path(config["kept_file"]).read_text()))
    out.setdefault("writers", {})
    restores: Json = out.setdefault("restores", {}).setdefault(label, {})
    out.setdefault("done", [])

    def report() -> None:
        if job.rank == 0:
            write_json(out_path, out)

    job.report = report
    for task in config["tasks"]:
        job.guard = contextlib.nullcontext
        started = time.perf_counter()
        restore = task.startswith("restore ")
        name = task.removeprefix("restore ")
        if restore and RESTORE_SOURCES[name] not in kept:
            out["done"].append(task)  # nothing to restore (its writer failed or did not run)
            continue
        if restore:
            holder: Json = {"s": [], "verified": True, "scramble_effective": True}
            restores[name] = holder
        else:
            holder = new_record()
            out["writers"][name] = holder
        report()
        try:
            if restore:
                run_restore(job, name, kept, plan, holder, label)
            else:
                run_writer(job, name, plan, int(config["chain_deltas"]), holder, kept)
                holder["seconds"] = round(time.perf_counter() - started, 1)
        except Exception as failure:
            error = describe(failure)
            holder["error"] = error
            log(f"{task}: FAILED on rank {job.rank}: {error}")
            traceback.print_exc(file=sys.stderr)
            if job.world > 1:
                path = error_file(Path(config["work"]), f"{config['job']} {task}", job.rank)
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(error)
                report()
                sys.stderr.flush()
                os._exit(3)  # see the docstring: the other ranks are ended by torchrun
        out["done"].append(task)
        report()
    report()


def gather(job: Job, payload: Json) -> list[Json]:
    import torch.distributed as dist

    if job.world == 1:
        return [payload]
    out: list[Any] = [None] * job.world
    dist.all_gather_object(out, payload, group=job.control)
    return out


def note_pid(config: Json) -> None:
    """So the driver can remove staging blocks a killed rank left in /dev/shm."""
    pids = Path(config["work"]) / "pids"
    pids.mkdir(parents=True, exist_ok=True)
    (pids / str(os.getpid())).touch()


def restore_action(job: Job, name: str, info: Json) -> Callable[[], None]:
    path = info["path"]
    if name.startswith("tml"):
        from tml_checkpointing import Snapshot

        def tml() -> None:
            snapshot = Snapshot(info["save_dir"], job.state)
            try:
                snapshot.restore(path, verify="full")
            finally:
                snapshot.close()

        return tml
    if name == "DCP load":
        from torch.distributed.checkpoint.state_dict_loader import load

        def dcp_load() -> None:
            loaded = job.state_dicts()
            load(loaded, checkpoint_id=path)  # reshards when the world size differs
            for key, value in job.state.items():
                value.load_state_dict(loaded[key])

        return dcp_load
    if name == "torchsnapshot restore":
        import torchsnapshot

        return lambda: torchsnapshot.Snapshot(path).restore(dict(job.state))
    if name == "torch-checkpointing load":
        from torch_checkpointing import CheckpointManager
        from torch_checkpointing.config import SyncCheckpointSaverConfig
        from torch_checkpointing.storage.filesystem import LocalFileSystemStorageConfig

        def tc_load() -> None:
            # A synchronous manager: loading needs no writer process (an async one would
            # spawn it here, seconds that are no part of a restore).
            manager = CheckpointManager(
                CheckpointManager.Config(
                    save=SyncCheckpointSaverConfig(),
                    storage_config=LocalFileSystemStorageConfig(use_direct_io=False),
                )
            )
            try:
                loaded = manager.load(path, into=job.state_dicts())  # in place
                for key, value in job.state.items():
                    value.load_state_dict(loaded[key])
            finally:
                manager.close()

        return tc_load
    raise ValueError(name)


# -- the jobs ----------------------------------------------------------------------------------


def init_distributed(timeout: float) -> tuple[int, int, Any]:
    """Training group from torchrun's environment; a long-timeout group for bookkeeping."""
    import torch.distributed as dist

    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=timeout))
    control = dist.new_group(backend="gloo", timeout=datetime.timedelta(seconds=4 * timeout))
    return dist.get_rank(), dist.get_world_size(), control


def sharded_job(
    config: Json, rank: int, world: int, control: Any, dcp_group: Any, work: Path
) -> Job:
    """The TorchRec ranking recipe, sized by the flags; batch 512 per rank, Zipf ids."""
    import torch

    sys.path.insert(0, str(ROOT))
    from recipes.base import RecipeParams
    from recipes.torchrec_ranking import SparseFeature, TorchRecRankingSizes, build_recipe

    sizes = TorchRecRankingSizes(
        features=tuple(
            SparseFeature(f"f{i}", int(config["table_rows"])) for i in range(config["tables"])
        ),
        embedding_dim=int(config["dim"]),
        dense_features=16,
        hidden=(512, 256),
        train_examples=int(config["examples"]),
        plan="row",
    )
    batch = int(config["batch"])
    recipe = build_recipe(RecipeParams(seed=0, batch_size=batch, lr=1e-3), sizes)
    model, optimizer = recipe.model, recipe.optimizer
    per_epoch = max(1, sizes.train_examples // (batch * world))
    job: Job

    def step(guarded: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        index = job.steps_done
        data = recipe.train_batch(index // per_epoch, index % per_epoch)
        optimizer.zero_grad(set_to_none=True)
        loss = recipe.loss(model, data)
        torch.autograd.backward(loss)
        with guarded():
            optimizer.step()

    job = Job(
        rank=rank,
        world=world,
        state={"model": model, "optimizer": optimizer},
        step_fn=step,
        work=work,
        control=control,
        dcp_group=dcp_group,
        timeout=float(config["save_timeout"]),
    )
    job.steps(2)  # optimizer state exists, first-step costs paid
    count_bytes(job)
    return job


def sharded_worker(config: Json, out_path: Path) -> None:
    """N ranks: the writers and the N->N restores named in ``config["tasks"]``."""
    import torch.distributed as dist

    note_pid(config)
    rank, world, control = init_distributed(float(config["collective_timeout"]))
    # DCP's own group: on the training group its background collectives deadlock training's.
    dcp_group = dist.new_group(
        backend="gloo", timeout=datetime.timedelta(seconds=float(config["collective_timeout"]))
    )
    work = Path(config["work"]) / "sharded"
    if rank == 0:
        work.mkdir(parents=True, exist_ok=True)
    dist.barrier(group=control)
    built = time.perf_counter()
    job = sharded_job(config, rank, world, control, dcp_group, work)
    out: Json = {
        "world": world,
        "local_bytes": [p["local"] for p in gather(job, {"local": job.local_bytes})],
        "total_bytes": job.total_bytes,
        "build_s": round(time.perf_counter() - built, 1),
    }
    if rank == 0:
        local = [round(b / GIB, 3) for b in out["local_bytes"]]
        log(f"sharded state: {job.total_bytes / GIB:.3f} GiB, per rank {local} GiB")
    plan = Plan(
        int(config["repeat"]),
        int(config["between"]),
        int(config["idle_steps"]),
        float(config["idle_seconds"]),
    )
    run_tasks(job, config, out, out_path, plan, f"{world}->{world}")
    dist.barrier(group=control)
    dist.destroy_process_group()


def restore1_worker(config: Json, out_path: Path) -> None:
    """1 rank, same model: restore the N-rank checkpoints (N->1)."""
    import torch.distributed as dist

    note_pid(config)
    rank, world, control = init_distributed(float(config["collective_timeout"]))
    job = sharded_job(config, rank, world, control, None, Path(config["work"]) / "restore1")
    out: Json = {"world": world, "local_bytes": [job.local_bytes], "total_bytes": job.total_bytes}
    plan = Plan(int(config["repeat"]), 5, 1, 0.0)
    run_tasks(job, config, out, out_path, plan, f"{config['ranks']}->{world}")
    dist.destroy_process_group()


def first_worker(config: Json, out_path: Path) -> None:
    """A freshly started rank process: build, train 5 steps, one save, until committed."""
    import torch.distributed as dist

    from tml_checkpointing import Snapshot

    note_pid(config)
    rank, world, control = init_distributed(float(config["collective_timeout"]))
    work = Path(config["work"]) / f"first-{config['label']}"
    job = sharded_job(config, rank, world, control, None, work)
    job.steps(3)
    snapshot = Snapshot(str(work / "tml"), job.state)
    job.barrier()
    started = time.perf_counter()
    pending = snapshot.save(job.steps_done)
    stall = time.perf_counter() - started
    pending.wait()
    committed = time.perf_counter() - started
    stall, committed = job.max_over_ranks([stall, committed])
    snapshot.close()
    if rank == 0:
        result = {
            "stall_s": stall,
            "committed_s": committed,
            "load_1min": os.getloadavg()[0],
            "world": world,
            "local_bytes": job.local_bytes,
        }
        write_json(out_path, result)
        log(f"first save ({config['label']}): stall {stall:.3f}s, committed {committed:.3f}s")
    dist.barrier(group=control)
    dist.destroy_process_group()


def single_worker(config: Json, out_path: Path) -> None:
    """One process (no torchrun): an MLP + Adam of ``single_mb`` MiB, every writer; a 1-rank
    gloo group (``file://``: DCP's writer process would bind ``MASTER_PORT`` again)."""
    import torch
    import torch.distributed as dist

    note_pid(config)
    work = Path(config["work"]) / "single"
    work.mkdir(parents=True, exist_ok=True)
    dist.init_process_group("gloo", init_method=f"file://{work / 'pg-store'}", rank=0, world_size=1)
    torch.manual_seed(0)
    width = 1024
    params = int(config["single_mb"]) * 2**20 // 12  # weights + Adam's two moments
    layers: list[torch.nn.Module] = []
    for _ in range(max(1, round(params / (width * width + width)))):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4)
    inputs = torch.randn(16, width)

    def step(guarded: Callable[[], contextlib.AbstractContextManager[None]]) -> None:
        optimizer.zero_grad(set_to_none=True)
        model(inputs).square().mean().backward()
        with guarded():
            optimizer.step()

    job = Job(
        rank=0,
        world=1,
        state={"model": model, "optimizer": optimizer},
        step_fn=step,
        work=work,
        control=dist.group.WORLD,
        dcp_group=None,
        timeout=float(config["save_timeout"]),
    )
    job.steps(2)
    count_bytes(job)
    out: Json = {
        "world": 1,
        "local_bytes": [job.local_bytes],
        "total_bytes": job.total_bytes,
        "layers": len(layers) // 2,
    }
    log(f"1 process: MLP+Adam {job.total_bytes / GIB:.3f} GiB ({len(layers) // 2} layers)")
    plan = Plan(int(config["repeat"]), 2, int(config["single_idle_steps"]), 1.0)
    run_tasks(job, {**config, "chain_deltas": 0}, out, out_path, plan, "1->1")
    dist.destroy_process_group()


# -- driver ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class JobRun:
    result: Json | None
    error: str | None
    seconds: float


def run_job(
    mode: str, ranks: int | None, config: Json, work: Path, timeout: float, label: str
) -> JobRun:
    """One worker job (torchrun with ``ranks``, or plain Python when ``ranks`` is None); its
    ``[bench]`` lines are shown as they come, everything goes to a log file; on timeout the
    whole process group (its ranks and their writer processes) is killed."""
    out = work / f"{label}.json"
    log_path = work / f"{label}.log"
    script = [
        str(Path(__file__).resolve()),
        "--worker",
        mode,
        "--config",
        json.dumps(config),
        "--out",
        str(out),
    ]
    if ranks is None:
        command = [sys.executable, *script]
    else:
        command = [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc-per-node",
            str(ranks),
            "--master-addr",
            "127.0.0.1",
            "--master-port",
            str(free_port()),
            *script,
        ]
    # One compute thread per training process (as bench_torchrec): 2 ranks on 2 cores, and on a
    # shared box OpenMP's spinning threads otherwise turn other people's load into 10x steps.
    env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    started = time.perf_counter()
    proc = subprocess.Popen(
        command,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)

    timer = threading.Timer(timeout, kill)
    timer.start()
    tail: list[str] = []
    task_failed = False  # a task's own failure (reported by its rank): no need for the tail
    try:
        assert proc.stdout is not None
        with open(log_path, "w") as log_file:
            for line in proc.stdout:
                log_file.write(line)
                tail = [*tail, line][-60:]
                task_failed = task_failed or "FAILED on rank" in line
                if "[bench]" in line:
                    sys.stderr.write("  " + line[line.index("[bench]") :])
                    sys.stderr.flush()
        proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            kill()
            proc.wait()
        # Writer processes a rank left behind (same session): end them too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
        remove_orphan_blocks(work)
    seconds = time.perf_counter() - started
    result = json.loads(out.read_text()) if out.exists() else None
    error = None
    if timed_out.is_set():
        error = f"job killed after its {timeout:.0f}s timeout (partial results kept)"
    elif proc.returncode != 0:
        reason = next((ln.strip() for ln in reversed(tail) if "Error" in ln), "")
        error = f"job exited with status {proc.returncode}: {reason[:300]}"
    if error:
        log(f"{label}: {error}")
        if not task_failed:  # unexpected: show why
            sys.stderr.write("".join(tail[-25:]))
    return JobRun(result, error, seconds)


def remove_orphan_blocks(work: Path) -> None:
    """Staging blocks in /dev/shm named after a rank process of ours that is gone (killed
    before it could free them). Blocks of live processes, and anyone else's, are left alone."""
    pids = work / "pids"
    if not pids.is_dir():
        return
    for marker in pids.iterdir():
        pid = int(marker.name)
        if Path(f"/proc/{pid}").exists():
            continue
        for block in Path("/dev/shm").glob(f"tml-staging-{pid}-*"):
            with contextlib.suppress(OSError):
                block.unlink()
        marker.unlink()


def run_tasks_job(
    mode: str,
    ranks: int,
    tasks: list[str],
    config: Json,
    work: Path,
    timeout: float,
    label: str,
    restore_label: str,
) -> tuple[Json | None, list[Json]]:
    """Run ``tasks`` in jobs of ``ranks`` ranks: after a job ends on a failed task (see
    :func:`run_tasks`), that task is recorded as failed and a fresh job runs the rest."""
    kept_file = work / "kept.json"  # checkpoints kept by earlier jobs, for restore tasks
    kept = json.loads(kept_file.read_text()) if kept_file.exists() else {}
    merged: Json = {"writers": {}, "restores": {}, "kept": kept}
    have_result = False
    remaining = list(tasks)
    jobs: list[Json] = []
    for attempt in range(1, len(tasks) + 2):
        if not remaining:
            break
        write_json(kept_file, merged["kept"])
        cfg = {**config, "tasks": remaining, "kept_file": str(kept_file), "job": mode}
        run = run_job(mode, ranks, cfg, work, timeout, f"{label}-{attempt}")
        jobs.append(
            {"tasks": list(remaining), "seconds": round(run.seconds, 1), "error": run.error}
        )
        result = run.result or {}
        if result:
            have_result = True
            for key in ("world", "local_bytes", "total_bytes", "build_s"):
                if key in result:
                    merged[key] = result[key]
            merged["writers"].update(result.get("writers", {}))
            for block, entries in result.get("restores", {}).items():
                merged["restores"].setdefault(block, {}).update(entries)
            merged["kept"].update(result.get("kept", {}))
        done = set(result.get("done", []))
        remaining = [task for task in remaining if task not in done]
        if run.error is None or not remaining:
            break
        failed = remaining.pop(0)
        name = failed.removeprefix("restore ")
        pattern = error_file(work, f"{mode} {failed}", 0).name.replace(".rank0.", ".rank*.")
        errors = sorted({p.read_text() for p in (work / "errors").glob(pattern)})
        message = errors[0] if errors else run.error
        if failed.startswith("restore "):
            entry = (
                merged["restores"]
                .setdefault(restore_label, {})
                .setdefault(name, {"s": [], "verified": False, "scramble_effective": True})
            )
        else:
            entry = merged["writers"].setdefault(name, new_record())
        entry["error"] = message
        jobs[-1]["failed_task"] = failed
        log(f"{failed}: failed ({message}); {len(remaining)} task(s) left for a fresh job")
    write_json(kept_file, merged["kept"])
    return (merged if have_result else None), jobs


@contextlib.contextmanager
def busy_load(count: int) -> Iterator[list[int]]:
    """``count`` x ``yes > /dev/null``, killed (by pid) whatever happens."""
    procs = [
        subprocess.Popen(["yes"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        for _ in range(count)
    ]
    try:
        time.sleep(1.0)
        yield [p.pid for p in procs]
    finally:
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait()


# -- summary -----------------------------------------------------------------------------------


def spread(values: list[float], digits: int = 4) -> Json | None:
    values = [v for v in values if v is not None and math.isfinite(v)]
    if not values:
        return None
    return {
        "median": round(statistics.median(values), digits),
        "min": round(min(values), digits),
        "max": round(max(values), digits),
        "n": len(values),
    }


def med(entry: Json | None, key: str) -> float | None:
    if not entry or entry.get(key) is None:
        return None
    value: float = entry[key]["median"] if isinstance(entry[key], dict) else entry[key]
    return value


def summarise_world(result: Json | None, job_error: str | None, writers: list[str]) -> Json:
    """Per writer: medians (and min/max) of what its job recorded."""
    if result is None:
        return {"error": job_error or "no result"}
    local_gib = max(result["local_bytes"]) / GIB
    out: Json = {
        "total_gib": round(result["total_bytes"] / GIB, 4),
        "local_gib_per_rank": [round(b / GIB, 4) for b in result["local_bytes"]],
        "writers": {},
    }
    if job_error:
        out["job_error"] = job_error
    for name in writers:
        record = result["writers"].get(name)
        if record is None:
            if job_error:
                out["writers"][name] = {"error": f"not reached: {job_error}"}
            continue
        stall = spread(record["stall_s"])
        entry: Json = {
            "stall_s": stall,
            "stall_s_per_gib_local": (
                round(stall["median"] / local_gib, 4) if stall and local_gib else None
            ),
            "save_call_s": spread(record["call_s"]),
            "lock_wait_s": spread(record["lock_wait_s"]),
            "first_step_excess_s": spread(record["first_step_excess_s"]),
            "stall_idle_save_s": spread(record["stall_idle_s"]),
            "drain_slowdown": spread(record["drain"], 3),
            "drain_steps": record["drain_steps"],
            "idle_step_ms": [round(v, 2) for v in record["idle_step_ms"]],
            "committed_s": spread(record["committed_s"]),
            "committed_under_training_s": spread(record["committed_under_training_s"]),
            "bytes": int(statistics.median(record["bytes"])) if record["bytes"] else None,
            "first_save": (
                {k: round(v, 4) for k, v in record["first"].items()} if record["first"] else None
            ),
            "seconds": record.get("seconds"),
        }
        if name not in SYNCHRONOUS and not record["stall_s"]:
            entry["stall_s"] = None
        if name in SYNCHRONOUS:
            entry["note"] = "synchronous: the stall is the whole save"
        if record.get("links"):
            entry["save_kinds"] = record["links"]
        if record.get("chain"):
            chain = record["chain"]
            deltas = chain["bytes"][1:]
            entry["chain"] = {
                "root_bytes": chain["bytes"][0],
                "delta_bytes": deltas,
                "delta_bytes_median": int(statistics.median(deltas)) if deltas else None,
                "delta_committed_s": spread(chain["committed_s"][1:]),
                "delta_stall_s": spread(chain["stall_s"][1:]),
                "kinds": chain["kinds"],
            }
        if record.get("note"):
            entry["note"] = (entry.get("note", "") + "; " + record["note"]).strip("; ")
        if record.get("error"):
            entry["error"] = record["error"]
        out["writers"][name] = entry
    return out


def summarise_restores(result: Json | None, job_error: str | None, total_bytes: int) -> Json:
    if result is None:
        return {"error": job_error or "no result"}
    out: Json = {}
    for label, entries in result.get("restores", {}).items():
        block: Json = {}
        for name, entry in entries.items():
            seconds = spread(entry["s"])
            block[name] = {
                "seconds": seconds,
                "gb_per_s": round(total_bytes / 1e9 / seconds["median"], 3) if seconds else None,
                "verified": entry["verified"] if entry["s"] else None,
                "scramble_effective": entry["scramble_effective"],
            }
            if entry.get("error"):
                block[name]["error"] = entry["error"]
        out[label] = block
    if job_error:
        out["job_error"] = job_error
    return out


@dataclass
class Target:
    name: str
    value: float | None
    limit: float
    ratio: float | None
    met: bool | None
    detail: str = ""


def targets(report: Json) -> list[Target]:
    """Issue 19's targets, each as value vs limit (ratio = value / limit; <= 1 is met, except
    throughput checks, stated as time ratios so <= 1 is met there too)."""
    out: list[Target] = []

    def add(name: str, value: float | None, limit: float | None, detail: str = "") -> None:
        if detail == "vs ":
            detail = "no peer figure"
        if value is None or limit is None or limit <= 0:
            out.append(Target(name, value, limit or 0.0, None, None, detail))
            return
        out.append(Target(name, value, limit, value / limit, value <= limit, detail))

    sharded = report.get("2 ranks", {}).get("writers", {})

    def best(names: tuple[str, ...] | list[str], key: str, table: Json) -> tuple[float | None, str]:
        found = [
            (med(table.get(n), key), n)
            for n in names
            if table.get(n) and not table[n].get("error") and med(table.get(n), key) is not None
        ]
        found = [(v, n) for v, n in found if v is not None]
        if not found:
            return None, ""
        value, name = min(found)
        return value, name

    for ours in OURS:
        entry = sharded.get(ours)
        if not entry or entry.get("error"):
            add(f"2 ranks {ours}: measured", None, None, (entry or {}).get("error", "missing"))
            continue
        dcp_stall, dcp_name = best(DCP_ASYNC, "stall_s", sharded)
        add(
            f"2 ranks {ours}: save() stall <= 0.5x DCP async's",
            med(entry, "stall_s"),
            None if dcp_stall is None else 0.5 * dcp_stall,
            f"vs {dcp_name}",
        )
        add(
            f"2 ranks {ours}: stall <= 0.15 s/GiB of local state",
            entry.get("stall_s_per_gib_local"),
            0.15,
        )
        add(f"2 ranks {ours}: drain <= 1.5x idle step", med(entry, "drain_slowdown"), 1.5)
        dcp_drain, dcp_name = best(DCP_ASYNC, "drain_slowdown", sharded)
        add(
            f"2 ranks {ours}: drain <= DCP async's",
            med(entry, "drain_slowdown"),
            dcp_drain,
            f"vs {dcp_name}",
        )
        dcp_save = med(sharded.get("DCP save"), "committed_s")
        add(
            f"2 ranks {ours}: committed <= 1.2x DCP save+fsync",
            med(entry, "committed_s"),
            None if dcp_save is None else 1.2 * dcp_save,
        )
    incremental = sharded.get("tml incremental", {})
    full_bytes = (sharded.get("tml full") or {}).get("bytes")
    delta = (incremental.get("chain") or {}).get("delta_bytes_median")
    add(
        "2 ranks: incremental bytes <= 0.10x full (5 steps apart)",
        None if delta is None or not full_bytes else delta / full_bytes,
        0.10,
        "median delta of the 10-delta chain / tml full",
    )
    restores = report.get("restores", {})
    r22 = restores.get("2->2", {})
    full_restore = med(r22.get("tml full"), "seconds")
    tip = r22.get("tml chain tip")
    add(
        "2->2: 10-delta tip restore <= 1.6x full restore",
        med(tip, "seconds"),
        None if full_restore is None else 1.6 * full_restore,
    )
    for label in ("2->2", "2->1"):
        block = restores.get(label, {})
        ours_entry, dcp = block.get("tml full"), block.get("DCP load")
        verified = bool(ours_entry and ours_entry.get("verified"))
        add(
            f"{label}: verified restore throughput >= DCP load (time ratio)",
            med(ours_entry, "seconds") if verified else None,
            med(dcp, "seconds"),
            "" if verified or not ours_entry else "restored state differs",
        )
    first = report.get("first_save", {})
    add(
        "first save of a fresh process committed <= 1 s (idle)",
        (first.get("idle") or {}).get("committed_s"),
        1.0,
    )
    add(
        "first save of a fresh process committed <= 5 s (busy: 2x yes)",
        (first.get("busy") or {}).get("committed_s"),
        5.0,
        "" if first.get("busy") else "run with --busy",
    )
    single = report.get("1 process", {}).get("writers", {})
    ours1 = single.get("tml full")
    peers = [n for n in WRITERS if n not in OURS]
    asynchronous_peers = [n for n in peers if n not in SYNCHRONOUS]
    if ours1 and not ours1.get("error"):
        for key, names, label in (
            ("stall_s", asynchronous_peers, "steady-state stall"),
            ("drain_slowdown", asynchronous_peers, "drain slowdown"),
            ("committed_s", peers, "committed"),
        ):
            value, name = best(names, key, single)
            add(f"1 process: tml full {label} <= best peer", med(ours1, key), value, f"vs {name}")
        firsts: dict[str, float] = {}
        for peer in asynchronous_peers:
            entry = single.get(peer) or {}
            stall = (entry.get("first_save") or {}).get("stall_s")
            if stall is not None and not entry.get("error"):
                firsts[peer] = float(stall)
        name = min(firsts, key=firsts.__getitem__) if firsts else ""
        add(
            "1 process: tml full first-save stall <= best peer",
            (ours1.get("first_save") or {}).get("stall_s"),
            firsts.get(name),
            f"vs {name}",
        )
        r11 = restores.get("1->1", {})
        peer_restores = [
            n
            for n in ("DCP load", "torchsnapshot restore", "torch-checkpointing load")
            if r11.get(n) and r11[n].get("verified")
        ]
        value, name = best(peer_restores, "seconds", r11)
        verified = bool(r11.get("tml full", {}).get("verified"))
        add(
            "1 process: tml full verified restore time <= best peer",
            med(r11.get("tml full"), "seconds") if verified else None,
            value,
            f"vs {name}",
        )
    else:
        add("1 process: tml full measured", None, None, (ours1 or {}).get("error", "missing"))
    return out


# -- output ------------------------------------------------------------------------------------


def fmt(value: float | None, unit: str = "s", digits: int = 2) -> str:
    return "—" if value is None else f"{value:.{digits}f}{unit}"


RESTORE_OF = {
    "tml full": "tml full",
    "tml incremental": "tml chain tip",
    "DCP save": "DCP load",
    "torchsnapshot": "torchsnapshot restore",
    "torch-checkpointing": "torch-checkpointing load",
}


def restore_cell(block: Json | None, writer: str, world_label: str) -> str:
    if world_label == "1 process" and writer == "tml incremental":
        name = "tml incremental"
    else:
        name = RESTORE_OF.get(writer, "")
    entry = (block or {}).get(name)
    if not entry:
        return ""
    if entry.get("error"):
        return "failed"
    text = f"{fmt(med(entry, 'seconds'))} ({entry['gb_per_s']:.2f} GB/s)"
    return text + ("" if entry.get("verified") else " NOT EQUAL")


SHORT_NOTES = (
    ("BlockingAsyncStager", "unpinned cached stager"),
    ("buffered I/O", "buffered I/O + fsync"),
    ("synchronous", "synchronous"),
)


def short_note(note: str, footnotes: dict[str, str]) -> str:
    """Long notes become a few words and a footnote mark (the text is printed below)."""
    parts = []
    for part in filter(None, note.split("; ")):
        short = next((text for prefix, text in SHORT_NOTES if part.startswith(prefix)), None)
        if short is None:
            parts.append(part)
            continue
        mark = footnotes.setdefault(part, "*" * (len(footnotes) + 1))
        parts.append(short + mark)
    return "; ".join(parts)


def print_report(report: Json) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=220, stderr=False)
    cfg = report["config"]
    restores = report.get("restores", {})
    for world_label, restore_labels in (("2 ranks", ("2->2", "2->1")), ("1 process", ("1->1",))):
        block = report.get(world_label)
        if not block:
            continue
        if block.get("error"):
            console.print(f"{world_label}: {block['error']}")
            continue
        if world_label == "2 ranks":
            title = (
                f"2 ranks: TorchRec DMP {cfg['tables']} x {cfg['table_rows']:,} x "
                f"{cfg['dim']} fp32, row-wise, RowWiseAdagrad + Adam; "
                f"{block['total_gib']:.3f} GiB, {max(block['local_gib_per_rank']):.3f} GiB/rank"
            )
        else:
            title = f"1 process: MLP + Adam, {block['total_gib']:.3f} GiB"
        title += f" — medians of {cfg['repeat']} (min/max: JSON)"
        table = Table(title=title, title_justify="left")
        footnotes: dict[str, str] = {}
        columns = [
            "writer",
            "stall",
            "stall/GiB",
            "1st step +",
            "drain",
            "committed",
            "committed (training)",
            "bytes",
            "first save",
            *[f"restore {r}" for r in restore_labels],
            "note",
        ]
        for column in columns:
            left = column in ("writer", "note")
            table.add_column(column, justify="left" if left else "right", no_wrap=column != "note")
        full_bytes = (block["writers"].get("tml full") or {}).get("bytes")
        for name in WRITERS:
            entry = block["writers"].get(name)
            label = f"[bold]{name}[/bold]" if name in OURS else name
            if entry is None:
                why = "1 process only" if name == "torch-checkpointing" else "not measured"
                table.add_row(label, *[""] * (len(columns) - 2), why)
                continue
            if entry.get("error") and not entry.get("committed_s"):
                table.add_row(label, *["—"] * (len(columns) - 2), f"FAILED: {entry['error']}")
                continue
            size = entry.get("bytes")
            chain = entry.get("chain")
            if chain and chain.get("delta_bytes_median") is not None:
                size = chain["delta_bytes_median"]
            bytes_cell = "—" if size is None else f"{size / 1e6:.1f} MB"
            if size and full_bytes and name != "tml full":
                bytes_cell += f" ({size / full_bytes:.2f}x)"
            first = entry.get("first_save") or {}
            first_cell = (
                f"{fmt(first.get('stall_s'))} / {fmt(first.get('committed_s'))}" if first else ""
            )
            note = short_note(entry.get("note", ""), footnotes)
            if chain:
                note = f"{note}; bytes: median of {len(chain['delta_bytes'])} deltas".strip("; ")
            if entry.get("error"):
                note = f"FAILED later: {entry['error'][:70]}; {note}".strip("; ")
            table.add_row(
                label,
                fmt(med(entry, "stall_s"), "s", 3),
                fmt(entry.get("stall_s_per_gib_local"), "s", 3),
                fmt(med(entry, "first_step_excess_s"), "s", 3),
                fmt(med(entry, "drain_slowdown"), "x"),
                fmt(med(entry, "committed_s")),
                fmt(med(entry, "committed_under_training_s")),
                bytes_cell,
                first_cell,
                *[restore_cell(restores.get(r), name, world_label) for r in restore_labels],
                note,
            )
        console.print(table)
        for text, mark in footnotes.items():
            console.print(f"  {mark} {text}", highlight=False, markup=False)
        for label in restore_labels:
            for name, entry in (restores.get(label) or {}).items():
                if entry.get("error"):
                    message = f"  restore {label} {name} FAILED: {entry['error']}"
                    console.print(message, highlight=False, markup=False)
    first = report.get("first_save", {})
    if first:
        parts = []
        for label in ("idle", "busy"):
            entry = first.get(label)
            if entry:
                if entry.get("error"):
                    parts.append(f"{label}: FAILED {entry['error']}")
                else:
                    parts.append(
                        f"{label}: stall {fmt(entry['stall_s'], digits=3)}, committed "
                        f"{fmt(entry['committed_s'], digits=3)} (load {entry['load_1min']:.1f})"
                    )
        console.print("First save of a fresh 2-rank job (tml full): " + "; ".join(parts))
    console.print("\nTargets (ratio = value / limit; met when <= 1):")
    for target in report.get("targets", []):
        detail = f" ({target['detail']})" if target["detail"] else ""
        if target["met"] is None:
            line = f"  ? {target['name']}: not measured{detail}"
        else:
            mark = "✓" if target["met"] else "✗"
            line = (
                f"  {mark} {target['name']}: {target['value']:.4g} vs limit {target['limit']:.4g}"
                f" = {target['ratio']:.2f}x{detail}"
            )
        console.print(line, highlight=False, markup=False)
    console.print(
        f"\n{report['machine']['cpus']} CPUs shared by the ranks, their writers and other users' "
        "runs; restores from a warm page cache. Compare ratios within this run."
    )


# -- main --------------------------------------------------------------------------------------


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        epilog="See the module docstring and docs/benchmarks-sharded.md.",
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small tables (4 x 50,000 x 64), 128 MiB MLP, 1 repeat: ~2 min",
    )
    parser.add_argument("--table-rows", type=int, default=None, help="default 400,000")
    parser.add_argument("--tables", type=int, default=4)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument(
        "--steps",
        type=int,
        default=None,
        help="training steps between two saves in the sharded job (default 5)",
    )
    parser.add_argument("--repeat", type=int, default=None, help="default 3 (1 with --quick)")
    parser.add_argument("--single-mb", type=int, default=None, help="1-process MLP+Adam MiB (1024)")
    parser.add_argument("--chain-deltas", type=int, default=10)
    parser.add_argument(
        "--busy",
        action="store_true",
        help="also time a fresh process's first save under 2x `yes > /dev/null`",
    )
    parser.add_argument("--writers", default=",".join(WRITERS), help="comma-separated subset")
    parser.add_argument(
        "--phases", default=",".join(PHASES), help="comma-separated subset of " + ", ".join(PHASES)
    )
    parser.add_argument("--ranks", type=int, default=2)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument(
        "--save-timeout",
        type=float,
        default=300.0,
        help="seconds one save may take before it counts as failed",
    )
    parser.add_argument(
        "--job-timeout",
        type=float,
        default=None,
        help="seconds per job (default 2400; 600 with --quick)",
    )
    parser.add_argument(
        "--json",
        nargs="?",
        const=str(RESULTS),
        default=None,
        metavar="PATH",
        help=f"write the report as JSON (default path {RESULTS.relative_to(ROOT)})",
    )
    parser.add_argument(
        "--show", metavar="JSON", help="print the tables of a saved report, run nothing"
    )
    parser.add_argument("--keep-work", action="store_true", help="keep the work dir (debugging)")
    parser.add_argument("--worker", choices=PHASES, help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.table_rows = args.table_rows or (50_000 if args.quick else 400_000)
    args.repeat = args.repeat or (1 if args.quick else 3)
    args.single_mb = args.single_mb or (128 if args.quick else 1024)
    args.steps = args.steps or 5
    args.job_timeout = args.job_timeout or (600.0 if args.quick else 2400.0)
    return args


def worker_main(args: argparse.Namespace) -> None:
    warnings.filterwarnings("ignore")  # DCP/ShardedTensor/torchsnapshot deprecations
    config = json.loads(args.config)
    out = Path(args.out)
    {
        "sharded": sharded_worker,
        "restore1": restore1_worker,
        "first": first_worker,
        "single": single_worker,
    }[args.worker](config, out)


def main() -> None:
    args = parse_args()
    if args.worker:
        worker_main(args)
        return
    if args.show:
        print_report(json.loads(Path(args.show).read_text()))
        return
    import torch

    writers = [w.strip() for w in args.writers.split(",") if w.strip()]
    unknown = set(writers) - set(WRITERS)
    if unknown:
        raise SystemExit(f"unknown writers {sorted(unknown)}; choose from {WRITERS}")
    phases = [p.strip() for p in args.phases.split(",") if p.strip()]
    work = Path(tempfile.mkdtemp(prefix="tml-bench-sharded-", dir=args.dir))
    config: Json = {
        "work": str(work),
        "tables": args.tables,
        "table_rows": args.table_rows,
        "dim": args.dim,
        "batch": 512,
        "examples": 65_536,
        "repeat": args.repeat,
        "between": args.steps,
        "chain_deltas": args.chain_deltas,
        "single_mb": args.single_mb,
        "idle_steps": 8,
        "idle_seconds": 0.5,
        "single_idle_steps": 3,
        "writers": writers,
        "save_timeout": args.save_timeout,
        "collective_timeout": max(120.0, args.save_timeout / 2),
        "ranks": args.ranks,
    }
    started = time.perf_counter()
    report: Json = {
        "mode": "quick" if args.quick else "full",
        "config": {k: v for k, v in config.items() if k not in ("work",)},
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
            "load_1min_at_start": round(os.getloadavg()[0], 2),
        },
        "statistic": "median [min, max] over repeats; 2 ranks: the slowest rank's figure",
        "page_cache": "warm (restores read just-written checkpoints; no root to drop caches)",
        "jobs": {},
    }
    log(f"work dir {work}; phases {phases}; writers {writers}")
    try:
        n = args.ranks
        total = 0
        if "sharded" in phases:
            log(f"phase 1: {n} ranks, every writer, restores {n}->{n}")
            tasks = [w for w in MEASURE_ORDER if w in writers and w != "torch-checkpointing"]
            tasks += [f"restore {r}" for r in ("tml full", "DCP load", "tml chain tip")]
            result, jobs = run_tasks_job(
                "sharded", n, tasks, config, work, args.job_timeout, "sharded", f"{n}->{n}"
            )
            report["jobs"]["sharded"] = jobs
            if result:
                total = int(result["total_bytes"])
                report["2 ranks"] = summarise_world(result, None, writers)
                report["restores"] = summarise_restores(result, None, total)
            else:
                report["2 ranks"] = {"error": jobs[-1]["error"]}
        if "restore1" in phases and total:
            log(f"phase 2: restore the {n}-rank checkpoints in 1 rank")
            tasks = [f"restore {r}" for r in ("tml full", "DCP load", "tml chain tip")]
            result, jobs = run_tasks_job(
                "restore1", 1, tasks, config, work, args.job_timeout, "restore1", f"{n}->1"
            )
            report["jobs"]["restore1"] = jobs
            if result:
                report.setdefault("restores", {}).update(summarise_restores(result, None, total))
        if "first" in phases:
            report["first_save"] = {}
            for label in ("idle", "busy") if args.busy else ("idle",):
                log(f"phase 3: first save of a fresh {args.ranks}-rank job ({label})")
                cfg = {**config, "label": label}
                with busy_load(2 if label == "busy" else 0):
                    run = run_job(
                        "first", args.ranks, cfg, work, args.job_timeout, f"first-{label}"
                    )
                report["jobs"][f"first-{label}"] = {
                    "seconds": round(run.seconds, 1),
                    "error": run.error,
                }
                report["first_save"][label] = run.result or {"error": run.error}
        if "single" in phases:
            log(f"phase 4: 1 process, MLP + Adam {args.single_mb} MiB")
            tasks = [w for w in MEASURE_ORDER if w in writers]
            tasks += [
                f"restore {r}"
                for r in (
                    "tml full",
                    "tml incremental",
                    "DCP load",
                    "torchsnapshot restore",
                    "torch-checkpointing load",
                )
            ]
            single = run_job(
                "single", None, {**config, "tasks": tasks}, work, args.job_timeout, "single"
            )
            report["jobs"]["single"] = {"seconds": round(single.seconds, 1), "error": single.error}
            report["1 process"] = summarise_world(single.result, single.error, writers)
            if single.result:
                report.setdefault("restores", {}).update(
                    summarise_restores(single.result, single.error, single.result["total_bytes"])
                )
    finally:
        if args.keep_work:
            log(f"kept {work} (job logs: *.log)")
        else:
            shutil.rmtree(work, ignore_errors=True)
    report["targets"] = [target.__dict__ for target in targets(report)]
    report["wall_s"] = round(time.perf_counter() - started, 1)
    report["machine"]["load_1min_at_end"] = round(os.getloadavg()[0], 2)
    print_report(report)
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(report, indent=1) + "\n")
        log(f"wrote {path}")


if __name__ == "__main__":
    main()
