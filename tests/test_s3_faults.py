"""S3 faults end in bounded time with named errors (issue 8, point 5).

An endpoint that refuses connections, one that accepts them and never answers (a hung proxy, a
SIGSTOPped server), one that freezes in the middle of a save, a bucket that does not exist and
a URL without a bucket: the CLI exits 3 (storage) or 2 (bad input) with valid ``--json``, the
API raises CheckpointReadError / CheckpointWriteError / StorageLocationNotFoundError /
InvalidStorageUrlError, each within 60 s, with the library's default timeouts (no tuning).
The time bounds are generous: they tell "bounded" from "hangs", they do not benchmark.

The frozen cases each take ~25 s (3 attempts x an 8 s read timeout), so they run at the same
time, in one test: CLI subprocesses, API calls on threads and a save whose server freezes.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import s3fs
import torch

from tml_checkpointing import (
    CheckpointReadError,
    CheckpointWriteError,
    InvalidStorageUrlError,
    Snapshot,
    StorageLocationNotFoundError,
    WriterLock,
    get_checkpoint,
    verify_checkpoint,
)
from tml_checkpointing.storage.filesystem import S3_CONFIG_DEFAULTS, UPLOAD_PART_SIZE, resolve

from .conftest import S3Server, _wait_until_serving, free_port, start_moto, stop_process

REPO = Path(__file__).resolve().parents[1]
BOUND_S = 60  # what the issue promises, for the CLI (imports included) and the API
TML = [sys.executable, "-m", "flows.cli", "checkpoints"]
CREDENTIALS = {"key": "testing", "secret": "testing"}


# -- endpoints that misbehave ------------------------------------------------------------------


def refused_endpoint() -> str:
    """A loopback port with nothing listening: every connection is refused at once."""
    return f"http://127.0.0.1:{free_port()}"


class FrozenEndpoint:
    """Accepts every connection, reads nothing, answers nothing (a thread of the test)."""

    def __init__(self) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(256)
        self.accepted: list[socket.socket] = []
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.listener.getsockname()[1]}"

    def _accept(self) -> None:
        while True:
            try:
                connection, _ = self.listener.accept()
            except OSError:  # shut down by close()
                return
            self.accepted.append(connection)

    def close(self) -> None:
        self.listener.shutdown(socket.SHUT_RDWR)  # wakes the blocked accept()
        self.listener.close()
        self.thread.join(10)
        for connection in self.accepted:
            connection.close()


@pytest.fixture
def frozen() -> Iterator[FrozenEndpoint]:
    endpoint = FrozenEndpoint()
    yield endpoint
    endpoint.close()


class FreezingMoto:
    """A moto server that freezes (SIGSTOP) once it has served the request naming ``marker``."""

    def __init__(self, marker: str) -> None:
        self.port = free_port()
        self.marker = marker
        self.frozen = threading.Event()
        self.frozen_at = 0.0
        self.process = start_moto(self.port, subprocess.PIPE)
        threading.Thread(target=self._watch, daemon=True).start()
        _wait_until_serving(self.url, self.process)  # type: ignore[arg-type]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _watch(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if self.marker in line and not self.frozen.is_set():
                self.process.send_signal(signal.SIGSTOP)
                self.frozen_at = time.monotonic()
                self.frozen.set()

    def stop(self) -> None:
        self.process.send_signal(signal.SIGCONT)
        stop_process(self.process)


# -- running things with a stopwatch -----------------------------------------------------------


@dataclass
class CliRun:
    argv: list[str]
    process: subprocess.Popen[str]
    started: float = field(default_factory=time.monotonic)
    code: int | None = None
    stdout: str = ""
    stderr: str = ""
    elapsed: float = 0.0

    def finish(self) -> CliRun:
        self.stdout, self.stderr = self.process.communicate(timeout=3 * BOUND_S)
        self.elapsed = time.monotonic() - self.started
        self.code = self.process.returncode
        return self

    def error(self) -> dict[str, Any]:
        """The ``--json`` error object: stdout must be exactly that, and valid."""
        payload = json.loads(self.stdout)
        assert isinstance(payload, dict) and payload["exit_code"] == self.code, payload
        assert isinstance(payload["error"], str) and payload["error"]
        return payload


def start_cli(endpoint: str, *args: str) -> CliRun:
    env = {
        **os.environ,
        "AWS_ENDPOINT_URL": endpoint,
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    for key in ("AWS_MAX_ATTEMPTS", "AWS_RETRY_MODE"):  # the library's defaults, untouched
        env.pop(key, None)
    argv = [*TML, *args, "--json"]
    process = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO, env=env
    )
    return CliRun(argv, process)


@dataclass
class ApiCall:
    name: str
    outcome: BaseException | object = None
    elapsed: float = 0.0
    ended_at: float = 0.0
    thread: threading.Thread | None = None

    def join(self) -> ApiCall:
        assert self.thread is not None
        self.thread.join(3 * BOUND_S)
        assert not self.thread.is_alive(), f"{self.name} still running after {3 * BOUND_S}s"
        return self


def start_api(name: str, call: Callable[[], object]) -> ApiCall:
    record = ApiCall(name)

    def run() -> None:
        started = time.monotonic()
        try:
            record.outcome = call()
        except BaseException as error:
            record.outcome = error
        record.ended_at = time.monotonic()
        record.elapsed = record.ended_at - started

    record.thread = threading.Thread(target=run, name=name)
    record.thread.start()
    return record


def assert_named(call: ApiCall, error: type[BaseException], *fragments: str) -> None:
    print(f"{call.name}: {call.elapsed:.1f}s {type(call.outcome).__name__}: {call.outcome}")
    assert isinstance(call.outcome, error), f"{call.name}: {call.outcome!r}"
    assert call.elapsed < BOUND_S, f"{call.name} took {call.elapsed:.0f}s"
    for fragment in fragments:
        assert fragment in str(call.outcome), f"{call.name}: {call.outcome}"


def small_state() -> dict[str, torch.nn.Module]:
    return {"model": torch.nn.Linear(8, 8)}


def large_state() -> dict[str, torch.nn.Module]:
    """12 MiB: more than one upload part (UPLOAD_PART_SIZE)."""
    return {"model": torch.nn.Linear(1792, 1792)}


def api_calls(endpoint: str, save_dir: str) -> list[ApiCall]:
    """save + wait, restore and get_checkpoint against ``endpoint``, all at once."""
    options = {"endpoint_url": endpoint, **CREDENTIALS}
    return [
        start_api(
            "save",
            lambda: Snapshot(save_dir, small_state(), storage_options=options).save(1).wait(),
        ),
        start_api(
            "restore",
            lambda: Snapshot(save_dir, small_state(), storage_options=options).restore(
                f"{save_dir}/1"
            ),
        ),
        start_api("get_checkpoint", lambda: get_checkpoint(save_dir, storage_options=options)),
    ]


def assert_api_named_the_fault(calls: list[ApiCall], cause: str) -> None:
    save, restore, latest = (call.join() for call in calls)
    assert_named(save, CheckpointWriteError, "nothing was committed", cause)
    assert_named(restore, CheckpointReadError, cause)
    assert_named(latest, CheckpointReadError, cause)


def assert_cli_exit(run: CliRun, code: int, *fragments: str) -> None:
    print(f"{' '.join(run.argv[3:])}: {run.elapsed:.1f}s exit {run.code} {run.stdout.strip()}")
    assert run.code == code, (run.argv, run.code, run.stdout, run.stderr[-2000:])
    payload = run.error()
    assert "Traceback" not in run.stderr, run.stderr[-2000:]
    assert run.elapsed < BOUND_S, f"{run.argv} took {run.elapsed:.0f}s"
    for fragment in fragments:
        assert fragment in payload["error"], payload


# -- the cases -----------------------------------------------------------------------------------


def test_refused_endpoint_is_a_storage_error_for_every_command_and_call() -> None:
    endpoint = refused_endpoint()
    runs = [
        start_cli(endpoint, "list", "s3://bucket/run"),
        start_cli(endpoint, "verify", "s3://bucket/run"),
        start_cli(endpoint, "inspect", "s3://bucket/run/1"),
        start_cli(endpoint, "prune", "s3://bucket/run", "--keep-last", "1"),
        start_cli(endpoint, "clean-incomplete", "s3://bucket/run", "--older-than", "1h"),
    ]
    calls = api_calls(endpoint, "s3://bucket/run")
    for run in runs:
        assert_cli_exit(run.finish(), 3, "storage error", "Could not connect")
    assert_api_named_the_fault(calls, "Could not connect")


def test_frozen_endpoint_and_a_server_freezing_mid_save_fail_in_bounded_time(
    frozen: FrozenEndpoint,
) -> None:
    # A save whose server freezes once it has received the first part of the save's data (12 MiB:
    # a multipart upload): the upload then waits for answers that never come.
    bucket = "freezing"
    freezing = FreezingMoto(marker="partNumber=1")
    try:
        options = {"endpoint_url": freezing.url, **CREDENTIALS}
        s3fs.S3FileSystem(**options, skip_instance_cache=True).mkdir(bucket)
        mid_save = start_api(
            "mid-save",
            lambda: (
                Snapshot(f"s3://{bucket}/run", large_state(), storage_options=options)
                .save(1)
                .wait()
            ),
        )
        runs = [
            start_cli(frozen.url, "list", "s3://bucket/run"),
            start_cli(frozen.url, "verify", "s3://bucket/run"),
        ]
        calls = api_calls(frozen.url, "s3://bucket/run")
        for run in runs:
            assert_cli_exit(run.finish(), 3, "storage error", "timeout")
        assert_api_named_the_fault(calls, "timeout")
        assert len(frozen.accepted) >= 5  # they did connect: frozen, not refused

        mid_save.join()
        assert freezing.frozen.is_set()
        # Bounded from the moment the server froze (before it, the save made real progress,
        # slowly on a loaded machine).
        mid_save.elapsed = mid_save.ended_at - freezing.frozen_at
        assert_named(mid_save, CheckpointWriteError, "nothing was committed")
        # Cut by the deadline of a write request, or by the read timeout when the server froze
        # while sending its answer.
        assert "stalled" in str(mid_save.outcome) or "Read timeout" in str(mid_save.outcome)
    finally:
        freezing.stop()


def test_missing_bucket_is_named_and_never_created(s3_server: S3Server) -> None:
    options = {"endpoint_url": s3_server.endpoint, **CREDENTIALS}
    save_dir = "s3://no-such-bucket/run"
    runs = [
        start_cli(s3_server.endpoint, "list", save_dir),
        start_cli(s3_server.endpoint, "verify", save_dir),
    ]
    with pytest.raises(StorageLocationNotFoundError, match="bucket 'no-such-bucket' does not"):
        WriterLock(save_dir, storage_options=options).acquire()  # what `tml train` takes first
    with pytest.raises(StorageLocationNotFoundError, match="never create buckets"):
        Snapshot(save_dir, small_state(), storage_options=options).save(1).wait()
    for run in runs:
        assert_cli_exit(run.finish(), 2, "bucket 'no-such-bucket' does not exist")
    buckets = s3fs.S3FileSystem(**options, skip_instance_cache=True).ls("")
    assert "no-such-bucket" not in buckets


def test_url_without_a_bucket_is_bad_input() -> None:
    runs = [
        start_cli(refused_endpoint(), "list", "s3://"),
        start_cli(refused_endpoint(), "verify", "s3:///run"),
    ]
    for url in ("s3://", "s3:///run", "s3a://"):
        with pytest.raises(InvalidStorageUrlError, match="names no bucket"):
            Snapshot(url, small_state())
        with pytest.raises(InvalidStorageUrlError):
            get_checkpoint(url)
    for run in runs:
        assert_cli_exit(run.finish(), 2, "names no bucket", "s3://<bucket>/<path>")


def test_s3_timeouts_and_retries_have_defaults_that_storage_options_override() -> None:
    fs, _ = resolve("s3://bucket/run", {"endpoint_url": refused_endpoint()})
    assert {k: fs.config_kwargs[k] for k in S3_CONFIG_DEFAULTS} == S3_CONFIG_DEFAULTS
    assert fs.retries == 1  # s3fs's own loop off: botocore's retries are the one layer
    options = {"endpoint_url": refused_endpoint(), "config_kwargs": {"read_timeout": 60}}
    fs, _ = resolve("s3://bucket/run", options)
    assert fs.config_kwargs["read_timeout"] == 60  # the caller's key wins ...
    assert fs.config_kwargs["connect_timeout"] == S3_CONFIG_DEFAULTS["connect_timeout"]
    assert options == {
        "endpoint_url": options["endpoint_url"],
        "config_kwargs": {"read_timeout": 60},
    }


def test_a_large_shard_still_saves_and_restores_with_the_defaults(s3_server: S3Server) -> None:
    """Read timeouts apply per socket read and large objects go up in parts: a 40 MiB tensor
    (one object) is stored whole and restored bit for bit."""
    save_dir = f"s3://{s3_server.new_bucket()}/run"
    weights = torch.randn(10 * 1024 * 1024)  # 40 MiB: five 8 MiB parts
    assert weights.numel() * 4 > 4 * UPLOAD_PART_SIZE
    state = {"model": torch.nn.ParameterDict({"big": torch.nn.Parameter(weights)})}
    snapshot = Snapshot(save_dir, state)
    checkpoint = snapshot.save(1).wait()
    assert verify_checkpoint(checkpoint, level="full").ok
    fresh = {
        "model": torch.nn.ParameterDict({"big": torch.nn.Parameter(torch.zeros_like(weights))})
    }
    Snapshot(save_dir, fresh).restore(checkpoint)
    assert torch.equal(fresh["model"]["big"], weights)
    log = s3_server.log_path.read_text()
    assert "partNumber=5" in log  # it did go up as a multipart upload
