"""How fast the save path is: training stall, time to durable, drain slowdown, memory, restore.

One command measures every contender on the same states in one run, because only ratios
survive the noise of a shared 2-core machine:

    .venv/bin/python benchmarks/bench_fast.py --quick            # < 2 min, 128 MiB state
    .venv/bin/python benchmarks/bench_fast.py --json --chart docs/performance.png \
        > benchmarks/results/fast.json                          # full: 1 GiB + 5000 tensors

Contenders: the disk itself (the same bytes in one file + fsync), ``torch.save`` + fsync,
``torch.load``, plain torchsnapshot (``take``, ``async_take``, restore), DCP (``save``,
``async_save`` in a thread and in a process, ``load``) and ours, ``tml_checkpointing.Snapshot``
with ``writer="process"`` and ``writer="torchsnapshot"`` (or with no ``writer`` argument on a
library that does not take one yet). Every write goes to a fresh directory and ends durable:
contenders that do not fsync get their files fsynced before the clock stops.

What each column means:

- *stall*: how long ``save()`` (or ``async_save``/``async_take``) blocks the caller: the time
  training stands still. Synchronous contenders stall for the whole write.
- *committed*: from the call until the checkpoint is durable (for ours: fsynced and marked).
- *drain slowdown*: a small MLP trains in the main thread while an async save drains (from
  the call's return until committed); median step time then, over the median of idle steps
  measured just before. 1.0x means the save costs training nothing.
- *peak RAM*: the most extra memory (anonymous RSS of this process and its children, plus the
  growth of the system's shared memory, so shared staging is counted once) during one save,
  as a multiple of the state's size. One sample every 5 ms.
- Restores read a checkpoint written above, after dropping the page cache when allowed (root);
  otherwise they are marked warm.

The DCP async contenders need a process group: a 1-rank gloo group (``init_method=file://``,
not ``MASTER_PORT``, which DCP's writer process would bind again) is set up only after every
other contender ran, so nothing else runs under a process group.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import ctypes
import gc
import inspect
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import threading
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import psutil
import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
import torchsnapshot
from rich.console import Console
from rich.table import Table
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_save_restore import build_state, dcp_load, drop_caches, fsync_tree

from tml_checkpointing import Snapshot

# DCP says it assumes one process when no process group exists: that is what we measure.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")

State = dict[str, Any]
GIB = 1024**3
WRITER_SUPPORTED = "writer" in inspect.signature(Snapshot).parameters


# -- states --------------------------------------------------------------------------------


def build_small_state(layers: int) -> State:
    """Many small tensors: per-tensor overhead, not bandwidth, decides this case.

    ``layers`` bias-free Linear(16, 16) plus Adam gives 4 tensors per layer (weight, two
    moments, the step counter).
    """
    model = torch.nn.Sequential(*[torch.nn.Linear(16, 16, bias=False) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters())
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    return {"model": model, "optimizer": optimizer}


def state_tensors(state: State) -> list[torch.Tensor]:
    """Every tensor a checkpoint of ``state`` holds, in a fixed order."""
    tensors = list(state["model"].state_dict().values())
    for per_param in state["optimizer"].state_dict()["state"].values():
        tensors += [v for v in per_param.values() if torch.is_tensor(v)]
    return tensors


def states_equal(left: State, right: State) -> bool:
    """A restore that is fast but wrong must not pass as a result."""
    return all(
        torch.equal(a, b) for a, b in zip(state_tensors(left), state_tensors(right), strict=True)
    )


def state_dicts(state: State) -> dict[str, Any]:
    return {key: value.state_dict() for key, value in state.items()}


# -- async handles -------------------------------------------------------------------------


class Handle(Protocol):
    def done(self) -> bool: ...

    def wait(self) -> None: ...


class Finished:
    """A synchronous contender's handle: committed when the call returned."""

    def done(self) -> bool:
        return True

    def wait(self) -> None:
        return None


class Background:
    """Runs ``finish`` (wait for a foreign async save, then fsync its files) in a thread, so
    that ``done()`` turns true only once the checkpoint is durable, as ours is when committed.
    """

    def __init__(self, finish: Callable[[], object]) -> None:
        self._error: BaseException | None = None

        def run() -> None:
            try:
                finish()
            except BaseException as error:
                self._error = error

        self._thread = threading.Thread(target=run, name="bench-finish", daemon=True)
        self._thread.start()

    def done(self) -> bool:
        return not self._thread.is_alive()

    def wait(self, timeout: float | None = None) -> None:
        self._thread.join(timeout)
        if self._thread.is_alive():
            raise TimeoutError(f"not committed after {timeout}s")
        if self._error is not None:
            raise self._error


class TmlHandle:
    """Our ``PendingSave``; ``done()`` if it has one, else a thread blocked in ``wait()``."""

    def __init__(self, pending: Any) -> None:
        self._pending = pending
        self._waiter = None if hasattr(pending, "done") else Background(pending.wait)

    def done(self) -> bool:
        if self._waiter is not None:
            return self._waiter.done()
        return bool(self._pending.done())

    def wait(self) -> None:
        if self._waiter is not None:
            self._waiter.wait()
        self._pending.wait()


# -- contenders ----------------------------------------------------------------------------


class Writer:
    """One way of writing a checkpoint of ``state``; ``start`` returns once the caller may
    go on (the stall), the handle says when it is durable."""

    name = ""
    ours = False
    asynchronous = False

    def __init__(self, state: State, work: Path) -> None:
        self.state = state
        self.work = work
        self._count = 0
        self.kept: Path | None = None  # the last checkpoint, for the restore measurements

    def fresh(self) -> Path:
        self._count += 1
        return self.work / f"{self.slug()}-{self._count}"

    def slug(self) -> str:
        return "".join(c if c.isalnum() else "-" for c in self.name)

    def start(self) -> tuple[Handle, Path]:
        raise NotImplementedError

    def close(self) -> None:
        return None


class RawWrite(Writer):
    name = "disk: raw write+fsync"

    def start(self) -> tuple[Handle, Path]:
        path = self.fresh()
        with open(path, "wb") as handle:
            for tensor in state_tensors(self.state):
                handle.write(
                    tensor.detach().contiguous().reshape(-1).view(torch.uint8).numpy().data
                )
            handle.flush()
            os.fsync(handle.fileno())
        return Finished(), path


class TorchSave(Writer):
    name = "torch.save+fsync"

    def start(self) -> tuple[Handle, Path]:
        path = self.fresh()
        with open(path, "wb") as handle:
            torch.save(state_dicts(self.state), handle)
            handle.flush()
            os.fsync(handle.fileno())
        return Finished(), path


class TorchsnapshotTake(Writer):
    name = "torchsnapshot take"

    def start(self) -> tuple[Handle, Path]:
        path = self.fresh()
        torchsnapshot.Snapshot.take(str(path), dict(self.state))
        fsync_tree(path)  # its fs plugin does not fsync
        return Finished(), path


class TorchsnapshotAsync(Writer):
    name = "torchsnapshot async_take"
    asynchronous = True

    def start(self) -> tuple[Handle, Path]:
        path = self.fresh()
        pending = torchsnapshot.Snapshot.async_take(str(path), dict(self.state))
        return Background(lambda: (pending.wait(), fsync_tree(path))), path


class DcpSave(Writer):
    name = "DCP save"

    def start(self) -> tuple[Handle, Path]:
        path = self.fresh()
        dcp.save(state_dicts(self.state), checkpoint_id=str(path), no_dist=True)
        fsync_tree(path)  # its writer does not fsync every file
        return Finished(), path


class DcpAsync(Writer):
    """``dcp.async_save``; needs the 1-rank process group set up by :func:`process_group`."""

    asynchronous = True

    def __init__(self, state: State, work: Path, kind: AsyncCheckpointerType) -> None:
        super().__init__(state, work)
        self.kind = kind
        self.name = f"DCP async_save {kind.value}"

    def start(self) -> tuple[Handle, Path]:
        path = self.fresh()
        future = dcp.async_save(
            state_dicts(self.state), checkpoint_id=str(path), async_checkpointer_type=self.kind
        )
        if not isinstance(future, concurrent.futures.Future):  # AsyncSaveResponse
            future = future.upload_completion
        return Background(lambda: (future.result(), fsync_tree(path))), path


def tml_options(writer: str | None) -> dict[str, str]:
    return {} if writer is None else {"writer": writer}


class Tml(Writer):
    """Ours. One ``Snapshot`` for all saves (a fresh step directory each), as in training:
    a writer process and its staging are set up once, so the first save is timed apart."""

    ours = True
    asynchronous = True

    def __init__(self, state: State, work: Path, writer: str | None) -> None:
        super().__init__(state, work)
        self.writer = writer
        self.name = f"tml writer={writer}" if writer else "tml (default writer)"
        self.save_dir = self.fresh()
        self.snapshot: Snapshot | None = None
        self.step = 0

    def open(self) -> Snapshot:
        if self.snapshot is None:
            self.snapshot = Snapshot(str(self.save_dir), self.state, **tml_options(self.writer))
        return self.snapshot

    def start(self) -> tuple[Handle, Path]:
        snapshot = self.open()
        self.step += 1
        pending = snapshot.save(self.step)
        return TmlHandle(pending), self.save_dir / str(self.step)

    def close(self) -> None:
        if self.snapshot is not None:
            self.snapshot.close()
            self.snapshot = None


# -- measuring -----------------------------------------------------------------------------


@dataclass
class Row:
    """Everything measured for one contender on one state."""

    name: str
    ours: bool = False
    asynchronous: bool = False
    stall: list[float] = field(default_factory=list)
    commit: list[float] = field(default_factory=list)
    restore: list[float] = field(default_factory=list)
    drain: list[float] = field(default_factory=list)  # slowdown ratio per repeat
    drain_steps: list[int] = field(default_factory=list)
    drain_s: list[float] = field(default_factory=list)
    idle_step_s: list[float] = field(default_factory=list)
    drain_worst_step_s: list[float] = field(default_factory=list)
    peak_ram_bytes: int | None = None
    peak_ram: float | None = None  # extra bytes / state bytes
    first: dict[str, float] = field(default_factory=dict)
    error: str | None = None
    note: str | None = None


def timed_save(writer: Writer, keep: bool = False) -> tuple[float, float]:
    """(stall, until committed) of one save; the checkpoint is deleted unless ``keep``."""
    gc.collect()
    started = time.perf_counter()
    handle, path = writer.start()
    stalled = time.perf_counter() - started
    handle.wait()
    committed = time.perf_counter() - started
    if keep:
        writer.kept = path
    else:
        remove(path)
    return stalled, committed


def remove(path: Path) -> None:
    if path.is_dir():
        shutil.rmtree(path, ignore_errors=True)
    else:
        path.unlink(missing_ok=True)


class Trainer:
    """The training a checkpoint should not disturb: a small MLP, SGD, batch 64."""

    def __init__(self) -> None:
        torch.manual_seed(0)
        layers: list[torch.nn.Module] = []
        for _ in range(4):
            layers += [torch.nn.Linear(256, 256), torch.nn.ReLU()]
        self.model = torch.nn.Sequential(*layers)
        self.optimizer = torch.optim.SGD(self.model.parameters(), lr=1e-3)
        self.batch = torch.randn(64, 256)

    def step(self) -> float:
        started = time.perf_counter()
        self.optimizer.zero_grad(set_to_none=True)
        self.model(self.batch).square().mean().backward()
        self.optimizer.step()
        return time.perf_counter() - started

    def idle(self, seconds: float) -> float:
        """Mean step time with no save running, over ``seconds`` (at least 20 steps)."""
        for _ in range(3):
            self.step()
        steps: list[float] = []
        deadline = time.perf_counter() + seconds
        while len(steps) < 20 or time.perf_counter() < deadline:
            steps.append(self.step())
        return statistics.fmean(steps)


@dataclass
class Drain:
    """Training during one async save, from the call's return until committed."""

    slowdown: float  # mean step time / mean idle step time: training throughput lost
    idle_step_s: float
    steps: int
    seconds: float
    worst_step_s: float


def drained(writer: Writer, trainer: Trainer, window: float) -> Drain:
    """How much slower training runs while ``writer``'s save drains.

    Means, not medians: one step held up for 300 ms by a writer thread holding the GIL is
    lost training time that a median would hide. The idle pace is taken over ``window``
    seconds both before and after the drain, because the load other users put on a shared
    machine changes from minute to minute.
    """
    gc.collect()
    before = trainer.idle(window)
    handle, path = writer.start()
    returned = time.perf_counter()
    steps = []
    while not handle.done():
        steps.append(trainer.step())
    handle.wait()
    seconds = time.perf_counter() - returned
    remove(path)
    idle = (before + trainer.idle(window)) / 2
    if not steps:
        return Drain(1.0, idle, 0, seconds, 0.0)
    return Drain(statistics.fmean(steps) / idle, idle, len(steps), seconds, max(steps))


def _anon_bytes(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as handle:
            for line in handle:
                if line.startswith("RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def _shmem_bytes() -> int:
    with open("/proc/meminfo") as handle:
        for line in handle:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return 0


class MemorySampler:
    """Peak of (anonymous RSS of this process tree + system shared memory), every 5 ms.

    Summing RSS would count shared-memory staging once per process that maps it; the
    system's ``Shmem`` counts it once (at the price of also seeing other users' shm).
    """

    def __init__(self, interval: float = 0.005) -> None:
        self.interval = interval
        self.me = psutil.Process()
        self._stop = threading.Event()
        self.peak = 0
        self._thread = threading.Thread(target=self._run, name="bench-rss", daemon=True)

    def total(self, pids: list[int]) -> int:
        return sum(_anon_bytes(pid) for pid in pids) + _shmem_bytes()

    def pids(self) -> list[int]:
        try:
            return [self.me.pid, *(c.pid for c in self.me.children(recursive=True))]
        except psutil.Error:
            return [self.me.pid]

    def _run(self) -> None:
        pids = self.pids()
        refreshed = time.monotonic()
        while not self._stop.is_set():
            if time.monotonic() - refreshed > 0.05:
                pids, refreshed = self.pids(), time.monotonic()
            self.peak = max(self.peak, self.total(pids))
            time.sleep(self.interval)

    def __enter__(self) -> MemorySampler:
        gc.collect()
        with contextlib.suppress(OSError, AttributeError):
            # Freed heap pages stay resident and would serve the save's copies unseen.
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        self.baseline = self.total(self.pids())
        self.peak = self.baseline
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def extra(self) -> int:
        return max(0, self.peak - self.baseline)


def cold() -> bool:
    os.sync()
    return drop_caches()


def timed(action: Callable[[], object]) -> float:
    gc.collect()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


@contextlib.contextmanager
def process_group(work: Path) -> Iterator[None]:
    """A 1-rank gloo group for DCP's async paths (file store: no port to collide with)."""
    store = work / "pg-store"
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


def failure(error: BaseException) -> str:
    text = f"{type(error).__name__}: {error}".splitlines()[0]
    return f"failed: {text[:160]}"


# -- one state -----------------------------------------------------------------------------


@dataclass
class Case:
    """One state and its contenders' rows."""

    name: str
    state: State
    build: Callable[[], State]
    work: Path
    rows: dict[str, Row] = field(default_factory=dict)
    # The floor of any stall: copy_ of every tensor into buffers allocated once (seconds).
    copy_floor_s: list[float] = field(default_factory=list)
    # 1-minute load average when each phase ended: on a shared machine, the context of a number.
    load: dict[str, float] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in state_tensors(self.state))

    @property
    def tensors(self) -> int:
        return len(state_tensors(self.state))

    def ordered(self) -> list[Row]:
        return sorted(self.rows.values(), key=lambda row: order(row.name))

    def row(self, writer: Writer | str) -> Row:
        name = writer if isinstance(writer, str) else writer.name
        if name not in self.rows:
            self.rows[name] = Row(name)
            if isinstance(writer, Writer):
                self.rows[name].ours = writer.ours
                self.rows[name].asynchronous = writer.asynchronous
        return self.rows[name]


ORDER = (
    "disk: raw write+fsync",
    "torch.save+fsync",
    "torchsnapshot take",
    "torchsnapshot async_take",
    "DCP save",
    "DCP async_save thread",
    "DCP async_save process",
    "tml writer=torchsnapshot",
    "tml (default writer)",
    "tml writer=process",
    "torch.load",
    "torchsnapshot restore",
    "DCP load",
)


def order(name: str) -> tuple[int, int, str]:
    """Saves before restores, theirs before ours, the disk limit first."""
    if name in ORDER[10:]:
        return (1, ORDER.index(name), name)
    if name.endswith(" restore"):
        base = name.removesuffix(" restore")
        return (1, len(ORDER) + (ORDER.index(base) if base in ORDER else 0), name)
    return (0, ORDER.index(name) if name in ORDER else len(ORDER), name)


def tml_writers() -> list[str | None]:
    return ["process", "torchsnapshot"] if WRITER_SUPPORTED else [None]


def measure_writers(case: Case, writers: list[Writer], args: argparse.Namespace,
                    trainer: Trainer, log: Callable[[str], None]) -> None:  # fmt: skip
    """Stall/commit over repeats, then drain and memory, for ``writers`` on ``case``."""
    alive = list(writers)
    for writer in list(alive):  # warm-up: first save of ours, DCP's writer process
        if not (writer.ours or isinstance(writer, DcpAsync)):
            continue
        row = case.row(writer)
        try:
            stall, commit = warm_up(writer, args.first_timeout)
            row.first = {"stall": stall, "commit": commit}
        except BaseException as error:
            row.error = failure(error)
            log(f"  {writer.name}: {row.error}")
            alive.remove(writer)
    for repeat in range(args.repeat):
        for writer in list(alive):
            row = case.row(writer)
            try:
                stall, commit = timed_save(writer, keep=repeat == args.repeat - 1)
            except Exception as error:
                row.error = failure(error)
                log(f"  {writer.name}: {row.error}")
                alive.remove(writer)
                continue
            row.stall.append(stall)
            row.commit.append(commit)
            log(f"  [{repeat + 1}/{args.repeat}] {writer.name}: stall {stall:.3f}s, "
                f"committed {commit:.3f}s")  # fmt: skip
    for writer in alive:
        if not writer.asynchronous:
            continue
        row = case.row(writer)
        window = min(0.75, max(0.3, statistics.median(row.commit) / 2))
        for _ in range(args.repeat):
            drain = drained(writer, trainer, window)
            row.drain.append(drain.slowdown)
            row.drain_steps.append(drain.steps)
            row.drain_s.append(drain.seconds)
            row.idle_step_s.append(drain.idle_step_s)
            row.drain_worst_step_s.append(drain.worst_step_s)
        log(f"  {writer.name}: drain slowdown {fmt_spread(row.drain, 'x')}")
    for writer in alive:
        row = case.row(writer)
        if isinstance(writer, Tml):
            # Staging set up on the first save and kept: count it, from a fresh Snapshot.
            writer.close()
            writer.snapshot = None
            with MemorySampler() as sampler:
                timed_save(writer)
            row.note = "peak RAM: a fresh Snapshot's first save"
        else:
            with MemorySampler() as sampler:
                timed_save(writer)
        row.peak_ram = sampler.extra / case.nbytes
        row.peak_ram_bytes = sampler.extra
        log(f"  {writer.name}: peak extra RAM {row.peak_ram:.2f}x state")


def copy_floor(state: State, repeat: int) -> list[float]:
    """What a stall cannot beat on this machine: one ``copy_`` of every tensor into a buffer
    allocated beforehand (the writer process's staging does exactly this, into shared memory)."""
    tensors = state_tensors(state)
    buffers = [torch.empty_like(t) for t in tensors]
    for buffer in buffers:
        buffer.zero_()  # touch every page first: the staging block is reused, not fresh
    times = []
    for _ in range(repeat):
        started = time.perf_counter()
        for buffer, tensor in zip(buffers, tensors, strict=True):
            buffer.copy_(tensor)
        times.append(time.perf_counter() - started)
    return times


def warm_up(writer: Writer, timeout: float) -> tuple[float, float]:
    """The first save, bounded: a writer process that never comes up is a result too."""
    started = time.perf_counter()
    handle, path = writer.start()
    stalled = time.perf_counter() - started
    if isinstance(handle, Background):
        handle.wait(timeout)
    else:
        waiter = Background(handle.wait)
        waiter.wait(timeout)
    committed = time.perf_counter() - started
    remove(path)
    return stalled, committed


def measure_restores(case: Case, writers: list[Writer], args: argparse.Namespace,
                     log: Callable[[str], None]) -> bool:  # fmt: skip
    """Restore what the writers kept; returns whether the page cache could be dropped."""
    by_type = {type(w): w for w in writers if w.kept is not None}
    target = case.build()
    actions: list[tuple[str, Callable[[], object], bool]] = []
    if (ts := by_type.get(TorchSave)) and ts.kept:
        torch_file = ts.kept
        actions.append(("torch.load", lambda: torch.load(torch_file, weights_only=True), False))
    if (take := by_type.get(TorchsnapshotTake)) and take.kept:
        take_dir = take.kept
        actions.append(
            (
                "torchsnapshot restore",
                lambda: torchsnapshot.Snapshot(str(take_dir)).restore(dict(target)),
                True,
            )
        )
    if (dsave := by_type.get(DcpSave)) and dsave.kept:
        dcp_dir = dsave.kept
        actions.append(("DCP load", lambda: dcp_load(dcp_dir, target), True))
    for writer in writers:
        if isinstance(writer, Tml) and writer.kept is not None:
            actions.append((f"{writer.name} restore", tml_restore(writer, target), True))
    was_cold = True
    for repeat in range(args.repeat):
        for name, action, in_place in actions:
            row = case.row(name)
            row.ours = name.startswith("tml")
            if row.error:
                continue
            was_cold = cold() and was_cold
            try:
                row.restore.append(timed(action))
            except Exception as error:
                row.error = failure(error)
                log(f"  {name}: {row.error}")
                continue
            if in_place and repeat == 0 and not states_equal(case.state, target):
                row.error = "failed: restored state differs from the saved one"
                log(f"  {name}: {row.error}")
            log(f"  [{repeat + 1}/{args.repeat}] {name}: {row.restore[-1]:.3f}s")
            if in_place:
                scramble(target)
    return was_cold


def scramble(state: State) -> None:
    """So that the next restore must really write every tensor to pass the check."""
    with torch.no_grad():
        for tensor in state_tensors(state):
            if tensor.is_floating_point():
                tensor.add_(1.0)


def tml_restore(writer: Tml, target: State) -> Callable[[], object]:
    kept = writer.kept
    assert kept is not None

    def restore() -> None:
        snapshot = Snapshot(str(writer.save_dir), target, **tml_options(writer.writer))
        try:
            snapshot.restore(str(kept))
        finally:
            snapshot.close()

    return restore


# -- report --------------------------------------------------------------------------------


def spread(values: list[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {
        "median": round(statistics.median(values), 4),
        "min": round(min(values), 4),
        "max": round(max(values), 4),
    }


def fmt_spread(values: list[float], unit: str = "s", digits: int = 2) -> str:
    if not values:
        return "—"
    med = statistics.median(values)
    if len(values) == 1:
        return f"{med:.{digits}f}{unit}"
    return f"{med:.{digits}f}{unit} [{min(values):.{digits}f}-{max(values):.{digits}f}]"


def median(row: Row | None, what: str) -> float | None:
    if row is None or row.error:
        return None
    values: list[float] = getattr(row, what)
    return statistics.median(values) if values else None


def ratios(case: Case) -> dict[str, float]:
    """Throughput ratios (other's time / our time): > 1 means ours is faster."""
    out: dict[str, float] = {}
    rows = case.rows
    for ours in (r for r in rows.values() if r.ours and r.commit):
        mine = median(ours, "commit")
        if mine is None:
            continue
        for other, label in (
            ("disk: raw write+fsync", "share of raw disk write"),
            ("torch.save+fsync", "vs torch.save"),
            ("torchsnapshot take", "vs torchsnapshot take"),
            ("torchsnapshot async_take", "vs torchsnapshot async_take"),
            ("DCP save", "vs DCP save"),
            ("DCP async_save thread", "vs DCP async thread"),
            ("DCP async_save process", "vs DCP async process"),
        ):
            theirs = median(rows.get(other), "commit")
            if theirs is not None:
                out[f"{ours.name} commit throughput {label}"] = round(theirs / mine, 2)
    floor = statistics.median(case.copy_floor_s) if case.copy_floor_s else None
    for ours in (r for r in rows.values() if r.ours and r.asynchronous and r.stall):
        if floor:
            stall = statistics.median(ours.stall)
            out[f"{ours.name} stall vs copy_ floor"] = round(stall / floor, 2)
    for ours in (r for r in rows.values() if r.ours and r.restore):
        mine = median(ours, "restore")
        theirs = median(rows.get("torch.load"), "restore")
        if mine is not None and theirs is not None:
            out[f"{ours.name} throughput vs torch.load"] = round(theirs / mine, 2)
    return out


def report(cases: list[Case], args: argparse.Namespace, was_cold: bool) -> dict[str, Any]:
    out: dict[str, Any] = {
        "mode": "quick" if args.quick else "full",
        "repeat": args.repeat,
        "cold_cache_restores": was_cold,
        "writer_parameter": WRITER_SUPPORTED,
        "machine": {
            "cpus": os.cpu_count(),
            "torch": torch.__version__,
            "python": platform.python_version(),
        },
        "states": {},
    }
    for case in cases:
        gib = case.nbytes / GIB
        rows: dict[str, Any] = {}
        for row in case.ordered():
            entry: dict[str, Any] = {"ours": row.ours}
            if row.error:
                entry["error"] = row.error
            if row.commit:
                entry["stall_s"] = spread(row.stall) if row.asynchronous else None
                entry["stall_s_per_gib"] = (
                    round(statistics.median(row.stall) / gib, 4) if row.asynchronous else None
                )
                entry["committed_s"] = spread(row.commit)
                entry["committed_gb_per_s"] = round(
                    case.nbytes / 1e9 / statistics.median(row.commit), 4
                )
            if row.restore:
                entry["restore_s"] = spread(row.restore)
                entry["restore_gb_per_s"] = round(
                    case.nbytes / 1e9 / statistics.median(row.restore), 4
                )
            if row.drain:
                entry["drain_slowdown"] = spread(row.drain)
                entry["drain_steps"] = row.drain_steps
                entry["drain_s"] = [round(v, 3) for v in row.drain_s]
                entry["idle_step_ms"] = [round(v * 1e3, 3) for v in row.idle_step_s]
                entry["drain_worst_step_s"] = [round(v, 4) for v in row.drain_worst_step_s]
            if row.peak_ram is not None:
                entry["peak_extra_ram_x_state"] = round(row.peak_ram, 3)
                entry["peak_extra_ram_mib"] = round((row.peak_ram_bytes or 0) / 2**20, 1)
            if row.first:
                entry["first_save_s"] = {k: round(v, 4) for k, v in row.first.items()}
            if row.note:
                entry["note"] = row.note
            rows[row.name] = entry
        out["states"][case.name] = {
            "bytes": case.nbytes,
            "gib": round(gib, 4),
            "tensors": case.tensors,
            "copy_floor_s": spread(case.copy_floor_s),
            "copy_floor_s_per_gib": (
                round(statistics.median(case.copy_floor_s) / gib, 4) if case.copy_floor_s else None
            ),
            "rows": rows,
            "ratios": ratios(case),
            "load_avg_1min": case.load,
        }
    return out


def print_tables(
    cases: list[Case], args: argparse.Namespace, was_cold: bool, stderr: bool = False
) -> None:
    console = Console(width=170, stderr=stderr)
    for case in cases:
        gib = case.nbytes / GIB
        table = Table(
            title=f"{case.name}: {gib:.3f} GiB in {case.tensors} tensors — median "
            f"\\[min-max] of {args.repeat}",
            title_justify="left",
        )
        for column in ("contender", "stall", "stall/GiB", "until committed", "GB/s",
                       "drain slowdown", "peak RAM", "note"):  # fmt: skip
            table.add_column(column, justify="left" if column in ("contender", "note") else "right")
        for row in case.ordered():
            name = f"[bold]{row.name}[/bold]" if row.ours else row.name
            if row.error and not (row.commit or row.restore):
                table.add_row(name, *["—"] * 6, row.error)
                continue
            note = row.error or ""
            if row.first:
                note += f"first save: stall {row.first['stall']:.2f}s, "
                note += f"committed {row.first['commit']:.2f}s"
            if row.restore:
                label = "cold" if was_cold else "warm"
                rate = case.nbytes / 1e9 / statistics.median(row.restore)
                table.add_row(name, "", "", fmt_spread(row.restore), f"{rate:.2f}", "", "",
                              f"restore ({label} cache) {note}".strip())  # fmt: skip
                continue
            stall = fmt_spread(row.stall) if row.asynchronous else "(all of it)"
            per_gib = f"{statistics.median(row.stall) / gib:.2f}s" if row.asynchronous else ""
            rate = case.nbytes / 1e9 / statistics.median(row.commit)
            drain = fmt_spread(row.drain, "x") if row.drain else ""
            ram = ""
            if row.peak_ram is not None:
                ram = f"{row.peak_ram:.2f}x ({(row.peak_ram_bytes or 0) / 2**20:.0f} MiB)"
            table.add_row(name, stall, per_gib, fmt_spread(row.commit), f"{rate:.2f}", drain,
                          ram, note)  # fmt: skip
        console.print(table)
        for label, value in ratios(case).items():
            console.print(f"  {label}: {value:.2f}x")
        console.print()


def draw_chart(data: dict[str, Any], path: str) -> None:
    """Two panels: throughput until durable (and restore) per contender, grouped by state;
    training slowdown while each async save drains."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    states = list(data["states"])
    bars: dict[str, dict[str, tuple[float, float, float]]] = {}
    drains: dict[str, dict[str, tuple[float, float, float]]] = {}
    for state, info in data["states"].items():
        gb = info["bytes"] / 1e9
        for name, row in info["rows"].items():
            for key, label in (("committed_s", name), ("restore_s", name)):
                if row.get(key):
                    s = row[key]
                    bars.setdefault(label, {})[state] = (gb / s["median"], gb / s["max"],
                                                         gb / s["min"])  # fmt: skip
            if row.get("drain_slowdown"):
                d = row["drain_slowdown"]
                drains.setdefault(name, {})[state] = (d["median"], d["min"], d["max"])
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(13, 10), height_ratios=[3, 2])
    colours = plt.get_cmap("tab10")
    for axis, series, ylabel, title in (
        (
            top,
            bars,
            "GB/s (log)",
            "Throughput: saves until durable, then restores (after the dashed line)",
        ),
        (
            bottom,
            drains,
            "step time / idle step time",
            "Training slowdown while an async save drains: lower is better (1.0 = undisturbed)",
        ),
    ):
        names = sorted(series, key=order)
        width = 0.8 / max(1, len(states))
        for i, state in enumerate(states):
            xs, ys, lo, hi = [], [], [], []
            for j, name in enumerate(names):
                if state in series[name]:
                    med, low, high = series[name][state]
                    xs.append(j + (i - (len(states) - 1) / 2) * width)
                    ys.append(med)
                    lo.append(max(0.0, med - low))
                    hi.append(max(0.0, high - med))
            axis.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=state, color=colours(i))
        axis.set_xticks(range(len(names)))
        axis.set_xticklabels(
            [n.replace(" restore", "\nrestore") for n in names], rotation=35, ha="right",
            fontsize=8,
        )  # fmt: skip
        for tick, name in zip(axis.get_xticklabels(), names, strict=True):
            if name.startswith("tml"):
                tick.set_fontweight("bold")
        axis.set_ylabel(ylabel)
        axis.set_title(title, fontsize=11)
        axis.legend(fontsize=8)
        axis.grid(axis="y", alpha=0.3)
    top.set_yscale("log")
    bottom.set_yscale("log")
    bottom.set_ylabel("step time / idle step time (log)")
    restores = [i for i, name in enumerate(sorted(bars, key=order)) if order(name)[0]]
    if restores:
        top.axvline(restores[0] - 0.5, color="grey", linestyle="--", linewidth=0.8)
    bottom.axhline(1.0, color="black", linewidth=0.8)
    cache = "cold" if data["cold_cache_restores"] else "warm"
    fig.suptitle(
        f"tml_checkpointing save path ({data['mode']} run, median of {data['repeat']}, "
        f"min-max bars, {data['machine']['cpus']} CPUs, {cache}-cache restores)"
    )
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# -- main ----------------------------------------------------------------------------------


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="128 MiB + 250 small layers, 2x")
    parser.add_argument("--repeat", type=int, default=None)
    parser.add_argument("--size-mb", type=int, default=None, help="large state (default 1024)")
    parser.add_argument(
        "--small-layers", type=int, default=None, help="default 1250 (4 tensors each)"
    )
    parser.add_argument("--first-timeout", type=float, default=180.0,
                        help="seconds a first save (writer process start) may take")  # fmt: skip
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object on stdout (tables: stderr)"
    )
    parser.add_argument("--chart", default=None, help="write a PNG chart here")
    args = parser.parse_args()
    args.repeat = args.repeat or (2 if args.quick else 3)
    args.size_mb = args.size_mb or (128 if args.quick else 1024)
    args.small_layers = args.small_layers or (250 if args.quick else 1250)
    err = Console(stderr=True)

    def log(message: str) -> None:
        err.print(f"[dim]{time.strftime('%H:%M:%S')}[/dim] {message}", highlight=False)

    if not WRITER_SUPPORTED:
        log("Snapshot takes no writer= yet: measuring its default writer only")
    work = Path(tempfile.mkdtemp(prefix="tml-fast-", dir=args.dir))
    size_mb, small_layers = args.size_mb, args.small_layers
    cases = [
        Case(
            f"model+Adam {size_mb} MiB",
            build_state(size_mb),
            lambda: build_state(size_mb),
            work / "large",
        ),
        Case(
            f"{small_layers} small layers+Adam",
            build_small_state(small_layers),
            lambda: build_small_state(small_layers),
            work / "small",
        ),
    ]
    trainer = Trainer()
    clean_idle = trainer.idle(1.0)
    was_cold = True
    started = time.perf_counter()
    try:
        per_case: dict[str, list[Writer]] = {}
        for case in cases:
            case.work.mkdir(parents=True)
            log(f"{case.name}: {case.nbytes / GIB:.3f} GiB, {case.tensors} tensors")
            writers: list[Writer] = [
                cls(case.state, case.work)
                for cls in (RawWrite, TorchSave, TorchsnapshotTake, TorchsnapshotAsync, DcpSave)
            ]
            writers += [Tml(case.state, case.work, w) for w in tml_writers()]
            per_case[case.name] = writers
            measure_writers(case, writers, args, trainer, log)
            case.copy_floor_s = copy_floor(case.state, args.repeat)
            log(f"  memory: copy_ into reused buffers {fmt_spread(case.copy_floor_s)}")
            case.load["saves"] = round(os.getloadavg()[0], 2)
            for writer in writers:
                writer.close()
            was_cold = measure_restores(case, writers, args, log) and was_cold
            case.load["restores"] = round(os.getloadavg()[0], 2)
            for writer in writers:
                if writer.kept is not None:
                    remove(writer.kept)
        with process_group(work):
            for case in cases:
                log(f"{case.name}: DCP async (1-rank gloo group)")
                dcp_writers: list[Writer] = [
                    DcpAsync(case.state, case.work, kind)
                    for kind in (AsyncCheckpointerType.THREAD, AsyncCheckpointerType.PROCESS)
                ]
                measure_writers(case, dcp_writers, args, trainer, log)
                case.load["dcp_async"] = round(os.getloadavg()[0], 2)
                for writer in dcp_writers:
                    if writer.kept is not None:
                        remove(writer.kept)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    log(f"done in {time.perf_counter() - started:.0f}s")
    data = report(cases, args, was_cold)
    data["wall_s"] = round(time.perf_counter() - started, 1)
    data["idle_step_ms_at_start"] = round(clean_idle * 1e3, 3)
    if args.chart:
        draw_chart(data, args.chart)
        log(f"chart: {args.chart}")
    # With --json the tables go to stderr: stdout stays one JSON object.
    print_tables(cases, args, was_cold, stderr=args.json)
    if args.json:
        print(json.dumps(data, indent=1))
    sys.stdout.flush()
    if any("Timeout" in (r.error or "") for c in cases for r in c.rows.values()):
        os._exit(0)  # a writer that never came up holds a thread the interpreter would join


if __name__ == "__main__":
    main()
