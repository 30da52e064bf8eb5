"""The one-writer lock on save_dir: refusal, release, takeover of dead holders, on disk and S3."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tml_checkpointing.errors import CheckpointError
from tml_checkpointing.filesystem import join_url, resolve
from tml_checkpointing.locking import LOCK_NAME, SaveDirLockedError, WriterLock


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
        "import sys, time; from tml_checkpointing.locking import WriterLock;"
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
    assert (tmp_path / LOCK_NAME).exists()  # left behind by the SIGKILL
    with WriterLock(str(tmp_path), owner="survivor") as lock:
        assert lock.holder().owner == "survivor"  # type: ignore[union-attr]


def _foreign_lock(save_dir: str, heartbeat_age_s: float) -> None:
    fs, path = resolve(join_url(save_dir, LOCK_NAME))
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


def test_heartbeat_keeps_the_lock_fresh(tmp_path: Path) -> None:
    with WriterLock(str(tmp_path), ttl_seconds=0.2) as lock:
        first = lock.holder()
        deadline = time.monotonic() + 10
        while lock.holder() == first and time.monotonic() < deadline:
            time.sleep(0.02)  # waiting for the heartbeat thread's rewrite
        later = lock.holder()
        assert first is not None and later is not None
        assert later.heartbeat_at > first.heartbeat_at and later.token == first.token
