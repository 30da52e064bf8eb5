"""The ``tml checkpoints`` commands: output, exit codes, and bad input that deletes nothing.

Most cases call ``main()`` in-process (a subprocess costs ~2 s of imports each); a few run the
console script as a user does, to pin down stdout/stderr and exit statuses end to end.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import torch

from tml_checkpointing import Snapshot, mark_done_eval, write_checkpoint_metrics
from tml_checkpointing.cli import main, parse_duration

from .conftest import free_port

TML = [sys.executable, "-m", "tml_checkpointing.cli"]


def make_run(save_dir: Path, steps: tuple[int, ...] = (2, 10, 20, 30)) -> None:
    with Snapshot(str(save_dir), {"model": torch.nn.Linear(8, 8)}) as snapshot:
        for step in steps:
            snapshot.save(step)


def tree(path: Path) -> list[str]:
    return sorted(str(p.relative_to(path)) for p in path.rglob("*"))


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, object]:
    code = main([*argv, "--json"])
    out = capsys.readouterr().out
    return code, json.loads(out)


def flip_a_byte(checkpoint: Path) -> str:
    files = json.loads((checkpoint / ".integrity.json").read_text())["files"]
    victim = max(files, key=lambda name: files[name]["size"])
    data = bytearray((checkpoint / victim).read_bytes())
    data[0] ^= 0xFF
    (checkpoint / victim).write_bytes(bytes(data))
    return victim


def test_checkpoints_list_json(tmp_path: Path) -> None:
    make_run(tmp_path, (2, 10))
    mark_done_eval(str(tmp_path / "10"), "validation")
    (tmp_path / "20").mkdir()  # a half-written checkpoint
    result = subprocess.run(
        [*TML, "checkpoints", "list", str(tmp_path), "--json"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["step"], r["state"], r["committed"]) for r in rows] == [
        (2, "valid", True),
        (10, "valid", True),
        (20, "incomplete", False),
    ]
    assert rows[1]["evaluated_by"] == ["validation"]
    assert rows[0]["size"] > 0 and 0 <= rows[0]["age_s"] < 600


def test_list_shows_corrupt_and_unverified(tmp_path: Path, capsys) -> None:
    make_run(tmp_path, (1, 2))
    (tmp_path / "1" / ".integrity.json").unlink()
    (tmp_path / "2" / ".snapshot_metadata").write_text("garbage: [")
    code, rows = run_json(capsys, "checkpoints", "list", str(tmp_path))
    assert code == 0
    assert [r["state"] for r in rows] == ["unverified", "corrupt"]
    assert "commit marker unreadable" in rows[1]["problems"][0]


def test_inspect_lists_tensors(tmp_path: Path, capsys) -> None:
    make_run(tmp_path, (5,))
    code, payload = run_json(capsys, "checkpoints", "inspect", str(tmp_path / "5"))
    assert code == 0
    weight = next(e for e in payload["entries"] if e["name"] == "0/model/weight")
    assert weight["shape"] == [8, 8] and weight["dtype"] == "torch.float32"
    assert weight["bytes"] == 8 * 8 * 4 and weight["type"] == "Tensor"


def test_verify_exit_codes(tmp_path: Path, capsys) -> None:
    make_run(tmp_path)
    code, payload = run_json(capsys, "checkpoints", "verify", str(tmp_path), "--full")
    assert code == 0 and payload["ok"] and len(payload["checkpoints"]) == 4
    victim = flip_a_byte(tmp_path / "20")
    quick = run_json(capsys, "checkpoints", "verify", str(tmp_path), "--quick")
    assert quick[0] == 0  # sizes still fine: --quick reads no byte
    code, payload = run_json(capsys, "checkpoints", "verify", str(tmp_path))
    assert code == 1 and payload["level"] == "full"  # the default reads every byte
    code, payload = run_json(capsys, "checkpoints", "verify", str(tmp_path), "--full")
    assert code == 1 and payload["corrupt"] == [str(tmp_path / "20")]
    bad = next(c for c in payload["checkpoints"] if c["status"] == "corrupt")
    assert bad["problems"][0]["path"] == victim
    code, payload = run_json(capsys, "checkpoints", "verify", str(tmp_path / "10"), "--full")
    assert code == 0 and payload["checkpoints"][0]["status"] == "valid"


def test_verify_script_view(tmp_path: Path) -> None:
    """As a script sees it: exit 1, stdout pure JSON, the file named."""
    make_run(tmp_path, (1,))
    victim = flip_a_byte(tmp_path / "1")
    result = subprocess.run(
        [*TML, "checkpoints", "verify", str(tmp_path / "1"), "--full", "--json"],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 1, result.stderr
    payload = json.loads(result.stdout)
    assert payload["checkpoints"][0]["problems"][0]["path"] == victim


def test_prune_dry_run_then_real(tmp_path: Path, capsys) -> None:
    make_run(tmp_path)
    write_checkpoint_metrics(str(tmp_path / "2"), {"loss": 0.01})
    before = tree(tmp_path)
    code, payload = run_json(
        capsys, "checkpoints", "prune", str(tmp_path), "--keep-last", "1", "--dry-run"
    )
    assert code == 0 and [d["step"] for d in payload["delete"]] == [2, 10, 20]
    assert tree(tmp_path) == before
    code, payload = run_json(
        capsys,
        "checkpoints",
        "prune",
        str(tmp_path),
        "--keep-last",
        "1",
        "--keep-every",
        "20",
        "--keep-best",
        "1",
        "--metric",
        "loss",
    )
    assert code == 0 and [d["step"] for d in payload["delete"]] == [10]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["2", "20", "30"]


def test_clean_incomplete(tmp_path: Path, capsys) -> None:
    make_run(tmp_path, (1,))
    for name in ("7", "8"):
        (tmp_path / name / "0").mkdir(parents=True)
        (tmp_path / name / "0" / "w").write_bytes(b"x")
    old = time.time() - 3 * 86400
    for path in (tmp_path / "7", tmp_path / "7" / "0", tmp_path / "7" / "0" / "w"):
        os.utime(path, (old, old))
    code, payload = run_json(
        capsys, "checkpoints", "clean-incomplete", str(tmp_path), "--older-than", "2d", "--dry-run"
    )
    assert code == 0 and [e["step"] for e in payload["incomplete"]] == [7]
    assert (tmp_path / "7").exists()
    code, payload = run_json(
        capsys, "checkpoints", "clean-incomplete", str(tmp_path), "--older-than", "1h"
    )
    assert code == 0 and payload["removed"] == [str(tmp_path / "7")]
    assert not (tmp_path / "7").exists() and (tmp_path / "8").exists() and (tmp_path / "1").exists()


def test_verify_on_s3(s3_save_dir: str, capsys) -> None:
    make_run_s3 = Snapshot(s3_save_dir, {"model": torch.nn.Linear(8, 8)})
    make_run_s3.save(3).wait()
    code, payload = run_json(capsys, "checkpoints", "verify", s3_save_dir, "--full")
    assert code == 0 and payload["checkpoints"][0]["checkpoint"] == f"{s3_save_dir}/3"
    code, payload = run_json(
        capsys, "checkpoints", "clean-incomplete", s3_save_dir, "--older-than", "1h"
    )
    assert code == 0 and payload["removed"] == []


@pytest.mark.parametrize(
    "text, seconds", [("30s", 30), ("10m", 600), ("1h", 3600), ("2d", 172800), ("90", 90)]
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


BAD_INPUTS = [
    # (argv after "checkpoints", what stderr must say)
    (["list", "{missing}"], "does not exist"),
    (["list", "nosuchproto://x/y"], "unknown storage protocol 'nosuchproto'"),
    (["list", "{run}/2"], "is a checkpoint, not a save_dir"),
    (["inspect", "{missing}"], "does not exist"),
    (["inspect", "{run}"], "not a committed checkpoint"),
    (["inspect", "{run}/5"], "not a committed checkpoint"),
    (["inspect", "{run}/99"], "does not exist"),
    (["inspect", "nosuchproto://x/1"], "unknown storage protocol"),
    (["verify", "{missing}"], "does not exist"),
    (["verify", "{empty}"], "neither a committed checkpoint nor a save_dir"),
    (["verify", "nosuchproto://x/y"], "unknown storage protocol"),
    (["prune", "{missing}", "--keep-last", "1"], "does not exist"),
    (["prune", "{run}", "--keep-last", "0"], "must be >= 1"),
    (["prune", "{run}", "--keep-last", "-3"], "must be >= 1"),
    (["prune", "{run}", "--keep-last", "1", "--keep-every", "-5"], "must be >= 1"),
    (["prune", "{run}", "--keep-last", "x"], "not an integer"),
    (["prune", "{run}", "--keep-last", "1", "--keep-best", "2"], "--keep-best and --metric"),
    (["prune", "{run}/2", "--keep-last", "1"], "is a checkpoint, not a save_dir"),
    (["prune", "nosuchproto://x/y", "--keep-last", "1"], "unknown storage protocol"),
    (["clean-incomplete", "{missing}", "--older-than", "1h"], "does not exist"),
    (["clean-incomplete", "{run}", "--older-than=-1h"], "not a duration"),
    (["clean-incomplete", "{run}", "--older-than", "-1h"], "expected one argument"),
    (["clean-incomplete", "{run}", "--older-than", "soon"], "not a duration"),
    (["clean-incomplete", "{run}/2", "--older-than", "0s"], "is a checkpoint, not a save_dir"),
    (["clean-incomplete", "nosuchproto://x", "--older-than", "1h"], "unknown storage protocol"),
]


@pytest.mark.parametrize(
    "argv, message",
    BAD_INPUTS,
    ids=[" ".join(a[:2]) + f"#{i}" for i, (a, _) in enumerate(BAD_INPUTS)],
)
def test_bad_input_exits_2_and_deletes_nothing(
    tmp_path: Path, capsys, argv: list[str], message: str
) -> None:
    run = tmp_path / "run"
    make_run(run, (2, 3))
    (run / "5" / "0").mkdir(parents=True)  # an old incomplete one: must survive bad input
    old = time.time() - 86400
    os.utime(run / "5", (old, old))
    os.utime(run / "5" / "0", (old, old))
    (tmp_path / "empty").mkdir()
    before = tree(tmp_path)
    names = {
        "missing": str(tmp_path / "missing"),
        "run": str(run),
        "empty": str(tmp_path / "empty"),
    }
    args = ["checkpoints", *(a.format(**names) for a in argv)]
    with pytest.raises(SystemExit) if _is_argparse_error(message) else _nothing():
        code = main([*args, "--json"])
        assert code == 2
    captured = capsys.readouterr()
    assert message in captured.err
    assert json.loads(captured.out)["exit_code"] == 2  # stdout stays JSON
    assert "Traceback" not in captured.err
    assert tree(tmp_path) == before


def _is_argparse_error(message: str) -> bool:
    return message in ("must be >= 1", "not an integer", "not a duration", "expected one argument")


class _nothing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> bool:
        return False


def test_bad_url_is_a_clear_error_with_nonzero_exit() -> None:
    result = subprocess.run(
        [*TML, "checkpoints", "list", "nosuchproto://x/y"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "unknown storage protocol 'nosuchproto'" in result.stderr
    assert "Traceback" not in result.stderr


# -- flow commands against an unreachable Prefect API (flows/cli.py, flows/api_check.py) ---------
# The console script as a user runs it, with PREFECT_API_URL naming a port where nothing listens:
# one line and exit 4 before the flow starts (it used to be ~6 s of retries, then a 113-line
# traceback and exit 1, the status of a corrupt checkpoint).

FLOW_TML = [sys.executable, "-m", "flows.cli"]
EXIT_PREFECT_API = 4


def _closed_api_url() -> str:
    """A loopback API URL whose port was free a moment ago: connecting to it is refused."""
    return f"http://127.0.0.1:{free_port()}/api"


def _tml_flow(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*FLOW_TML, *argv], capture_output=True, text=True, env=env, timeout=300)


def _one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """The command's whole report: exactly one stderr line, no traceback, exit 4."""
    assert result.returncode == EXIT_PREFECT_API, result.stderr[-3000:]
    assert "Traceback" not in result.stderr + result.stdout
    lines = result.stderr.splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    return lines[0].removeprefix("error: ")


FLOW_ARGV = [  # {target} does not exist, except for evaluate: a run with checkpoints
    ["train", "--save-dir", "{target}", "--epochs", "1"],
    ["train", "--save-dir", "{target}", "--epochs", "1", "--json"],
    ["evaluate", "--save-dir", "{target}", "--json"],
    ["retrain", "--runs-dir", "{target}"],
]


@pytest.mark.parametrize("argv", FLOW_ARGV, ids=["train", "train-json", "evaluate-json", "retrain"])
def test_flow_command_with_unreachable_api_fails_in_one_line(
    tmp_path: Path, argv: list[str]
) -> None:
    api_url = _closed_api_url()
    target = tmp_path / "run"
    if argv[0] == "evaluate":  # a missing save_dir would be refused first (exit 2)
        make_run(target, (2,))
    before = tree(tmp_path)
    result = _tml_flow(
        [a.format(target=target) for a in argv], {**os.environ, "PREFECT_API_URL": api_url}
    )
    message = _one_error_line(result)
    assert message.startswith(
        f"cannot reach the Prefect API at {api_url} (PREFECT_API_URL, from the environment): "
        "connection refused. "
    ), message
    assert "unset PREFECT_API_URL" in message
    if "--json" in argv:  # stdout is only the JSON error, as for every other CLI error
        assert json.loads(result.stdout) == {"error": message, "exit_code": EXIT_PREFECT_API}
    else:
        assert result.stdout == ""
    assert tree(tmp_path) == before  # nothing written: the check runs before the flow starts


def test_unreachable_api_from_a_profile_names_the_profile(tmp_path: Path) -> None:
    """Persisted with `prefect config set`: the line says where, and how to undo it."""
    api_url = _closed_api_url()
    home = tmp_path / "prefect-home"
    home.mkdir()
    (home / "profiles.toml").write_text(
        f'active = "work"\n\n[profiles.work]\nPREFECT_API_URL = "{api_url}"\n'
    )
    env = {**os.environ, "PREFECT_HOME": str(home)}
    env.pop("PREFECT_API_URL", None)
    env.pop("PREFECT_PROFILE", None)
    save_dir = tmp_path / "run"
    result = _tml_flow(["train", "--save-dir", str(save_dir), "--epochs", "1"], env)
    message = _one_error_line(result)
    assert message.startswith(
        f"cannot reach the Prefect API at {api_url} (PREFECT_API_URL, from profile 'work'): "
    ), message
    assert "`prefect config unset PREFECT_API_URL`" in message
    assert not save_dir.exists()


def test_unhealthy_api_fails_in_one_line(tmp_path: Path) -> None:
    """A server that answers, but not healthy (a proxy's 503 in front of a stopped server)."""
    requests: list[str] = []

    class Unhealthy(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            requests.append(self.path)
            self.send_response(503)
            self.send_header("Content-Length", "0")
            self.end_headers()

        def log_message(self, *args: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Unhealthy)
    serving = threading.Thread(target=server.serve_forever, daemon=True)
    serving.start()
    try:
        api_url = f"http://127.0.0.1:{server.server_address[1]}/api"
        save_dir = tmp_path / "run"
        result = _tml_flow(
            ["train", "--save-dir", str(save_dir), "--epochs", "1"],
            {**os.environ, "PREFECT_API_URL": api_url},
        )
    finally:
        server.shutdown()
        server.server_close()
        serving.join()
    message = _one_error_line(result)
    assert "its health check answered HTTP 503 Service Unavailable" in message, message
    assert requests == ["/api/health"]  # one request, no retries
    assert not save_dir.exists()


def test_api_that_stops_after_the_check_ends_with_one_final_line(tmp_path: Path) -> None:
    """The server answers the health check, then is gone (closed before its answer is sent):
    Prefect fails the flow with its own connection errors, and the CLI's last line says why."""
    listener = socket.create_server(("127.0.0.1", 0))
    api_url = f"http://127.0.0.1:{listener.getsockname()[1]}/api"
    request_lines: list[bytes] = []

    def answer_once_then_die() -> None:
        connection, _ = listener.accept()
        with connection:
            request_lines.append(connection.recv(65536).split(b"\r\n", 1)[0])
            listener.close()  # from here on every connection is refused
            connection.sendall(
                b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                b"Content-Length: 4\r\nConnection: close\r\n\r\ntrue"
            )

    server = threading.Thread(target=answer_once_then_die, daemon=True)
    server.start()
    save_dir = tmp_path / "run"
    try:
        result = subprocess.run(
            [*FLOW_TML, "train", "--save-dir", str(save_dir), "--epochs", "1", "--json"],
            capture_output=True,
            text=True,
            env={**os.environ, "PREFECT_API_URL": api_url},
            timeout=300,
        )
    finally:
        listener.close()
        server.join(timeout=5)
    assert request_lines == [b"GET /api/health HTTP/1.1"]  # the CLI's check passed
    assert result.returncode == EXIT_PREFECT_API, result.stderr[-3000:]
    last = result.stderr.splitlines()[-1].removeprefix("error: ")
    assert last.startswith(
        f"the Prefect API at {api_url} (PREFECT_API_URL, from the environment) stopped "
        "answering during this run: connection refused."
    ), result.stderr[-3000:]
    assert json.loads(result.stdout.splitlines()[-1]) == {
        "error": last,
        "exit_code": EXIT_PREFECT_API,
    }
