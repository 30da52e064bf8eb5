"""What a hostile test pass found in the library, one test (or family) per finding.

Each test reproduces the finding as reported (a sidecar that covers nothing, a 0-byte marker
over intact data, a garbled sidecar, a materialize into the save_dir, a corrupt base under a
delta, a delta bigger than a full save, an ignored directory missing from ``list --json``, a
full disk under ``metrics.json``, a cleanup between the claim's temporary write and its rename)
and asserts what must hold instead.
"""

from __future__ import annotations

import errno
import io
import json
import logging
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from torchsnapshot import StateDict

from tml_checkpointing import (
    CheckpointError,
    CheckpointWriteError,
    CorruptCheckpointError,
    NotASaveDirError,
    Snapshot,
    clean_incomplete,
    get_latest_valid_checkpoint,
    is_committed,
    materialize,
    verify_checkpoint,
    write_checkpoint_metrics,
)
from tml_checkpointing.cli import main
from tml_checkpointing.format.layout import COMMIT_MARKER, INTEGRITY_SIDECAR, is_data_file
from tml_checkpointing.reading.chains import read_chain_link
from tml_checkpointing.reading.verify import VerifyLevel
from tml_checkpointing.snapshot import WriterChoice
from tml_checkpointing.storage import filesystem

# -- shared helpers --------------------------------------------------------------------------


def small_state(seed: int = 0) -> dict[str, torch.nn.Module]:
    torch.manual_seed(seed)
    return {"model": torch.nn.Sequential(torch.nn.Linear(32, 32), torch.nn.Linear(32, 4))}


def save_steps(save_dir: Path, steps: tuple[int, ...], writer: WriterChoice = "auto") -> None:
    """Save ``steps`` (the weights change between saves)."""
    first = torch.nn.Linear(32, 32)
    model = torch.nn.Sequential(first, torch.nn.Linear(32, 4))
    state: dict[str, Any] = {"model": model}
    if writer == "torchsnapshot":  # an object of its own: a file under the rank directory 0/
        state["extra"] = StateDict(tags={"seen": [1, 2, {3}]})
    with Snapshot(str(save_dir), state, writer=writer) as snapshot:
        for step in steps:
            with torch.no_grad():
                first.weight.add_(1.0)
            snapshot.save(step).wait()


def sidecar_of(checkpoint: Path) -> dict[str, Any]:
    body: dict[str, Any] = json.loads((checkpoint / INTEGRITY_SIDECAR).read_text())
    return body


def largest_data_file(checkpoint: Path) -> str:
    files = sidecar_of(checkpoint)["files"]
    return str(max(files, key=lambda name: files[name]["size"]))


def flip_byte(path: Path, offset: int = 0) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def run_json(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, Any]:
    code = main([*argv, "--json"])
    return code, json.loads(capsys.readouterr().out)


def files_under(directory: Path) -> list[str]:
    return sorted(str(p.relative_to(directory)) for p in directory.rglob("*") if p.is_file())


def make_old(directory: Path, seconds: float = 3 * 86400) -> None:
    """Every file and directory under ``directory`` modified ``seconds`` ago."""
    old = time.time() - seconds
    for path in [directory, *directory.rglob("*")]:
        os.utime(path, (old, old))


# -- 1. a sidecar that covers nothing vouches for nothing ----------------------------------------


def test_a_data_file_the_sidecar_does_not_cover_makes_the_checkpoint_corrupt(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_steps(tmp_path, (1, 2))
    second = tmp_path / "2"
    victim = largest_data_file(second)
    body = sidecar_of(second)
    body["files"] = {}
    (second / INTEGRITY_SIDECAR).write_text(json.dumps(body))
    flip_byte(second / victim)

    levels: tuple[VerifyLevel, ...] = ("size", "full")
    for level in levels:
        with pytest.raises(CorruptCheckpointError, match="not covered") as caught:
            verify_checkpoint(str(second), level=level)
        assert caught.value.path == victim
    for flags in ((), ("--quick",), ("--full",)):
        code, payload = run_json(capsys, "checkpoints", "verify", str(second), *flags)
        assert code == 1, (flags, payload)
        assert payload["checkpoints"][0]["problems"][0]["path"] == victim
    with pytest.raises(CorruptCheckpointError, match=victim):
        Snapshot(str(tmp_path), small_state(1)).restore(str(second))
    assert get_latest_valid_checkpoint(str(tmp_path)) == str(tmp_path / "1")
    assert get_latest_valid_checkpoint(str(tmp_path), verify="full") == str(tmp_path / "1")


def test_a_read_of_a_file_the_sidecar_does_not_cover_is_refused(tmp_path: Path) -> None:
    """Reads that check no listing first (one tensor through torchsnapshot's reader) refuse a
    file the sidecar has no record of, too."""
    save_steps(tmp_path, (1,))
    first = tmp_path / "1"
    body = sidecar_of(first)
    body["files"] = {}
    (first / INTEGRITY_SIDECAR).write_text(json.dumps(body))
    snapshot = Snapshot.get_torch_snapshot(str(tmp_path))
    assert snapshot is not None
    weight = torch.empty(32, 32)
    with pytest.raises(CorruptCheckpointError, match="not covered"):
        Snapshot.load_snapshot_to_weight(snapshot, "model/0.weight", weight)


# -- 2. a 0-byte marker over intact data is moved aside, never deleted, never written into -----


def torn_marker_run(tmp_path: Path, writer: WriterChoice = "auto") -> tuple[Path, list[str]]:
    """A run with steps 5 and 10 whose step 10 has a 0-byte marker over intact data."""
    save_dir = tmp_path / "run"
    save_steps(save_dir, (5, 10), writer)
    step = save_dir / "10"
    (step / COMMIT_MARKER).write_bytes(b"")
    return save_dir, files_under(step)


def moved_aside(save_dir: Path, step: str) -> list[Path]:
    return sorted(p for p in save_dir.iterdir() if p.name.startswith(f"{step}."))


def test_clean_incomplete_moves_a_torn_marker_step_aside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_dir, before = torn_marker_run(tmp_path)
    make_old(save_dir / "10")
    data = {name: (save_dir / "10" / name).read_bytes() for name in before}
    code, payload = run_json(
        capsys, "checkpoints", "clean-incomplete", str(save_dir), "--older-than", "1h"
    )
    assert code == 0
    assert payload["removed"] == []
    aside = moved_aside(save_dir, "10")
    assert len(aside) == 1 and "torn-marker" in aside[0].name
    assert [m["path"] for m in payload["moved_aside"]] == [str(save_dir / "10")]
    assert payload["moved_aside"][0]["to"] == str(aside[0])
    assert not (save_dir / "10").exists()
    assert {name: (aside[0] / name).read_bytes() for name in before} == data  # nothing lost
    assert clean_incomplete(str(save_dir), 0) == []  # the moved-aside copy is not a step


def test_a_step_torn_twice_is_moved_aside_twice_never_merged(tmp_path: Path) -> None:
    save_dir, before = torn_marker_run(tmp_path)
    original = {name: (save_dir / "10" / name).read_bytes() for name in before}
    first = clean_incomplete(str(save_dir), 0)
    (save_dir / "10").mkdir()
    (save_dir / "10" / COMMIT_MARKER).write_bytes(b"")
    (save_dir / "10" / "other").write_bytes(b"second attempt")
    second = clean_incomplete(str(save_dir), 0)
    targets = [Path(entry.moved_to) for entry in first + second]
    assert len(targets) == 2 and targets[0] != targets[1]
    assert {name: (targets[0] / name).read_bytes() for name in before} == original
    assert files_under(targets[1]) == [COMMIT_MARKER, "other"]
    assert sorted(moved_aside(save_dir, "10")) == sorted(targets)


def test_a_new_save_never_writes_into_a_step_holding_old_data(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_dir, before = torn_marker_run(tmp_path)
    state = small_state(3)
    with Snapshot(str(save_dir), state) as snapshot:
        snapshot.save(10).wait()
    step = save_dir / "10"
    covered = set(sidecar_of(step)["files"])
    strays = [name for name in files_under(step) if is_data_file(name) and name not in covered]
    assert strays == []  # nothing of the old attempt beside the new checkpoint
    aside = moved_aside(save_dir, "10")
    assert len(aside) == 1 and files_under(aside[0]) == before
    code, payload = run_json(capsys, "checkpoints", "verify", str(step))
    assert code == 0 and [c["checkpoint"] for c in payload["checkpoints"]] == [str(step)]
    assert payload["incomplete"] == []


def test_a_torn_marker_step_is_never_taken_for_a_save_dir(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Written by torchsnapshot's writer, its data sits under the rank directory ``0/``, which
    looks like a step: verify listed ``R/10/0``, and cleaning ``R/10`` would delete it."""
    save_dir, before = torn_marker_run(tmp_path, writer="torchsnapshot")
    step = save_dir / "10"
    assert (step / "0").is_dir()
    code, payload = run_json(capsys, "checkpoints", "verify", str(step))
    assert code == 2
    assert "commit marker" in payload["error"] and "empty" in payload["error"]
    assert str(step / "0") not in json.dumps(payload)
    with pytest.raises(NotASaveDirError, match="empty"):
        clean_incomplete(str(step), 0)
    code, payload = run_json(
        capsys, "checkpoints", "clean-incomplete", str(step), "--older-than", "0"
    )
    assert code == 2 and "not a save_dir" in payload["error"]
    assert files_under(step) == before  # nothing deleted


# -- 3. a garbled sidecar is corrupt, never a raw error, never a huge allocation ----------------


def _set(key: str, value: Any) -> Callable[[dict[str, Any]], Any]:
    def edit(body: dict[str, Any]) -> Any:
        body[key] = value
        return body

    return edit


def _drop(key: str) -> Callable[[dict[str, Any]], Any]:
    def edit(body: dict[str, Any]) -> Any:
        del body[key]
        return body

    return edit


def _each_file(change: Callable[[dict[str, Any]], None]) -> Callable[[dict[str, Any]], Any]:
    def edit(body: dict[str, Any]) -> Any:
        for entry in body["files"].values():
            change(entry)
        return body

    return edit


GARBLED: dict[str, tuple[Callable[[dict[str, Any]], Any], str]] = {
    "version-text": (_set("version", "abc"), "version"),
    "version-float": (_set("version", 2.5), "version"),
    "version-unknown": (_set("version", 7), "version"),
    "version-null": (_set("version", None), "version"),
    "block-size-zero": (_set("block_size", 0), "block_size"),
    "block-size-negative": (_set("block_size", -4096), "block_size"),
    "block-size-absurd": (_set("block_size", 2**62), "block_size"),
    "block-size-text": (_set("block_size", "1048576"), "block_size"),
    "block-size-float": (_set("block_size", 1048576.0), "block_size"),
    "block-size-missing": (_drop("block_size"), "block_size"),
    "algorithm-missing": (_drop("algorithm"), "algorithm"),
    "files-missing": (_drop("files"), "file table"),
    "files-list": (_set("files", []), "file table"),
    "digest-not-hex": (_each_file(lambda e: e.update(blocks=["zz" * 8])), "blocks"),
    "digest-number": (_each_file(lambda e: e.update(blocks=[12345])), "blocks"),
    "digest-count": (_each_file(lambda e: e.update(blocks=e["blocks"] * 2)), "blocks"),
    "size-missing": (_each_file(lambda e: e.pop("size")), "size"),
    "size-negative": (_each_file(lambda e: e.update(size=-1)), "size"),
    "not-json": (lambda body: b"{not json", "not JSON"),
    "json-array": (lambda body: [body], "object"),
    "json-number": (lambda body: 42, "object"),
}


@pytest.mark.parametrize("case", sorted(GARBLED))
def test_a_garbled_sidecar_is_corrupt_and_resume_falls_back(tmp_path: Path, case: str) -> None:
    edit, field = GARBLED[case]
    save_steps(tmp_path, (1, 2))
    second = tmp_path / "2"
    edited = edit(sidecar_of(second))
    raw = edited if isinstance(edited, bytes) else json.dumps(edited).encode()
    (second / INTEGRITY_SIDECAR).write_bytes(raw)
    levels: tuple[VerifyLevel, ...] = ("size", "full")
    for level in levels:
        with pytest.raises(CorruptCheckpointError, match=field) as caught:
            verify_checkpoint(str(second), level=level)
        assert caught.value.path == INTEGRITY_SIDECAR
    with pytest.raises(CorruptCheckpointError, match=field):
        Snapshot(str(tmp_path), small_state(1)).restore(str(second))
    assert get_latest_valid_checkpoint(str(tmp_path), verify="full") == str(tmp_path / "1")


def test_a_garbled_sidecar_exits_1_from_the_cli(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_steps(tmp_path, (1,))
    body = sidecar_of(tmp_path / "1")
    body["block_size"] = 2**62
    (tmp_path / "1" / INTEGRITY_SIDECAR).write_text(json.dumps(body))
    for flags in ((), ("--quick",)):
        code, payload = run_json(capsys, "checkpoints", "verify", str(tmp_path), *flags)
        assert code == 1 and "block_size" in payload["checkpoints"][0]["problems"][0]["problem"]


# -- 4. materialize never writes a step into a save_dir -----------------------------------------


def test_materialize_into_a_save_dir_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run, other = tmp_path / "run", tmp_path / "other"
    save_steps(run, (5,))
    save_steps(other, (1,))
    for destination in (run / "99", other / "7"):
        with pytest.raises(CheckpointError, match="outside") as caught:
            materialize(str(run / "5"), str(destination))
        assert isinstance(caught.value, ValueError)
        code, payload = run_json(
            capsys, "checkpoints", "materialize", str(run / "5"), str(destination)
        )
        assert code == 2 and "save_dir" in payload["error"] and "outside" in payload["error"]
        assert not destination.exists()
    assert sorted(p.name for p in run.iterdir() if p.name.isdigit()) == ["5"]
    export = tmp_path / "export" / "5"
    code, payload = run_json(capsys, "checkpoints", "materialize", str(run / "5"), str(export))
    assert code == 0 and is_committed(str(export))


# -- 5. a corrupt base is named as itself when a delta of it is restored -------------------------


class TableModel(torch.nn.Module):
    def __init__(self, rows: int = 256, dim: int = 16) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(rows, dim)
        self.dense = torch.nn.Linear(dim, 2)


def test_restoring_a_delta_over_a_corrupt_base_names_the_base(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TableModel()
    with Snapshot(str(tmp_path), {"model": model}, incremental=True, min_chained_bytes=1024) as s:
        s.save(10).wait()
        with torch.no_grad():
            model.table.weight[3] += 1.0
        pending = s.save(11)
        pending.wait()
    assert pending.link is not None and pending.link.is_delta and pending.link.parent == "10"
    base = tmp_path / "10"
    victim = largest_data_file(base)
    flip_byte(base / victim)
    with pytest.raises(CorruptCheckpointError) as caught:
        Snapshot(str(tmp_path), {"model": TableModel()}).restore(str(tmp_path / "11"))
    assert caught.value.checkpoint == str(base) and caught.value.path == victim
    assert f"{base}" in str(caught.value) and f"{tmp_path / '11'}/{victim}" not in str(caught.value)


# -- 6. a delta at least as big as a full save is written full -----------------------------------


def test_a_delta_as_big_as_a_full_save_is_written_full(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = TableModel()
    snapshot = Snapshot(
        str(tmp_path),
        {"model": model},
        incremental=True,
        min_chained_bytes=1024,
        max_chain_fraction=10,  # the chain's budget would allow it: the size rule must not
    )
    with snapshot:
        snapshot.save(1).wait()
        with torch.no_grad():
            model.table.weight.add_(1.0)  # every row: a delta would outweigh a full save
        pending = snapshot.save(2)
        pending.wait()
    link = read_chain_link(str(tmp_path / "2"))
    assert link is not None and not link.is_delta
    assert link.written_bytes <= link.full_bytes
    assert pending.link == link


# -- 7. list --json holds what the table shows ----------------------------------------------------


def test_list_json_includes_ignored_directories(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_steps(tmp_path, (1,))
    (tmp_path / "015").mkdir()
    (tmp_path / "015" / "junk").write_bytes(b"x")
    code, rows = run_json(capsys, "checkpoints", "list", str(tmp_path))
    assert code == 0
    ignored = [row for row in rows if row["state"] == "ignored"]
    assert [row["path"] for row in ignored] == [str(tmp_path / "015")]
    assert ignored[0]["committed"] is False and "canonical" in ignored[0]["problems"][0]
    assert [row["step"] for row in rows if row["state"] != "ignored"] == [1]
    main(["checkpoints", "list", str(tmp_path)])
    shown = capsys.readouterr()
    assert "015" in shown.out + shown.err


# -- 8. a full disk leaves no temporary files, and the committed step keeps what it had ---------


class _FullDisk(io.RawIOBase):
    """A file opened for writing on a full disk: created, but every write fails."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def writable(self) -> bool:
        return True

    def write(self, data: Any) -> int:
        raise OSError(errno.ENOSPC, "No space left on device (injected)")

    def fileno(self) -> int:
        return int(self._handle.fileno())

    def close(self) -> None:
        self._handle.close()
        super().close()


def test_a_metrics_write_on_a_full_disk_leaves_no_temporary_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_steps(tmp_path, (1,))
    checkpoint = tmp_path / "1"
    write_checkpoint_metrics(str(checkpoint), {"loss": 1.0})
    before = files_under(checkpoint)

    def full_disk_open(file: Any, mode: str = "r", *args: Any, **kwargs: Any) -> Any:
        handle = open(file, mode, *args, **kwargs)  # noqa: SIM115 (closed by the wrapper)
        return _FullDisk(handle) if "w" in mode else handle

    monkeypatch.setattr(filesystem, "open", full_disk_open, raising=False)
    with pytest.raises(CheckpointWriteError, match="No space left"):
        write_checkpoint_metrics(str(checkpoint), {"accuracy": 0.5})
    monkeypatch.undo()
    assert files_under(checkpoint) == before  # no metrics.json.<hex>.tmp left behind
    assert json.loads((checkpoint / "metrics.json").read_text()) == {"loss": 1.0}
    assert verify_checkpoint(str(checkpoint), level="full").status == "valid"
    assert write_checkpoint_metrics(str(checkpoint), {"accuracy": 0.5}) == {
        "accuracy": 0.5,
        "loss": 1.0,
    }


# -- 9. cleanup between the claim's temporary write and its rename ------------------------------


def test_clean_incomplete_at_the_moment_a_claim_is_renamed_leaves_the_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """The reported moment, reproduced: the claim's bytes are written, its rename into
    ``<step>/.writing`` not yet done, and ``clean_incomplete(older_than=0)`` runs right then."""
    real_replace = os.replace
    cleaned: list[list[Any]] = []

    def replace_after_cleanup(source: Any, destination: Any) -> None:
        if str(destination).endswith("/7/.writing") and not cleaned:
            cleaned.append(clean_incomplete(str(tmp_path), 0))
        real_replace(source, destination)

    monkeypatch.setattr(os, "replace", replace_after_cleanup)
    state = small_state()
    with caplog.at_level(logging.INFO), Snapshot(str(tmp_path), state) as snapshot:
        snapshot.save(7).wait()
    assert cleaned == [[]]  # the moment came, and nothing was removed then
    assert verify_checkpoint(str(tmp_path / "7"), level="full").status == "valid"
