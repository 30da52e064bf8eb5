"""Crash loop: SIGKILL a saving (and pruning) process at moments it reports, then resume.

Each victim (a child of tests/helpers/crash_saver.py) reports every library event
(``tml_checkpointing.events``) and pauses at the one the test chose, e.g. "data written,
marker pending" or "prune: marker deleted, data not yet"; the test then SIGKILLs it there.
No moment comes from a clock, so a loaded machine changes nothing but the runtime.

After every kill the test proves where it landed: a model of the directory, driven only by
the reported events, must match what is on storage (committed steps, incomplete steps,
sidecars), plus a check particular to the moment (e.g. killed with the marker pending: the
step is not committed, is listed by ``find_incomplete``, its data files are all there, and the
previous checkpoint is the newest valid one). And always: every committed checkpoint verifies
at level "full", the newest valid one is the newest committed one, and it restores the exact
weights saved at its step. The next victim resumes from it.

A share of the moments is random (which event, which occurrence), always chosen among events.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

from tml_checkpointing import (
    DELETE_DONE,
    DELETE_STARTED,
    DELETE_UNCOMMITTED,
    SAVE_COMMITTED,
    SAVE_DATA_WRITTEN,
    SAVE_SIDECAR_WRITTEN,
    SAVE_STARTED,
    Snapshot,
    find_incomplete,
    get_checkpoint,
    get_checkpoints,
    get_latest_valid_checkpoint,
    join_url,
    step_from_checkpoint,
    verify_checkpoint,
)
from tml_checkpointing.format.layout import INTEGRITY_SIDECAR, is_data_file
from tml_checkpointing.format.sidecar import parse_sidecar

from .conftest import S3Server
from .helpers.crash_saver import expected_weights, load_weights, make_model
from .helpers.event_protocol import DirModel, LineReader

HELPER = "tests.helpers.crash_saver"  # run as a module from the repository root
REPO = Path(__file__).resolve().parents[1]

# The moments a kill can land at, in the order one save-and-prune cycle reports them.
MOMENTS = (
    SAVE_STARTED,  # nothing of the save stored yet
    SAVE_DATA_WRITTEN,  # data stored; sidecar and marker pending
    SAVE_SIDECAR_WRITTEN,  # sidecar stored; marker pending
    SAVE_COMMITTED,  # marker in place; prune pending
    DELETE_STARTED,  # prune chose a victim; nothing removed yet
    DELETE_UNCOMMITTED,  # victim's marker removed; its data not yet
    DELETE_DONE,  # victim gone
)
LOCAL_RANDOM_KILLS = 40
S3_RANDOM_KILLS = 3
SEED = int(os.environ.get("TML_CRASH_SEED", "20261129"))


@dataclass
class Kill:
    """Where a victim was stopped, and what it reported before."""

    event: str
    path: str
    resumed_from: int
    events: list[tuple[str, str]]  # (name, path), in order, the pause event last
    links: dict[int, str] = field(default_factory=dict)  # --incremental: step -> link JSON


class Zygote:
    """The crash_saver helper process; reads its stdout on a thread so waits can time out.

    ``options`` go to the helper's command line (``--incremental``: tests/test_incremental_crash).
    """

    def __init__(self, *options: str) -> None:
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        self.process = subprocess.Popen(
            [sys.executable, "-m", HELPER, *options],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            cwd=REPO,
        )
        self.victim: int | None = None
        assert self.process.stdout is not None
        self.lines = LineReader(self.process.stdout)
        assert self.next_line() == "ready"

    def next_line(self, timeout: float = 120) -> str:
        return self.lines.next_line(timeout)

    def run_and_kill(
        self, save_dir: str, pause: str, occurrence: int, only_full: bool = False
    ) -> Kill:
        """Start a victim that pauses at the ``occurrence``-th ``pause`` event (``only_full``:
        counting only events of full checkpoints); SIGKILL it there. Returns what it reported."""
        assert self.process.stdin is not None
        order: dict[str, Any] = {"save_dir": save_dir, "pause": pause, "occurrence": occurrence}
        if only_full:
            order["only_full"] = True
        self.process.stdin.write(json.dumps(order) + "\n")
        self.process.stdin.flush()
        line = self.next_line()
        assert line.startswith("child "), line
        self.victim = int(line.split()[1])
        line = self.next_line()
        assert line.startswith("started "), line
        resumed_from = int(line.split()[1])
        events: list[tuple[str, str]] = []
        links: dict[int, str] = {}
        while True:
            line = self.next_line()
            kind, _, rest = line.partition(" ")
            if kind == "event":
                name, _, path = rest.partition(" ")
                events.append((name, path))
            elif kind == "link":
                step, _, text = rest.partition(" ")
                links[int(step)] = text
            elif kind == "paused":
                break
            else:
                raise AssertionError(f"victim ended before pausing at {pause}: {line!r}")
        name, _, path = rest.partition(" ")
        assert name == pause and events[-1] == (name, path), (line, events[-3:])
        if not only_full:
            assert sum(1 for e, _ in events if e == pause) == occurrence, events
        os.kill(self.victim, signal.SIGKILL)
        line = self.next_line()
        assert line.startswith(f"exited {self.victim} "), f"output after the pause: {line!r}"
        status = int(line.split()[2])
        assert os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL, line
        self.victim = None
        return Kill(pause, path, resumed_from, events, links)

    def close(self) -> None:
        if self.victim is not None:  # a test failed with a victim still paused
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.victim, signal.SIGKILL)
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@pytest.fixture(scope="module")
def zygote(s3_server: S3Server) -> Iterator[Zygote]:
    """Started after the S3 fixture so it inherits the AWS_* endpoint variables."""
    helper = Zygote()
    try:
        yield helper
    finally:
        helper.close()


@pytest.fixture(scope="module")
def data_files(tmp_path_factory: pytest.TempPathFactory) -> list[int]:
    """The sizes of the data files of one checkpoint of the victims' model."""
    model = make_model()
    load_weights(model, expected_weights(0))
    save_dir = str(tmp_path_factory.mktemp("reference"))
    Snapshot(save_dir, {"model": model}).save(0).wait()
    return data_sizes(stored_files(join_url(save_dir, "0")))


def stored_files(checkpoint: str) -> dict[str, int]:
    """Every file under ``checkpoint`` (relative name -> size), fresh from storage."""
    fs, root = fsspec.core.url_to_fs(checkpoint)
    fs.invalidate_cache()
    root = root.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {key[len(root) + 1 :]: int(info["size"]) for key, info in found.items()}


def data_sizes(files: dict[str, int]) -> list[int]:
    """Sizes of the data files among ``files`` (torchsnapshot names them by uuid)."""
    return sorted(size for name, size in files.items() if is_data_file(name))


def sidecar_matches_files(checkpoint: str, files: dict[str, int], data: list[int]) -> None:
    """The sidecar lists one whole checkpoint's data, and each of its files is stored."""
    with fsspec.open(join_url(checkpoint, INTEGRITY_SIDECAR), "rb") as handle:
        sidecar = parse_sidecar(handle.read())
    recorded = {name: record.size for name, record in sidecar.files.items()}
    assert sorted(recorded.values()) == data, f"sidecar of {checkpoint} lists {recorded}"
    assert all(files.get(name) == size for name, size in recorded.items()), "data missing"


def prove_landing(
    save_dir: str, kill: Kill, model: DirModel, earlier: dict[int, dict[str, int]], data: list[int]
) -> dict[int, dict[str, int]]:
    """The directory is exactly what the reported events say, and the moment's own facts hold.

    ``earlier``: the files of each incomplete directory as the previous victim left them;
    returns the same for this one."""
    before = max(model.committed, default=-1)
    assert kill.resumed_from == before, "the victim did not resume from the newest valid step"
    for name, path in kill.events:
        model.apply(name, step_from_checkpoint(path))
    where = f"killed at {kill.event} {kill.path}"
    committed = {step_from_checkpoint(p) for p in get_checkpoints(save_dir)}
    assert committed == model.committed, where
    incomplete = {entry.step for entry in find_incomplete(save_dir, 0)}
    assert incomplete == model.incomplete, where
    listings = {step: stored_files(join_url(save_dir, str(step))) for step in incomplete}
    for step, listing in listings.items():
        assert (INTEGRITY_SIDECAR in listing) == (step in model.sidecars), f"{where}: {step}"

    step = step_from_checkpoint(kill.path)
    files = stored_files(kill.path)
    # Files of this attempt: torchsnapshot names data files by uuid, so an earlier attempt's
    # leftovers (same step, killed before commit) are the names listed back then.
    fresh = {name: size for name, size in files.items() if name not in earlier.get(step, {})}
    if kill.event == SAVE_STARTED:
        assert step not in committed, where
        assert not fresh, f"{where}: files stored before the save began: {fresh}"
    elif kill.event == SAVE_DATA_WRITTEN:
        assert step not in committed and step in incomplete, where
        assert data_sizes(fresh) == data, f"{where}: data files {fresh}"
    elif kill.event == SAVE_SIDECAR_WRITTEN:
        assert step not in committed and step in incomplete, where
        assert data_sizes(fresh) == data, f"{where}: data files {fresh}"
        sidecar_matches_files(kill.path, files, data)
    elif kill.event == DELETE_UNCOMMITTED:
        assert step not in committed and step in incomplete, where
        sidecar_matches_files(kill.path, files, data)  # marker gone, all data still there
    elif kill.event in (SAVE_COMMITTED, DELETE_STARTED):
        assert step in committed, where
        assert verify_checkpoint(kill.path, level="full").status == "valid", where
        if kill.event == SAVE_COMMITTED:
            assert step == max(committed), f"{where}: a newer checkpoint exists"
    elif kill.event == DELETE_DONE:
        assert not files and step not in committed | incomplete, where
    else:
        raise AssertionError(f"no proof for {kill.event}")
    check_newest_valid(save_dir, max(committed, default=None))
    return listings


def check_newest_valid(save_dir: str, newest: int | None) -> None:
    """Every committed checkpoint verifies; the newest restores the weights of its step."""
    latest = get_latest_valid_checkpoint(save_dir, verify="full")
    if newest is None:
        assert not latest
        return
    assert latest == get_checkpoint(save_dir) == join_url(save_dir, str(newest))
    for checkpoint in get_checkpoints(save_dir):
        assert verify_checkpoint(checkpoint, level="full").status == "valid", checkpoint
    model = make_model()
    Snapshot(save_dir, {"model": model}).restore(latest, verify="none")
    for restored, expected in zip(model.parameters(), expected_weights(newest), strict=True):
        assert torch.equal(restored, expected)


def crash_loop(
    zygote: Zygote, save_dir: str, moments: list[tuple[str, int]], data: list[int]
) -> DirModel:
    model = DirModel()
    listings: dict[int, dict[str, int]] = {}
    for event, occurrence in moments:
        kill = zygote.run_and_kill(save_dir, event, occurrence)
        listings = prove_landing(save_dir, kill, model, listings, data)
    return model


def planned_moments(random_kills: int, seed: int) -> list[tuple[str, int]]:
    """Every moment once (first and second occurrence), then ``random_kills`` drawn ones."""
    chooser = random.Random(seed)
    fixed = [(event, 1) for event in MOMENTS] + [(event, 2) for event in MOMENTS]
    drawn = [(chooser.choice(MOMENTS), chooser.randint(1, 3)) for _ in range(random_kills)]
    return fixed + drawn


def test_sigkill_at_reported_moments_local(
    zygote: Zygote, data_files: list[int], tmp_path: Path
) -> None:
    moments = planned_moments(LOCAL_RANDOM_KILLS, SEED)
    model = crash_loop(zygote, str(tmp_path / "run"), moments, data_files)
    assert model.committed, "no checkpoint survived the loop: it tested nothing"


def test_sigkill_at_reported_moments_s3(
    zygote: Zygote, data_files: list[int], s3_save_dir: str
) -> None:
    chooser = random.Random(SEED + 1)
    moments = [(event, 1) for event in MOMENTS]
    moments += [(chooser.choice(MOMENTS), chooser.randint(1, 2)) for _ in range(S3_RANDOM_KILLS)]
    model = crash_loop(zygote, s3_save_dir, moments, data_files)
    assert model.committed
