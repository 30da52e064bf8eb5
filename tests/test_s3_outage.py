"""S3 outage: the server dies in the middle of a save -> clear error, nothing committed; the
server comes back -> the next save succeeds. Uses its own moto server, so killing it does not
disturb the session's."""

from __future__ import annotations

import subprocess
import threading
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field

import pytest
import s3fs
import torch

from tml_checkpointing import (
    CheckpointWriteError,
    Snapshot,
    get_checkpoints,
    verify_checkpoint,
)

from .conftest import _wait_until_serving, free_port, start_moto, stop_process

BUCKET = "outage-bucket"


@dataclass
class WatchedServer:
    """A moto server whose request log is read line by line as it is written."""

    port: int
    stop_on: str | None = None
    lines: list[str] = field(default_factory=list)
    stopped: threading.Event = field(default_factory=threading.Event)
    process: subprocess.Popen[str] | None = None

    def start(self) -> None:
        self.process = start_moto(self.port, subprocess.PIPE)
        threading.Thread(target=self._watch, daemon=True).start()
        _wait_until_serving(self.endpoint, self.process)  # type: ignore[arg-type]

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _watch(self) -> None:
        assert self.process is not None and self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line)
            if self.stop_on and self.stop_on in line and not self.stopped.is_set():
                self.stop()  # the event: the first data object has been stored

    def stop(self) -> None:
        assert self.process is not None
        self.stopped.set()
        stop_process(self.process)


@pytest.fixture
def port() -> Iterator[int]:
    yield free_port()


def big_state() -> dict[str, torch.nn.Module]:
    # 64 MiB of tensors: the save outlives the moment the first object is stored.
    return {"model": torch.nn.Sequential(*[torch.nn.Linear(1024, 1024) for _ in range(16)])}


def test_server_dies_mid_save_then_comes_back(port: int) -> None:
    # The library's own timeouts and retries (filesystem.S3_CONFIG_DEFAULTS): no tuning needed
    # for a dead endpoint to fail fast.
    options = {"key": "testing", "secret": "testing"}
    save_dir = f"s3://{BUCKET}/run"
    server = WatchedServer(port, stop_on=f"PUT /{BUCKET}/run/1/")
    server.start()
    options["endpoint_url"] = server.endpoint
    s3fs.S3FileSystem(**options).mkdir(BUCKET)
    state = big_state()
    snapshot = Snapshot(save_dir, state, storage_options=options)

    started = time.monotonic()
    with pytest.raises(CheckpointWriteError, match="nothing was committed") as caught:
        snapshot.save(1).wait()  # the error may surface from save() or from wait()
    assert time.monotonic() - started < 60
    assert server.stopped.is_set()
    assert "Could not connect" in str(caught.value) or "connect" in str(caught.value).lower()
    puts = [line for line in server.lines if '"PUT ' in line]
    assert any(f"PUT /{BUCKET}/run/1/" in line for line in puts)  # data arrived before the outage
    assert not any(".snapshot_metadata" in line for line in puts)  # the marker never did

    # The server comes back on the same port; moto keeps nothing, so the bucket is recreated.
    again = WatchedServer(port)
    again.start()
    try:
        s3fs.S3FileSystem(**options).mkdir(BUCKET)
        assert get_checkpoints(save_dir, storage_options=options) == []
        checkpoint = snapshot.save(1).wait()
        assert verify_checkpoint(checkpoint, level="full", storage_options=options).ok
        fresh = big_state()
        Snapshot(save_dir, fresh, storage_options=options).restore(checkpoint)
        for got, want in zip(fresh["model"].parameters(), state["model"].parameters(), strict=True):
            assert torch.equal(got, want)
    finally:
        again.stop()


def test_moto_readiness_helper_is_reachable(port: int) -> None:
    """Guard for the fixture above: nothing listens on a fresh port."""
    with pytest.raises(OSError):
        urllib.request.urlopen(f"http://127.0.0.1:{port}/moto-api/", timeout=1)
