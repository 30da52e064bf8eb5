"""The writer process: same bytes as torchsnapshot's path, staging reused, and crash safety.

Kills land at moments the save reports (its events, relayed from the writer), never on a clock:
the writer killed mid-save, the training process killed while its writer waits. Killing both
(the whole process group) at every moment is tests/test_crash.py, which now runs through the
writer process for local and S3 save_dirs.
"""

from __future__ import annotations

import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
import torch
import torchsnapshot
from torchsnapshot import RNGState

from tml_checkpointing import (
    CheckpointWriteError,
    SaveDirLockedError,
    Snapshot,
    SnapshotStateError,
    WriterLock,
    get_checkpoints,
    step_from_checkpoint,
    verify_checkpoint,
)
from tml_checkpointing.catalog.discovery import is_committed
from tml_checkpointing.events import (
    SAVE_COMMITTED,
    SAVE_DATA_WRITTEN,
    SAVE_SIDECAR_WRITTEN,
    Event,
    subscribe,
    unsubscribe,
)
from tml_checkpointing.format.sidecar import parse_sidecar
from tml_checkpointing.storage.checkpoint_files import CheckpointFiles
from tml_checkpointing.storage.plugin import world_size_of_marker
from tml_checkpointing.writing.staging import shared_memory_room
from tml_checkpointing.writing.writer_process import (
    WriterProcess,
    WriterSave,
    close_shared_writer,
    shared_writer,
)

from .training_helpers import checkpoint_tensors

REPO = Path(__file__).resolve().parents[1]


def make_state(seed: int = 0) -> dict[str, object]:
    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.ReLU(), torch.nn.Linear(32, 3))
    optimizer = torch.optim.Adam(model.parameters(), lr=0.01)
    model(torch.randn(8, 64)).sum().backward()
    optimizer.step()
    return {"model": model, "optimizer": optimizer, "rng": RNGState()}


def test_same_tensors_as_the_torchsnapshot_path_and_plain_torchsnapshot_reads_it(
    tmp_path: Path,
) -> None:
    state = make_state()
    Snapshot(str(tmp_path / "thread"), state, writer="torchsnapshot").save(5).wait()
    Snapshot(str(tmp_path / "process"), state, writer="process").save(5).wait()
    ours = checkpoint_tensors(str(tmp_path / "process"))
    theirs = checkpoint_tensors(str(tmp_path / "thread"))
    assert ours.keys() == theirs.keys() and "0/rng/rng_state" in ours
    assert all(torch.equal(ours[k], theirs[k]) for k in ours)  # RNG state included
    assert verify_checkpoint(str(tmp_path / "process" / "5"), level="full").status == "valid"
    fresh = make_state(seed=7)
    torchsnapshot.Snapshot(str(tmp_path / "process" / "5")).restore(
        {"model": fresh["model"], "optimizer": fresh["optimizer"]}  # type: ignore[dict-item]
    )
    assert all(
        torch.equal(a, b)
        for a, b in zip(
            fresh["model"].state_dict().values(),  # type: ignore[attr-defined]
            state["model"].state_dict().values(),  # type: ignore[attr-defined]
            strict=True,
        )
    )


def test_staging_is_allocated_once_replanned_on_new_shapes_and_freed_by_close(
    tmp_path: Path,
) -> None:
    state = make_state()
    snapshot = Snapshot(str(tmp_path / "run"), state, writer="process")
    snapshot.save(1).wait()
    area = snapshot._staging.area
    assert area is not None
    first = area.name
    for step in (2, 3, 4):
        snapshot.save(step).wait()
        assert snapshot._staging.area is area  # the same block, refilled with copy_
    assert Path("/dev/shm", first).exists()
    state["extra"] = torchsnapshot.StateDict(table=torch.zeros(10, 4))
    snapshot.state = state
    snapshot.save(5).wait()
    replanned = snapshot._staging.area
    assert replanned is not None and replanned.name != first
    assert not Path("/dev/shm", first).exists()  # the old block is gone
    snapshot.close()
    assert not Path("/dev/shm", replanned.name).exists()
    steps = [step_from_checkpoint(path) for path in get_checkpoints(str(tmp_path / "run"))]
    assert steps == [1, 2, 3, 4, 5]


def test_fifty_saves_do_not_grow_memory_or_shared_memory(tmp_path: Path) -> None:
    """Staging is reused: after the first saves, neither this process's memory, the writer's,
    nor the machine's shared memory grows with the number of saves (a 16 MiB state, so that
    a copy kept per save would show as 16 MiB per save)."""
    state = {"model": torch.nn.ParameterDict({"w": torch.nn.Parameter(torch.randn(4 << 20))})}
    snapshot = Snapshot(str(tmp_path / "run"), state, writer="process")

    def used() -> tuple[int, int, int]:
        writer = shared_writer()._process
        assert writer is not None
        shm = sum(p.stat().st_size for p in Path("/dev/shm").glob(f"tml-staging-{os.getpid()}-*"))
        uss = psutil.Process().memory_full_info().uss
        return uss, psutil.Process(writer.pid).memory_full_info().uss, shm

    for step in range(5):
        snapshot.save(step).wait()
    before = used()
    for step in range(5, 50):
        snapshot.save(step).wait()
        shutil.rmtree(tmp_path / "run" / str(step - 1))  # keep the disk small
    after = used()
    snapshot.close()
    slack = 8 << 20  # allocator noise; one more copy of the state would be 16 MiB
    assert after[0] - before[0] < slack, ("training process", before, after)
    assert after[1] - before[1] < slack, ("writer process", before, after)
    assert after[2] == before[2], ("shared memory", before, after)


def test_a_state_the_writer_cannot_take_is_refused_when_asked_for() -> None:
    snapshot = Snapshot("memory://writer-refused", make_state(), writer="process")
    with pytest.raises(SnapshotStateError, match=r"cannot save this state.*memory://"):
        snapshot.save(1)


# The writer's moments before the marker (save.started is the training process's own).
@pytest.mark.parametrize("moment", [SAVE_DATA_WRITTEN, SAVE_SIDECAR_WRITTEN])
def test_the_writer_killed_mid_save_commits_nothing_and_the_next_save_works(
    tmp_path: Path, moment: str
) -> None:
    snapshot = Snapshot(str(tmp_path / "run"), make_state(), writer="process")
    killed: list[int] = []

    def kill_writer(event: Event) -> None:  # runs while the writer waits for our answer
        if event.name == moment and not killed:
            process = shared_writer()._process
            assert process is not None
            process.kill()
            process.wait()
            killed.append(process.pid)

    subscribe(kill_writer)
    try:
        with pytest.raises(CheckpointWriteError, match=r"writer process (died|is gone)"):
            snapshot.save(1).wait()
    finally:
        unsubscribe(kill_writer)
    assert killed and not is_committed(str(tmp_path / "run" / "1"))
    assert snapshot.save(1).wait().endswith("/1")  # a new writer, the same step again
    assert shared_writer()._process is not None and shared_writer()._process.pid != killed[0]
    assert verify_checkpoint(str(tmp_path / "run" / "1"), level="full").status == "valid"


SAVER = """
import os, sys, threading, torch
from tml_checkpointing import Snapshot
from tml_checkpointing.events import SAVE_DATA_WRITTEN, subscribe
from tml_checkpointing.writing.staging import shared_memory_room
from tml_checkpointing.writing.writer_process import shared_writer

def pause(event):
    if event.name == SAVE_DATA_WRITTEN:
        print("paused", shared_writer()._process.pid, flush=True)
        threading.Event().wait()  # the writer waits for our answer; we get killed here

subscribe(pause)
model = torch.nn.Linear(256, 256)
Snapshot(sys.argv[1], {"model": model}, writer="process").save(1).wait()
"""


@pytest.mark.parametrize("group", [False, True], ids=["training process", "both"])
def test_the_training_process_killed_while_its_writer_runs_leaves_no_writer_behind(
    tmp_path: Path, group: bool
) -> None:
    save_dir = tmp_path / "run"
    victim = subprocess.Popen(
        [sys.executable, "-c", SAVER, str(save_dir)],
        stdout=subprocess.PIPE, text=True, cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)},
        start_new_session=True,
    )  # fmt: skip
    assert victim.stdout is not None
    line = victim.stdout.readline()
    assert line.startswith("paused "), line
    writer = psutil.Process(int(line.split()[1]))
    if group:  # the training process and its writer at once (a node lost, an OOM kill)
        os.killpg(victim.pid, signal.SIGKILL)
    else:  # the training process only: its writer sees its pipes close
        os.kill(victim.pid, signal.SIGKILL)
    victim.wait(timeout=30)
    writer.wait(timeout=30)  # it stops instead of committing
    assert not is_committed(str(save_dir / "1"))
    assert get_checkpoints(str(save_dir)) == []


def test_concurrent_snapshots_share_one_writer(tmp_path: Path) -> None:
    errors: list[BaseException] = []

    def run(name: str) -> None:
        try:
            snapshot = Snapshot(str(tmp_path / name), make_state(), writer="process")
            for step in range(1, 4):
                snapshot.save(step).wait()
            snapshot.close()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=run, args=(f"run{i}",)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)
    assert errors == []
    for i in range(3):
        assert len(get_checkpoints(str(tmp_path / f"run{i}"))) == 3


def test_a_full_dev_shm_falls_back_to_the_thread_writer(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert shared_memory_room(1) and not shared_memory_room(10**18)
    # A container's small /dev/shm: staging would die of SIGBUS, so it is not attempted.
    monkeypatch.setattr(
        "tml_checkpointing.writing.writers.shared_memory_room", lambda needed: False
    )
    snapshot = Snapshot(str(tmp_path / "run"), make_state())
    assert snapshot.save(1).wait().endswith("/1")
    assert snapshot._staging.area is None  # written by torchsnapshot's thread
    with pytest.raises(SnapshotStateError, match="/dev/shm has no room"):
        Snapshot(str(tmp_path / "run"), make_state(), writer="process").save(2)


def test_a_staging_block_left_by_a_killed_process_is_swept(tmp_path: Path) -> None:
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)  # fmt: skip
    orphan = Path("/dev/shm", f"tml-staging-{dead.stdout.strip()}-0123456789ab")
    orphan.write_bytes(b"x" * 4096)  # what a SIGKILLed training process leaves behind
    mine = Path("/dev/shm", f"tml-staging-{os.getpid()}-ba9876543210")
    mine.write_bytes(b"y")
    try:
        snapshot = Snapshot(str(tmp_path / "run"), make_state(), writer="process")
        snapshot.save(1).wait()  # staging a new block sweeps the dead process's one
        assert not orphan.exists() and mine.exists()  # a live process's block stays
        snapshot.close()
    finally:
        mine.unlink()
        orphan.unlink(missing_ok=True)


# -- a writer that is ready when needed: no torch, started with the Snapshot ----------------

HEAVY_MODULES = ("torch", "torchsnapshot", "torch.distributed", "yaml")


def test_the_writer_never_imports_torch_before_or_after_a_save(tmp_path: Path) -> None:
    """Asked over its own pipes, as the training side started it: torch would cost a fresh
    writer seconds before its first commit (tens of seconds on a loaded machine)."""
    close_shared_writer()
    snapshot = Snapshot(str(tmp_path / "run"), make_state(), writer="process")
    writer = shared_writer()
    assert writer._process is not None  # started by the constructor, before any save
    before = writer.ping()
    assert before["pid"] == writer._process.pid
    assert "tml_checkpointing.writing.staged_write" in before["modules"]  # it did answer
    assert [m for m in HEAVY_MODULES if m in before["modules"]] == []
    snapshot.save(1).wait()  # the whole write and commit path, run
    after = writer.ping()
    assert after["pid"] == before["pid"]
    assert "tml_checkpointing.storage.checkpoint_files" in after["modules"]
    assert [m for m in HEAVY_MODULES if m in after["modules"]] == []
    snapshot.close()


def test_importing_the_package_or_a_subpackage_imports_no_torch() -> None:
    probe = (
        "import sys, tml_checkpointing, tml_checkpointing.cli, tml_checkpointing.writing,"
        " tml_checkpointing.storage, tml_checkpointing.format, tml_checkpointing.reading,"
        " tml_checkpointing.catalog, tml_checkpointing.lifecycle,"
        " tml_checkpointing.writing.writer_main;"
        f" print(sorted(m for m in {HEAVY_MODULES!r} if m in sys.modules))"
    )
    found = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                           check=True, cwd=REPO)  # fmt: skip
    assert found.stdout.strip() == "[]", found.stdout + found.stderr


def test_the_package_names_are_imported_on_first_use_and_are_the_modules_own() -> None:
    import importlib

    import tml_checkpointing

    sources: dict[str, tuple[str, ...]] = tml_checkpointing._SOURCES
    listed = sorted(name for names in sources.values() for name in names)
    assert listed == sorted(set(tml_checkpointing.__all__) - {"__version__"})
    for module, names in sources.items():
        source = importlib.import_module(f"tml_checkpointing.{module}")
        for name in names:
            assert getattr(tml_checkpointing, name) is getattr(source, name), name
    assert set(tml_checkpointing.__all__) <= set(dir(tml_checkpointing))
    with pytest.raises(AttributeError, match="no attribute 'not_a_name'"):
        tml_checkpointing.not_a_name  # noqa: B018


def test_a_snapshot_starts_the_writer_only_where_it_may_write(tmp_path: Path) -> None:
    close_shared_writer()
    Snapshot(str(tmp_path / "thread"), make_state(), writer="torchsnapshot")
    Snapshot("memory://never-by-the-writer", make_state())  # only this process reaches it
    assert shared_writer()._process is None
    Snapshot(str(tmp_path / "auto"), make_state())  # writer="auto": the writer may take it
    process = shared_writer()._process
    assert process is not None and process.poll() is None
    close_shared_writer()  # never given work: stopped at once, not waited for
    assert process.poll() is not None


# -- a save written in pieces (one per rank in a job), committed once ------------------------


@dataclass
class Piece:
    save: WriterSave
    metadata: str


def write_piece(snapshot: Snapshot, step: int, monkeypatch: pytest.MonkeyPatch) -> Piece:
    """``snapshot.save(step)`` through the writer with ``commit=False``: its files only."""
    pieces: list[Piece] = []
    submit = WriterProcess.submit

    def as_piece(self: WriterProcess, *args: Any, **kwargs: Any) -> WriterSave:
        staged = inspect.signature(submit).bind(self, *args, **kwargs).arguments["staged"]
        save = submit(self, *args, **{**kwargs, "commit": False})
        pieces.append(Piece(save, staged.metadata))
        return save

    with monkeypatch.context() as patch:
        patch.setattr(WriterProcess, "submit", as_piece)
        snapshot.save(step).wait()
    assert len(pieces) == 1
    return pieces[0]


def merged_metadata(*pieces: Piece) -> str:
    """One manifest naming every piece's entries (what rank 0 builds from the ranks' parts)."""
    bodies = [json.loads(piece.metadata) for piece in pieces]
    manifest = {path: entry for body in bodies for path, entry in body["manifest"].items()}
    return json.dumps({**bodies[0], "manifest": manifest})


def two_pieces(
    save_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> tuple[list[Piece], dict[str, torch.nn.Module]]:
    """Step 1 of ``save_dir`` written as two pieces: ``a``'s tensors, then ``b``'s."""
    modules: dict[str, torch.nn.Module] = {
        "a": torch.nn.Linear(64, 32),
        "b": torch.nn.Linear(16, 8),
    }
    snapshot = Snapshot(str(save_dir), {"a": modules["a"]}, writer="process")
    first = write_piece(snapshot, 1, monkeypatch)
    snapshot.state = {"b": modules["b"]}  # another layout: another staging block
    second = write_piece(snapshot, 1, monkeypatch)
    snapshot.close()
    return [first, second], modules


def test_a_piece_writes_its_files_only_and_hands_back_their_records(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pieces, _ = two_pieces(tmp_path / "run", monkeypatch)
    checkpoint = tmp_path / "run" / "1"
    assert not is_committed(str(checkpoint))
    assert (checkpoint / ".writing").exists()  # the claim stays until the commit
    assert not (checkpoint / ".integrity.json").exists()
    data_files = []
    for piece in pieces:
        assert piece.save.exc_info is None and piece.save.records is not None
        records = parse_sidecar(piece.save.records)
        batched = [name for name in records.files if name.startswith("batched/")]
        assert len(batched) == 1
        assert (checkpoint / batched[0]).stat().st_size == records.files[batched[0]].size
        data_files += batched
    assert len(set(data_files)) == 2  # each piece its own data file


def test_pieces_committed_together_make_one_verified_checkpoint(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pieces, modules = two_pieces(tmp_path / "run", monkeypatch)
    url = str(tmp_path / "run" / "1")
    seen: list[str] = []

    def record(event: Event) -> None:
        if event.fields.get("path") == url:
            seen.append(event.name)

    subscribe(record)
    try:
        commit = shared_writer().commit(
            url,
            str(tmp_path / "run"),
            {},
            merged_metadata(*pieces),
            [piece.save.records or b"" for piece in pieces],
        )
        commit.thread.join(120)
    finally:
        unsubscribe(record)
    assert commit.exc_info is None, commit.exc_info
    assert commit.records is None
    assert seen == [SAVE_DATA_WRITTEN, SAVE_SIDECAR_WRITTEN, SAVE_COMMITTED]  # relayed here
    assert is_committed(url) and not Path(url, ".writing").exists()
    sidecar = parse_sidecar(Path(url, ".integrity.json").read_bytes())
    for piece in pieces:
        assert piece.save.records is not None
        assert set(parse_sidecar(piece.save.records).files) <= set(sidecar.files)
    assert verify_checkpoint(url, level="full").status == "valid"
    fresh = {"a": torch.nn.Linear(64, 32), "b": torch.nn.Linear(16, 8)}
    torchsnapshot.Snapshot(url).restore(fresh)  # type: ignore[arg-type,unused-ignore]
    for name, module in modules.items():
        for ours, theirs in zip(
            fresh[name].state_dict().values(), module.state_dict().values(), strict=True
        ):
            assert torch.equal(ours, theirs)


def test_a_commit_refuses_pieces_whose_files_went_away_or_records_are_unreadable(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    pieces, _ = two_pieces(tmp_path / "run", monkeypatch)
    url = str(tmp_path / "run" / "1")
    records = [piece.save.records or b"" for piece in pieces]
    garbled = shared_writer().commit(
        url, str(tmp_path / "run"), {}, merged_metadata(*pieces), [records[0], b"{not json"]
    )
    garbled.thread.join(120)
    assert garbled.exc_info is not None
    assert isinstance(garbled.exc_info[1], CheckpointWriteError)
    assert "piece 1's integrity records" in str(garbled.exc_info[1])
    second = next(n for n in parse_sidecar(records[1]).files if n.startswith("batched/"))
    Path(url, second).unlink()  # the second piece's data, removed under the save
    gone = shared_writer().commit(url, str(tmp_path / "run"), {}, merged_metadata(*pieces), records)
    gone.thread.join(120)
    assert gone.exc_info is not None
    assert "removed or changed" in str(gone.exc_info[1])
    assert not is_committed(url) and not Path(url, ".integrity.json").exists()


def test_a_commit_checks_the_lock_in_the_training_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_dir = tmp_path / "run"
    with WriterLock(str(save_dir), owner="this run"):
        pieces, _ = two_pieces(save_dir, monkeypatch)
        (save_dir / ".writer.lock").unlink()  # the lock is gone: this run may not commit
        commit = shared_writer().commit(
            str(save_dir / "1"),
            str(save_dir),
            {},
            merged_metadata(*pieces),
            [piece.save.records or b"" for piece in pieces],
        )
        commit.thread.join(120)
    assert commit.exc_info is not None
    assert isinstance(commit.exc_info[1], SaveDirLockedError)
    assert not is_committed(str(save_dir / "1"))
    assert Path(save_dir, "1", ".integrity.json").exists()  # stopped right before the marker


def test_rank_parts_are_merged_into_rank_zeros_sidecar_and_removed(tmp_path: Path) -> None:
    """torchsnapshot's multi-rank save, through the torch-free files class its plugin uses."""
    url = str(tmp_path / "run" / "1")
    other = CheckpointFiles(url, rank=1)
    other.write_data("1/model/weight", b"x" * 10)
    part = tmp_path / "run" / "1" / ".integrity.json.rank-1"
    assert set(parse_sidecar(part.read_bytes()).files) == {"1/model/weight"}
    zero = CheckpointFiles(url, rank=0, world_size_of=world_size_of_marker)
    zero.write_data("0/model/weight", b"y" * 20)
    zero.commit(json.dumps({"version": "0.1.0", "world_size": 2, "manifest": {}}).encode())
    sidecar = parse_sidecar((tmp_path / "run" / "1" / ".integrity.json").read_bytes())
    assert set(sidecar.files) == {"0/model/weight", "1/model/weight"}
    assert not part.exists() and is_committed(url)
    # A marker that is YAML but not JSON (written by hand, say): the plugin still reads it.
    assert world_size_of_marker(b"version: 0.1.0\nworld_size: 3\nmanifest: {}\n") == 3
