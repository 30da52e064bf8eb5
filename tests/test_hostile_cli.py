"""What a new user's hostile pass found in ``tml train/evaluate/retrain``, run as a user runs them.

* Bad input is one line (``error: ...``; under ``--json`` also ``{"error", "exit_code"}`` as the
  only stdout line) with the documented exit code, never a traceback -- also for the refusals
  the flow itself would make (a missing bucket, a bad partition name, a save_dir another live
  run holds: exit 5), which are now checked before the flow starts.
* A run is never shortened below a step it committed, not even with ``--allow-changed-config``.
* A nightly retrain skips a corrupt warm-start checkpoint for the newest one that verifies.
* An API the user named (``PREFECT_API_URL``) that dies mid-run is noticed within seconds:
  training stops at its next step (committed) and ``tml`` exits 4.
* A stop signal during start-up never starts the next stage (server, flow, training).

Every process runs on loopback, in its own session, and is killed with its group in ``finally``.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch

from flows.retrain import Lineage, read_lineage, retrain, write_lineage
from tml_checkpointing import Snapshot, get_checkpoints, step_from_checkpoint
from tml_checkpointing.format.layout import RUN_INFO
from tml_checkpointing.format.layout import WRITER_LOCK as LOCK_NAME
from tml_checkpointing.reading.verify import verify_checkpoint
from tml_checkpointing.storage.locking import WriterLock
from training.config import SEED_MAX, SEED_MIN, RunParams, TrainConfig

from .conftest import PrefectServer, S3Server, _stop_group, _wait_until_healthy, free_port

REPO = Path(__file__).resolve().parents[1]
TML = [sys.executable, "-m", "flows.cli"]
TINY = ["--steps-per-epoch", "3", "--batch-size", "16"]
EXIT_BAD_INPUT, EXIT_PREFECT_API, EXIT_LOCKED = 2, 4, 5


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*")) if path.exists() else []


def run_tml(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*TML, *argv], capture_output=True, text=True, env=env, cwd=REPO, timeout=300
    )


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The whole report of a refused command: one stderr line, the JSON object on stdout."""
    report = result.stderr + result.stdout
    assert result.returncode == code, report[-3000:]
    assert "Traceback" not in report, report[-3000:]
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), result.stderr[-3000:]
    message = lines[0].removeprefix("error: ")
    assert json.loads(result.stdout) == {"error": message, "exit_code": code}
    return message


def flip_a_byte(checkpoint: str) -> None:
    """Same size, one byte changed: only a full verification (a checksum) sees it."""
    files = json.loads((Path(checkpoint) / ".integrity.json").read_text())["files"]
    victim = Path(checkpoint) / max(files, key=lambda name: files[name]["size"])
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0xFF
    victim.write_bytes(bytes(data))


# -- 1. bad input: one line, exit 2, nothing written ---------------------------------------------

BAD_INPUTS = {
    # name: (argv after the command, what the line must say)
    "recipe-not-a-builder": (
        ["train", "--save-dir", "{run}", "--recipe", "os:getcwd"],
        "'os:getcwd' is not a recipe builder",
    ),
    "seed-overflow": (
        ["train", "--save-dir", "{run}", "--seed", "99999999999999999999999"],
        "argument --seed: '99999999999999999999999': Input should be less than or equal to",
    ),
    "negative-node-rank": (
        ["train", "--save-dir", "{run}", "--node-rank", "-1"],
        "argument --node-rank: '-1': Input should be greater than or equal to 0",
    ),
    "warm-start-inside-save-dir": (
        ["train", "--save-dir", "{run}", "--initial-checkpoint", "{run}/5"],
        "invalid parameters: initial_checkpoint is inside save_dir",
    ),
    "evaluator-partition": (
        ["train", "--save-dir", "{run}", "--wait-for-evaluator", "../x"],
        "evaluation partition name must be a non-empty string without '/', got '../x'",
    ),
    "retrain-partition": (
        ["retrain", "--runs-dir", "{run}", "--partition", "../x"],
        "evaluation partition name must be a non-empty string without '/', got '../x'",
    ),
    "evaluate-partition": (
        ["evaluate", "--save-dir", "{run}", "--partition", "../x"],
        "evaluation partition name must be a non-empty string without '/', got '../x'",
    ),
    "experiment-name": (
        ["train", "--save-dir", "{run}", "--experiment", "Exp 1"],
        "experiment 'Exp 1' is not a valid name: use 1-48 lowercase letters, digits and dashes",
    ),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_with_exit_2(
    prefect_server: PrefectServer, tmp_path: Path, case: str
) -> None:
    argv, says = BAD_INPUTS[case]
    run = tmp_path / "run"
    argv = [part.replace("{run}", str(run)) for part in argv]
    extra = ["--epochs", "1", *TINY]
    if argv[0] == "evaluate":  # a run to evaluate: the partition is what is wrong
        with Snapshot(str(run), {"model": torch.nn.Linear(4, 4)}) as snapshot:
            snapshot.save(3)
        extra = []
    before = tree(tmp_path)
    result = run_tml([*argv, *extra, "--json"], prefect_server.env())
    message = one_line_error(result, EXIT_BAD_INPUT)
    assert says in message, message
    assert tree(tmp_path) == before  # nothing written (no save_dir where there was none)


def test_seed_range_is_what_torch_accepts() -> None:
    """The field's bounds are torch.manual_seed's: what passes the check cannot overflow in
    torch after run.json was written, and what torch refuses is refused as input."""
    for seed in (SEED_MIN, SEED_MAX):
        TrainConfig(save_dir="run", seed=seed)
        torch.manual_seed(seed)
    for seed in (SEED_MIN - 1, SEED_MAX + 1):
        with pytest.raises(ValueError):
            TrainConfig(save_dir="run", seed=seed)
        with pytest.raises((ValueError, RuntimeError)):
            torch.manual_seed(seed)


def test_json_stays_json_whatever_fails(tmp_path: Path) -> None:
    """A sidecar nested deeper than Python's JSON parser recurses used to end ``--json``
    commands with a traceback and nothing on stdout (a corrupt checkpoint: exit 1)."""
    save_dir = tmp_path / "run"
    with Snapshot(str(save_dir), {"model": torch.nn.Linear(4, 4)}) as snapshot:
        snapshot.save(3)
    (save_dir / "3" / ".integrity.json").write_text("[" * 100_000)
    result = run_tml(["checkpoints", "verify", str(save_dir), "--json"], dict(os.environ))
    assert result.returncode == 1, result.stderr[-3000:]
    payload = json.loads(result.stdout)  # the only stdout, JSON as --json promises
    assert payload.get("exit_code", 1) == 1, payload


# -- 1. refusals the flow would make, made before it starts --------------------------------------


def test_missing_bucket_is_bad_input_in_one_line(
    prefect_server: PrefectServer, s3_server: S3Server, tmp_path: Path
) -> None:
    bucket = f"no-such-bucket-{os.getpid()}"
    result = run_tml(
        ["train", "--save-dir", f"s3://{bucket}/run", "--epochs", "1", *TINY, "--json"],
        prefect_server.env(),
    )
    message = one_line_error(result, EXIT_BAD_INPUT)
    assert f"bucket '{bucket}' does not exist" in message, message


def test_a_save_dir_held_by_a_live_run_is_exit_5_in_one_line(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    save_dir = tmp_path / "run"
    lock = WriterLock(str(save_dir), owner="another training run (this test)")
    lock.acquire()
    try:
        before = tree(save_dir)
        result = run_tml(
            ["train", "--save-dir", str(save_dir), "--epochs", "1", *TINY, "--json"],
            prefect_server.env(),
        )
        assert tree(save_dir) == before
    finally:
        lock.release()
    message = one_line_error(result, EXIT_LOCKED)
    assert "is being written by another training run (this test)" in message, message


def test_a_refusal_from_inside_the_flow_is_logged_without_traceback(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """retrain picks its run directory inside the flow, so the held lock is met there (by the
    train subflow): Prefect logs the failure, but without the traceback, and the last line
    says why, with exit 5."""
    runs_dir = tmp_path / "runs"
    lock = WriterLock(str(runs_dir / "20261130T020000Z"), owner="another training run")
    lock.acquire()
    try:
        result = run_tml(
            ["retrain", "--runs-dir", str(runs_dir), "--run-name", "20261130T020000Z",
             "--partition", "validation", "--epochs", "1", *TINY, "--json"],
            prefect_server.env(),
        )  # fmt: skip
    finally:
        lock.release()
    report = result.stderr + result.stdout
    assert result.returncode == EXIT_LOCKED, report[-3000:]
    assert "Traceback" not in report, report[-5000:]
    assert "Encountered exception during execution: SaveDirLockedError" in result.stderr
    last = result.stderr.splitlines()[-1]
    assert last.startswith("error: ") and "is being written by another training run" in last
    assert json.loads(result.stdout.splitlines()[-1])["exit_code"] == EXIT_LOCKED


# -- 1. an API that answers its health check but is not Prefect: exit 4 ---------------------------


class _NotPrefect(BaseHTTPRequestHandler):
    """Answers every request 200 with a JSON string; ``health`` is what /health answers."""

    health = b'"ok"'

    def _answer(self) -> None:
        body = self.health if self.path.endswith("/health") else b'"ok"'
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_GET = do_POST = do_PATCH = do_PUT = _answer

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.parametrize("health", [b'"ok"', b"true"], ids=["health-ok", "health-true"])
def test_an_api_that_is_not_prefect_is_exit_4_in_one_line(tmp_path: Path, health: bytes) -> None:
    """``"ok"`` at /health is refused by the check before the flow; ``true`` there passes it,
    and Prefect's own version check then finds no version (it raised InvalidVersion)."""
    handler = type("Handler", (_NotPrefect,), {"health": health})
    server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    api_url = f"http://127.0.0.1:{server.server_address[1]}/api"
    save_dir = tmp_path / "run"
    try:
        result = run_tml(
            ["train", "--save-dir", str(save_dir), "--epochs", "1", *TINY, "--json"],
            {**os.environ, "PREFECT_API_URL": api_url},
        )
    finally:
        server.shutdown()
        server.server_close()
        serving.join()
    message = one_line_error(result, EXIT_PREFECT_API)
    assert f"{api_url} (PREFECT_API_URL, from the environment)" in message, message
    assert "not a Prefect API" in message, message
    assert not get_checkpoints(str(save_dir))


# -- 2. a run is never shortened below a step it committed ---------------------------------------


@pytest.mark.parametrize(
    "shorter", [["--epochs", "1"], ["--epochs", "2", "--steps-per-epoch", "2"]], ids=str
)
def test_a_run_past_the_new_final_step_is_refused_even_when_changes_are_allowed(
    prefect_server: PrefectServer, tmp_path: Path, shorter: list[str]
) -> None:
    save_dir = tmp_path / "run"
    first = run_tml(
        ["train", "--save-dir", str(save_dir), "--epochs", "2", *TINY, "--json"],
        prefect_server.env(),
    )
    assert first.returncode == 0, first.stderr[-3000:]
    assert [step_from_checkpoint(c) for c in get_checkpoints(str(save_dir))] == [3, 6]
    record, before = (save_dir / RUN_INFO).read_bytes(), tree(save_dir)
    result = run_tml(
        ["train", "--save-dir", str(save_dir), *TINY, *shorter, "--allow-changed-config",
         "--json"],
        prefect_server.env(),
    )  # fmt: skip
    message = one_line_error(result, EXIT_BAD_INPUT)
    assert f"{save_dir} already has a checkpoint at step 6, past the final step" in message
    assert "not even with --allow-changed-config" in message
    assert (save_dir / RUN_INFO).read_bytes() == record  # the run's history, byte for byte
    assert tree(save_dir) == before


# -- 3. a nightly retrain skips a corrupt warm start -----------------------------------------------


def test_retrain_warm_starts_from_the_newest_checkpoint_that_verifies(
    prefect_api: PrefectServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    runs_dir = str(tmp_path / "runs")

    def nightly(name: str, epochs: int = 1) -> Lineage:
        run = RunParams(epochs=epochs, steps_per_epoch=3, batch_size=16, seed=5)
        lineage: Lineage = retrain(runs_dir=runs_dir, run=run, eval_partitions=[], run_name=name)
        assert lineage.final_checkpoint == f"{runs_dir}/{name}/{3 * epochs}"
        return lineage

    first = nightly("20261201T020000Z", epochs=2)  # checkpoints 3 and 6
    flip_a_byte(f"{first.run_dir}/6")
    with caplog.at_level("WARNING"):
        second = nightly("20261202T020000Z")
    assert (second.previous_run, second.warm_start_checkpoint) == (
        first.run_dir,
        f"{first.run_dir}/3",
    )
    assert f"Skipping checkpoint {first.run_dir}/6" in caplog.text  # said, with the reason
    assert "is corrupt" in caplog.text

    # A previous run with no checkpoint that verifies: the run before it.
    flip_a_byte(f"{second.run_dir}/3")
    third = nightly("20261203T020000Z")
    assert (third.previous_run, third.warm_start_checkpoint) == (
        first.run_dir,
        f"{first.run_dir}/3",
    )

    # A retry of a dated run that got no checkpoint of its own: its recorded warm start is
    # kept while it verifies, chosen again once it does not.
    retried = f"{runs_dir}/20261204T020000Z"
    recorded = Lineage(
        run_dir=retried,
        previous_run=third.run_dir,
        warm_start_checkpoint=f"{third.run_dir}/3",
        created_at="2026-12-04T02:00:00+00:00",
    )
    write_lineage(recorded)
    flip_a_byte(f"{third.run_dir}/3")
    fourth = nightly("20261204T020000Z")
    assert (fourth.previous_run, fourth.warm_start_checkpoint) == (
        first.run_dir,
        f"{first.run_dir}/3",
    )
    assert read_lineage(retried) == fourth
    assert verify_checkpoint(str(fourth.final_checkpoint), level="full").status == "valid"


def test_retrain_keeps_a_recorded_warm_start_that_still_verifies(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    runs_dir = str(tmp_path / "runs")
    params = RunParams(epochs=2, steps_per_epoch=3, batch_size=16, seed=5)
    first = retrain(runs_dir=runs_dir, run=params, eval_partitions=[], run_name="20261201T0200Z")
    retried = f"{runs_dir}/20261202T0200Z"
    write_lineage(
        Lineage(
            run_dir=retried,
            previous_run=first.run_dir,
            warm_start_checkpoint=f"{first.run_dir}/3",  # not the newest: what was recorded
            created_at="2026-12-02T02:00:00+00:00",
        )
    )
    again = retrain(runs_dir=runs_dir, run=params, eval_partitions=[], run_name="20261202T0200Z")
    assert again.warm_start_checkpoint == f"{first.run_dir}/3"


# -- 4. an API that dies mid-run: exit 4 in bounded time, checkpoints kept -------------------------


@dataclass
class Lines:
    """A process's stderr, line by line, awaitable."""

    process: subprocess.Popen[str]
    queue: queue.Queue[str | None] = field(default_factory=queue.Queue)
    seen: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self) -> None:
        assert self.process.stderr is not None
        for line in self.process.stderr:
            self.queue.put(line)
        self.queue.put(None)

    def wait_for(self, marker: str, timeout: float = 180) -> str:
        deadline = time.monotonic() + timeout
        while True:
            line = self.queue.get(timeout=max(0.0, deadline - time.monotonic()))
            if line is None:
                pytest.fail(f"ended before {marker!r}:\n{self.text()[-3000:]}")
            self.seen.append(line)
            if marker in line:
                return line

    def text(self) -> str:
        while True:
            try:
                line = self.queue.get(timeout=5 if self.process.poll() is not None else 0)
            except queue.Empty:
                break
            if line is None:
                self.queue.put(None)
                break
            self.seen.append(line)
        return "".join(self.seen)


def _kill_group(process: subprocess.Popen[Any]) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    process.wait()


@pytest.fixture
def own_prefect_server(tmp_path: Path) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """A Prefect server of this test alone (its own database): the test kills it."""
    port = free_port()
    api_url = f"http://127.0.0.1:{port}/api"
    log = tmp_path / "server.log"
    env = {k: v for k, v in os.environ.items() if k != "PREFECT_API_URL"}
    env["PREFECT_API_DATABASE_CONNECTION_URL"] = f"sqlite+aiosqlite:///{tmp_path / 'prefect.db'}"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
             "--port", str(port), "--analytics-off"],
            stdout=output, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )  # fmt: skip
    try:
        _wait_until_healthy(f"{api_url}/health", process, log)
        yield api_url, process
    finally:
        _stop_group(process)


API_GONE_BOUND_S = 90  # documented: noticed within ~15 s, exit soon after (docs/cli.md)


def test_an_api_that_dies_mid_run_ends_it_with_exit_4_and_its_checkpoints_kept(
    own_prefect_server: tuple[str, subprocess.Popen[bytes]], tmp_path: Path
) -> None:
    api_url, server = own_prefect_server
    save_dir = tmp_path / "run"
    epoch_steps = 200_000  # one long epoch: no Prefect call of its own until it ends
    process = subprocess.Popen(
        [*TML, "train", "--save-dir", str(save_dir), "--epochs", "1",
         "--steps-per-epoch", str(epoch_steps), "--batch-size", "16",
         "--checkpoint-every-steps", "500", "--json"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**os.environ, "PREFECT_API_URL": api_url}, start_new_session=True,
    )  # fmt: skip
    try:
        lines = Lines(process)
        lines.wait_for("saving mid-epoch checkpoint at step 500")
        _kill_group(server)  # the whole server, at once
        killed = time.monotonic()
        try:
            process.wait(timeout=API_GONE_BOUND_S)
        except subprocess.TimeoutExpired:
            pytest.fail(f"still running {API_GONE_BOUND_S}s after the API died")
        seconds = time.monotonic() - killed
        text = lines.text()
        assert process.stdout is not None
        stdout = process.stdout.read()
    finally:
        _kill_group(process)
    assert process.returncode == EXIT_PREFECT_API, text[-3000:]
    assert seconds < API_GONE_BOUND_S
    last = text.splitlines()[-1]
    assert last.startswith(
        f"error: the Prefect API at {api_url} (PREFECT_API_URL, from the environment) "
        "stopped answering during this run"
    ), text[-3000:]
    assert json.loads(stdout.splitlines()[-1])["exit_code"] == EXIT_PREFECT_API
    checkpoints = get_checkpoints(str(save_dir))
    assert checkpoints and step_from_checkpoint(checkpoints[-1]) < epoch_steps  # stopped early
    for checkpoint in checkpoints:
        assert verify_checkpoint(checkpoint, level="full").status == "valid"
    assert not (save_dir / LOCK_NAME).exists()  # released: a rerun is not refused


# -- 5. a stop signal during start-up never starts the next stage --------------------------------

STAGES = ["start", "server", "imports", "parse", "checks", "prefect", "flow"]


def _start_tml(argv: list[str], env: dict[str, str]) -> tuple[subprocess.Popen[str], Lines]:
    process = subprocess.Popen(
        [*TML, *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
        env={**env, "TML_REPORT_STAGES": "1"}, start_new_session=True,
    )  # fmt: skip
    return process, Lines(process)


def _assert_stopped_before_training(
    process: subprocess.Popen[str], lines: Lines, save_dir: Path, after: str
) -> None:
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pytest.fail(f"still running 60 s after SIGTERM at {after}:\n{lines.text()[-3000:]}")
    text = lines.text()
    assert process.returncode == 143, text[-3000:]
    assert "Traceback" not in text, text[-3000:]
    assert "still shutting down" not in text, text[-3000:]  # not ended by the watchdog
    printed = text.splitlines()
    received = next(i for i, line in enumerate(printed) if "SIGTERM received: stopping" in line)
    later = [line for line in printed[received:] if line.startswith("tml-stage: ")]
    assert later == [], text[-3000:]  # no stage began once the signal was received
    assert f"tml-stage: {after}" in printed[:received]
    assert not (save_dir / RUN_INFO).exists() and get_checkpoints(str(save_dir)) == []


@pytest.mark.parametrize("stage", STAGES)
def test_sigterm_at_a_start_up_stage_starts_nothing_after_it(
    prefect_server: PrefectServer, tmp_path: Path, stage: str
) -> None:
    save_dir = tmp_path / "run"
    env = prefect_server.env()
    if stage == "server":  # only a run without PREFECT_API_URL starts a server of its own
        env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"}
    process, lines = _start_tml(
        ["train", "--save-dir", str(save_dir), "--epochs", "1", *TINY, "--json"], env
    )
    try:
        lines.wait_for(f"tml-stage: {stage}")
        os.kill(process.pid, signal.SIGTERM)  # the CLI's pid, as `kill PID` does
        _assert_stopped_before_training(process, lines, save_dir, stage)
    finally:
        _kill_group(process)


SWALLOWING_RECIPE = """
import sys, time
from flows.signals import stopping_exit_code
print("test-recipe: importing", file=sys.stderr, flush=True)
deadline = time.monotonic() + 30
try:
    while stopping_exit_code() is None and time.monotonic() < deadline:
        time.sleep(0.02)
except BaseException:  # a library that swallows everything while it imports
    pass
from recipes.ranking import build
"""


def test_a_signal_swallowed_during_an_import_still_stops_the_start(
    prefect_server: PrefectServer, tmp_path: Path
) -> None:
    """The handler's exit swallowed on its way up ("stopping" printed, then Prefect, the flow
    and training started anyway): the next stage boundary ends the run with 143."""
    (tmp_path / "swallowing_recipe.py").write_text(SWALLOWING_RECIPE)
    env = {**prefect_server.env(), "PYTHONPATH": f"{tmp_path}{os.pathsep}{REPO}"}
    save_dir = tmp_path / "run"
    process, lines = _start_tml(
        ["train", "--save-dir", str(save_dir), "--epochs", "1", *TINY,
         "--recipe", "swallowing_recipe:build", "--json"],
        env,
    )  # fmt: skip
    try:
        lines.wait_for("test-recipe: importing")
        os.kill(process.pid, signal.SIGTERM)
        _assert_stopped_before_training(process, lines, save_dir, "parse")
    finally:
        _kill_group(process)
