"""The one-writer lock on save_dir: refusal, release, takeover of dead holders, on disk and S3;
races of many processes (exactly one winner); a holder that lost its lock stops saving."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import s3fs
import torch
from torchsnapshot import StateDict

from tml_checkpointing import Snapshot, is_committed
from tml_checkpointing.errors import CheckpointError
from tml_checkpointing.format.layout import WRITER_LOCK
from tml_checkpointing.storage.filesystem import join_url, resolve
from tml_checkpointing.storage.locking import SaveDirLockedError, WriterLock

from .conftest import _wait_until_serving, free_port

REPO = Path(__file__).resolve().parents[1]
CONTENDERS = 8
ANSWER_S = 120  # generous: a loaded 2-core machine; a hang still ends the test


def test_second_writer_is_refused_until_release(save_dir: str) -> None:
    with WriterLock(save_dir, owner="run A"):
        with pytest.raises(SaveDirLockedError, match=r"being written by run A \(pid") as caught:
            WriterLock(save_dir, owner="run B").acquire()
        assert isinstance(caught.value, CheckpointError)
    with WriterLock(save_dir, owner="run B") as lock:
        holder = lock.holder()
        assert holder is not None and holder.owner == "run B"
    assert WriterLock(save_dir).holder() is None


def test_lock_of_a_killed_process_on_this_host_is_taken_over(tmp_path: Path) -> None:
    script = (
        "import sys, time; from tml_checkpointing.storage.locking import WriterLock;"
        "WriterLock(sys.argv[1], owner='doomed').acquire(); print('locked', flush=True);"
        "time.sleep(600)"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", script, str(tmp_path)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        with pytest.raises(SaveDirLockedError, match="doomed"):
            WriterLock(str(tmp_path)).acquire()
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    finally:
        holder.kill()
        holder.wait()
    assert (tmp_path / WRITER_LOCK).exists()  # left behind by the SIGKILL
    with WriterLock(str(tmp_path), owner="survivor") as lock:
        assert lock.holder().owner == "survivor"  # type: ignore[union-attr]


def _foreign_lock(
    save_dir: str, heartbeat_age_s: float, options: dict[str, Any] | None = None
) -> None:
    """A lock record written by a holder on another host (no pid check possible)."""
    fs, path = resolve(join_url(save_dir, WRITER_LOCK), options)
    if "://" not in save_dir:
        fs.makedirs(path.rsplit("/", 1)[0], exist_ok=True)
    now = time.time()
    record = {"token": "x", "owner": "elsewhere", "host": "another-host", "pid": 1,
              "acquired_at": now - 3600, "heartbeat_at": now - heartbeat_age_s}  # fmt: skip
    fs.pipe_file(path, json.dumps(record).encode())


def test_other_hosts_lock_counts_while_its_heartbeat_is_fresh(save_dir: str) -> None:
    _foreign_lock(save_dir, heartbeat_age_s=5)
    with pytest.raises(SaveDirLockedError, match="elsewhere"):
        WriterLock(save_dir, ttl_seconds=60).acquire()
    _foreign_lock(save_dir, heartbeat_age_s=120)
    with WriterLock(save_dir, ttl_seconds=60, owner="new") as lock:
        assert lock.holder().owner == "new"  # type: ignore[union-attr]


def test_an_unreadable_lock_counts_as_live_until_it_is_older_than_the_ttl(tmp_path: Path) -> None:
    """A torn or foreign lock file is not a dead holder's: it may be being written right now."""
    (tmp_path / WRITER_LOCK).write_bytes(b"")
    with pytest.raises(SaveDirLockedError, match="unreadable lock"):
        WriterLock(str(tmp_path), ttl_seconds=60).acquire()
    with WriterLock(str(tmp_path), ttl_seconds=0, owner="new") as lock:  # now older than 0 s
        assert lock.holder().owner == "new"  # type: ignore[union-attr]


def test_heartbeat_keeps_the_lock_fresh(save_dir: str) -> None:
    with WriterLock(save_dir, ttl_seconds=0.2) as lock:
        first = lock.holder()
        deadline = time.monotonic() + 30
        while lock.holder() == first and time.monotonic() < deadline:
            time.sleep(0.02)  # waiting for the heartbeat thread's rewrite
        later = lock.holder()
        assert first is not None and later is not None
        assert later.heartbeat_at > first.heartbeat_at and later.token == first.token
        assert not lock.lost
        lock.check()


# -- races of many processes -----------------------------------------------------------------


class Zygote:
    """tests/helpers/lock_contenders.py, reading its stdout on a thread (waits time out)."""

    def __init__(self) -> None:
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.helpers.lock_contenders"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            cwd=REPO,
        )
        self.lines: list[str] = []
        self.changed = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            with self.changed:
                self.lines.append(line.strip())
                self.changed.notify_all()

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def take(self, count: int, *prefixes: str) -> list[str]:
        """Wait for ``count`` lines starting with one of ``prefixes``; consume them."""

        def matching() -> list[str]:
            return [line for line in self.lines if line.startswith(prefixes)]

        with self.changed:
            found = self.changed.wait_for(lambda: len(matching()) >= count, timeout=ANSWER_S)
            assert found, f"expected {count} x {prefixes}, got {self.lines}"
            taken = matching()[:count]
            for line in taken:
                self.lines.remove(line)
            return taken

    def stop(self) -> None:
        assert self.process.stdin is not None
        self.process.stdin.close()
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


@dataclass
class Race:
    zygote: Zygote
    winners: dict[int, str] = field(default_factory=dict)  # contender -> its token
    refused: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    def release(self) -> None:
        self.zygote.send("release")
        (done,) = self.zygote.take(1, "done")
        assert all(status == "0" for status in done.split()[1:]), done


def race(
    zygote: Zygote,
    save_dir: str,
    *,
    n: int,
    ttl: float = 120,
    options: dict[str, Any] | None = None,
) -> Race:
    """``n`` processes try ``WriterLock(save_dir).acquire()`` at the same moment."""
    zygote.send(json.dumps({"save_dir": save_dir, "n": n, "ttl": ttl, "storage_options": options}))
    zygote.take(n, "ready")  # every contender is blocked on the go pipe
    zygote.send("go")
    result = Race(zygote)
    for line in zygote.take(n, "won", "refused", "error"):
        verdict, index, *rest = line.split(" ", 2)
        if verdict == "won":
            result.winners[int(index)] = rest[0]
        elif verdict == "refused":
            result.refused.append(int(index))
        else:
            result.errors.append(line)
    return result


@pytest.fixture(scope="module")
def zygote() -> Iterator[Zygote]:
    process = Zygote()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def serial_s3() -> Iterator[str]:
    """A moto server that handles one request at a time, as S3 guarantees for conditions.

    moto checks a PUT's If-None-Match / If-Match and then stores the object as two steps
    without a lock, so on its threaded server two concurrent conditional PUTs can both pass
    (a moto limitation; S3 evaluates the condition atomically with the write). Serving one
    request at a time restores S3's guarantee; the contenders still race for real.
    """
    port = free_port()
    script = (
        "import sys; from werkzeug.serving import run_simple;"
        "from moto.moto_server.werkzeug_app import DomainDispatcherApplication, "
        "create_backend_app;"
        "run_simple('127.0.0.1', int(sys.argv[1]), "
        "DomainDispatcherApplication(create_backend_app), threaded=False)"
    )
    process = subprocess.Popen(
        [sys.executable, "-c", script, str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    endpoint = f"http://127.0.0.1:{port}"
    try:
        _wait_until_serving(endpoint, process)  # type: ignore[arg-type]
        yield endpoint
    finally:
        process.terminate()
        process.wait(timeout=30)


@dataclass
class Place:
    save_dir: str
    options: dict[str, Any] | None


@pytest.fixture(params=["local", "s3"])
def place(request: pytest.FixtureRequest, tmp_path: Path) -> Place:
    """A fresh save_dir on local disk, or in a new bucket of the serial moto server."""
    if request.param == "local":
        return Place(str(tmp_path / "run"), None)
    endpoint = request.getfixturevalue("serial_s3")
    options = {"endpoint_url": endpoint, "key": "testing", "secret": "testing"}
    bucket = f"lock-{time.monotonic_ns()}"
    s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
    return Place(f"s3://{bucket}/run", options)


def _holder_token(place: Place) -> str | None:
    holder = WriterLock(place.save_dir, storage_options=place.options).holder()
    return None if holder is None else holder.token


def test_exactly_one_of_many_processes_wins_a_free_lock(zygote: Zygote, place: Place) -> None:
    result = race(zygote, place.save_dir, n=CONTENDERS, options=place.options)
    try:
        assert result.errors == []
        assert len(result.winners) == 1, result
        assert len(result.refused) == CONTENDERS - 1
        assert _holder_token(place) == next(iter(result.winners.values()))
    finally:
        result.release()
    assert _holder_token(place) is None  # the winner's release removed it


def test_exactly_one_of_many_processes_takes_over_a_stale_lock(
    zygote: Zygote, place: Place
) -> None:
    # Ten rounds on local disk (0.2 s each): with delete-then-create, contenders that all read
    # the stale record "won" together in some rounds (seen: 4, 4 and 2 winners in a round);
    # ten rounds caught it on every try.
    for _ in range(10 if place.options is None else 1):
        _foreign_lock(place.save_dir, heartbeat_age_s=3600, options=place.options)
        result = race(zygote, place.save_dir, n=CONTENDERS, options=place.options)
        try:
            assert result.errors == []
            assert len(result.winners) == 1, result
            assert len(result.refused) == CONTENDERS - 1
            assert _holder_token(place) == next(iter(result.winners.values()))
        finally:
            result.release()


def test_a_live_lock_is_never_broken(zygote: Zygote, place: Place) -> None:
    with WriterLock(place.save_dir, owner="live", storage_options=place.options) as lock:
        result = race(zygote, place.save_dir, n=CONTENDERS, options=place.options)
        try:
            assert result.errors == [] and result.winners == {}
            assert len(result.refused) == CONTENDERS
            lock.check()  # still ours
            assert _holder_token(place) == lock.holder().token  # type: ignore[union-attr]
        finally:
            result.release()


# -- a holder that lost its lock stops saving --------------------------------------------------


def _take_over(zygote: Zygote, place: Place) -> str:
    """Another process decides the holder is dead (a TTL of 0 s) and takes the lock over."""
    result = race(zygote, place.save_dir, n=1, ttl=0, options=place.options)
    assert result.errors == [] and len(result.winners) == 1, result
    result.release()  # the usurper goes away too: its record is gone, ours is not back
    return next(iter(result.winners.values()))


def test_a_run_that_lost_its_lock_fails_its_next_save(zygote: Zygote, place: Place) -> None:
    state = {"model": torch.nn.Linear(4, 4)}
    snapshot = Snapshot(place.save_dir, state, storage_options=place.options)
    with WriterLock(place.save_dir, owner="slow run", storage_options=place.options) as lock:
        snapshot.save(1).wait()  # holding: saves work
        _take_over(zygote, place)
        with pytest.raises(SaveDirLockedError, match="lost the writer lock") as caught:
            snapshot.save(2)
        assert isinstance(caught.value, CheckpointError)
        assert lock.lost
        with pytest.raises(SaveDirLockedError):  # and every later save too
            snapshot.save(3)
    assert is_committed(join_url(place.save_dir, "1"), place.options)
    assert not is_committed(join_url(place.save_dir, "2"), place.options)


class Gate:
    """A state leaf whose pickling (done while the checkpoint is written) waits for the test."""

    reached = threading.Event()
    proceed = threading.Event()

    def __deepcopy__(self, memo: dict[int, Any]) -> Gate:
        return self  # the save-time copy must stay this object

    def __reduce__(self) -> tuple[type[Gate], tuple[()]]:
        Gate.reached.set()
        assert Gate.proceed.wait(ANSWER_S)
        return (Gate, ())


def test_a_lock_lost_while_a_save_is_in_flight_stops_its_commit(
    zygote: Zygote, tmp_path: Path
) -> None:
    place = Place(str(tmp_path / "run"), None)
    Gate.reached.clear()
    Gate.proceed.clear()
    state = {"model": torch.nn.Linear(4, 4), "gate": StateDict(gate=Gate())}
    snapshot = Snapshot(place.save_dir, state)
    outcome: list[BaseException | str] = []

    def save() -> None:
        try:
            outcome.append(snapshot.save(1).wait())
        except BaseException as error:
            outcome.append(error)

    with WriterLock(place.save_dir, owner="slow run"):
        saver = threading.Thread(target=save)
        saver.start()
        try:
            assert Gate.reached.wait(ANSWER_S)  # save() checked the lock; data not yet written
            _take_over(zygote, place)
        finally:
            Gate.proceed.set()
            saver.join(ANSWER_S)
    assert len(outcome) == 1 and isinstance(outcome[0], SaveDirLockedError), outcome
    assert not is_committed(join_url(place.save_dir, "1"))  # the marker was never written
