"""The on-disk layout's rules, and the small faults of issue 8 point 7 that live in it.

* One canonical name per step: ``007`` is not step 7 for any reader (it cannot shadow ``7``).
* A sidecar whose bytes do not describe sizes and checksums makes that checkpoint corrupt; it
  never crashes verification or resume.
* ``inspect`` of a checkpoint with a missing shard says so and exits 1.
* Storage errors exit 3 (also ``CheckpointWriteError`` and ``SaveDirLockedError``).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tml_checkpointing import (
    CheckpointWriteError,
    InvalidCheckpointPathError,
    InvalidStepError,
    SaveDirLockedError,
    Snapshot,
    get_checkpoint,
    get_checkpoints,
    get_latest_valid_checkpoint,
    step_from_checkpoint,
    verify_checkpoint,
)
from tml_checkpointing.cli import app as library_cli
from tml_checkpointing.format.layout import (
    COMMIT_MARKER,
    INTEGRITY_SIDECAR,
    group_by_step,
    is_data_file,
    parse_step,
    step_name,
)


def save(save_dir: Path, steps: tuple[int, ...], fill: float = 0.0) -> dict[str, torch.nn.Module]:
    state = {"model": torch.nn.Linear(64, 64)}
    with Snapshot(str(save_dir), state) as snapshot:
        for step in steps:
            with torch.no_grad():
                state["model"].weight.fill_(fill + step)
            snapshot.save(step)
    return state


@pytest.mark.parametrize(
    ("name", "step"), [("0", 0), ("7", 7), ("120", 120), ("007", None), ("00", None), ("x", None)]
)
def test_only_canonical_names_are_steps(name: str, step: int | None) -> None:
    assert parse_step(name) == step


def test_step_names_are_canonical_and_checked() -> None:
    assert step_name(7) == "7"
    for bad in (-1, True, 7.0, "7"):
        with pytest.raises(InvalidStepError):
            step_name(bad)  # type: ignore[arg-type]


def test_zero_padded_directory_never_shadows_the_canonical_step(tmp_path: Path) -> None:
    """Before: dirs ``007`` and ``7`` were both step 7 and get_checkpoint(d, 7) gave ``007``."""
    save(tmp_path / "padded", (7,), fill=100.0)
    (tmp_path / "padded" / "7").rename(tmp_path / "run-007")
    save(tmp_path / "run", (7,))
    (tmp_path / "run-007").rename(tmp_path / "run" / "007")
    assert get_checkpoints(str(tmp_path / "run")) == [str(tmp_path / "run" / "7")]
    assert get_checkpoint(str(tmp_path / "run"), 7) == str(tmp_path / "run" / "7")
    with pytest.raises(InvalidCheckpointPathError, match="without leading zeros"):
        step_from_checkpoint(str(tmp_path / "run" / "007"))


def test_list_reports_the_ignored_padded_name(tmp_path: Path, capsys) -> None:
    save(tmp_path, (7,))
    (tmp_path / "007").mkdir()
    assert library_cli.main(["checkpoints", "list", str(tmp_path)]) == 0
    err = capsys.readouterr().err
    assert "ignored" in err and "007" in err and "not a canonical step name" in err


def test_grouping_a_listing_by_step() -> None:
    root = "/r"
    listing = {
        "/r/5": {"type": "directory"},
        "/r/5/.snapshot_metadata": {"type": "file", "size": 10},
        "/r/5/0/model/weight": {"type": "file", "size": 4},
        "/r/6/.writing": {"type": "file", "size": 20},
        "/r/6/.snapshot_metadata": {"type": "file", "size": 0},
        "/r/06/.snapshot_metadata": {"type": "file", "size": 10},
        "/r/7": {"type": "file", "size": 1},
        "/r/run.json": {"type": "file", "size": 1},
    }
    groups = group_by_step(root, listing)
    assert sorted(groups) == ["5", "6"]
    assert groups["5"].committed and not groups["5"].claimed
    assert not groups["6"].committed and groups["6"].claimed  # an empty marker commits nothing
    assert set(groups["5"].files) == {COMMIT_MARKER, "0/model/weight"}


def test_only_data_files_are_covered_by_the_sidecar() -> None:
    assert is_data_file("0/model/weight") and is_data_file("batched/abc")
    for name in (COMMIT_MARKER, f"{COMMIT_MARKER}.tmp", INTEGRITY_SIDECAR, ".writing",
                 "evaled_by/validation_DONE", "eval/validation.json", "metrics.json"):  # fmt: skip
        assert not is_data_file(name), name


@pytest.mark.parametrize(
    "mangle",
    [
        lambda body: body["files"].__setitem__(next(iter(body["files"])), {"size": "big"}),
        lambda body: body.__setitem__("files", ["not", "a", "table"]),
        lambda body: body.__setitem__("block_size", 0),
        lambda body: body["files"][next(iter(body["files"]))].__setitem__("blocks", [1, 2]),
    ],
    ids=["size-big", "files-list", "block-size-0", "blocks-not-hex"],
)
def test_garbage_in_the_sidecar_is_corruption_not_a_crash(tmp_path: Path, mangle) -> None:
    save(tmp_path, (1, 2))
    sidecar = tmp_path / "2" / INTEGRITY_SIDECAR
    body = json.loads(sidecar.read_text())
    mangle(body)
    sidecar.write_text(json.dumps(body))
    report = verify_checkpoint(str(tmp_path / "2"), raise_on_corrupt=False)
    assert report.status == "corrupt" and report.problems[0].path == INTEGRITY_SIDECAR
    assert get_latest_valid_checkpoint(str(tmp_path)) == str(tmp_path / "1")


def test_inspect_of_a_checkpoint_missing_a_shard_says_so(tmp_path: Path, capsys) -> None:
    save(tmp_path, (3,))
    files = json.loads((tmp_path / "3" / INTEGRITY_SIDECAR).read_text())["files"]
    victim = max(files, key=lambda name: files[name]["size"])
    (tmp_path / "3" / victim).unlink()
    assert library_cli.main(["checkpoints", "inspect", str(tmp_path / "3"), "--json"]) == 1
    payload = json.loads(capsys.readouterr().out)
    assert payload["state"] == "corrupt" and any(victim in p for p in payload["problems"])


@pytest.mark.parametrize(
    ("error", "code"),
    [
        (CheckpointWriteError("disk full"), 3),
        (SaveDirLockedError("held by pid 1"), 5),  # another run holds it: wait (docs/cli.md)
        (InvalidStepError("bad"), 2),
        (ConnectionRefusedError("refused"), 3),
    ],
)
def test_exit_codes_come_from_the_kind_of_error(
    error: Exception, code: int, capsys, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Storage faults are 3 even where they are also CheckpointErrors (were caught as 2)."""

    def fail(_: object) -> int:
        raise error

    monkeypatch.setattr(library_cli, "checkpoints_list", fail)
    assert library_cli.main(["checkpoints", "list", "/nowhere", "--json"]) == code
    assert json.loads(capsys.readouterr().out)["exit_code"] == code
