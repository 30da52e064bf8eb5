"""The ``tml`` console script, run as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import torch

from tml_checkpointing import Snapshot, mark_done_eval

TML = [sys.executable, "-m", "tml_checkpointing.cli"]


def test_checkpoints_list_json(tmp_path: Path) -> None:
    with Snapshot(str(tmp_path), {"model": torch.nn.Linear(2, 2)}) as snapshot:
        snapshot.save(2)
        snapshot.save(10)
    mark_done_eval(str(tmp_path / "10"), "validation")
    (tmp_path / "20").mkdir()  # a half-written checkpoint
    result = subprocess.run(
        [*TML, "checkpoints", "list", str(tmp_path), "--json"], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    assert [(r["step"], r["state"]) for r in rows] == [
        (2, "committed"),
        (10, "committed"),
        (20, "incomplete"),
    ]
    assert rows[1]["evaluated_by"] == ["validation"]


def test_bad_url_is_a_clear_error_with_nonzero_exit() -> None:
    result = subprocess.run(
        [*TML, "checkpoints", "list", "nosuchproto://x/y"], capture_output=True, text=True
    )
    assert result.returncode == 2
    assert "unknown storage protocol 'nosuchproto'" in result.stderr
    assert "Traceback" not in result.stderr
