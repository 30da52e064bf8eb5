"""TorchRec sharded state across ranks: real ``torchrun`` jobs (gloo, CPU), no mocks.

Each job runs tests/helpers/dist_torchrec.py: a ``DistributedModelParallel`` with two
embedding tables (fused row-wise Adagrad) and a dense layer (Adam), saved through
``Snapshot`` with ``{"model": dmp, "optimizer": opt}`` as separate entries — the original tml
layout, which plain torchsnapshot 0.1.0 cannot restore (its issue 135). Every restore is
compared tensor for tensor with the full state the saving job had, gathered from all ranks.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import free_port
from tml_checkpointing import Snapshot
from tml_checkpointing.cli import main
from tml_checkpointing.reading.metadata import read_metadata
from tml_checkpointing.reading.verify import verify_checkpoint
from tml_checkpointing.storage.filesystem import resolve

HELPER = Path(__file__).parent / "helpers" / "dist_torchrec.py"
ROOT = Path(__file__).parent.parent
JOB_TIMEOUT = 90  # a rank that dies makes the others fail within their 30 s collective timeout


def torchrun(
    nproc: int, mode: str, checkpoint: Path | str, plan: str, out: Path, *, fails_with: str = ""
) -> dict[str, Any]:
    """Run one job to completion; return what rank 0 wrote (or, with ``fails_with``, check
    that the job failed with that text in its output)."""
    command = [
        sys.executable, "-m", "torch.distributed.run",
        "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
        "--master-port", str(free_port()),
        str(HELPER), mode, str(checkpoint), plan, str(out),
    ]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    job = subprocess.run(
        command, env=env, cwd=ROOT, capture_output=True, text=True, timeout=JOB_TIMEOUT
    )
    if fails_with:
        assert job.returncode != 0 and fails_with in job.stderr, job.stderr[-4000:]
        return {}
    assert job.returncode == 0, f"{mode} with {nproc} ranks failed:\n{job.stderr[-4000:]}"
    result: dict[str, Any] = torch.load(out)
    return result


def assert_same_state(saved: dict[str, Any], restored: dict[str, Any]) -> None:
    tensors = {k: v for k, v in restored.items() if not k.startswith("__")}
    assert sorted(tensors) == sorted(saved)
    differing = [key for key in saved if not torch.equal(saved[key], tensors[key])]
    assert differing == [], f"not restored bit-exactly: {differing}"


@pytest.fixture(scope="module")
def two_rank_row_wise(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, Any]]:
    """A checkpoint saved by 2 ranks, both tables split by rows over both ranks."""
    root = tmp_path_factory.mktemp("dist")
    checkpoint = root / "run" / "3"
    saved = torchrun(2, "save", checkpoint, "row", root / "saved.pt")
    momentum = "optimizer/state/fused.ebc.embedding_bags.t0.weight/t0.momentum1"
    assert saved[momentum].abs().sum() > 0  # trained: the optimizer state is not the initial one
    return checkpoint, saved


def test_separate_model_and_optimizer_entries_restore(
    two_rank_row_wise: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    checkpoint, saved = two_rank_row_wise
    restored = torchrun(2, "plain+restore", checkpoint, "row", tmp_path / "out.pt")
    assert "Reading a ShardedTensor without a runtime object" in restored["__plain_error__"]
    assert restored["__step__"] == 3
    assert_same_state(saved, restored)


@pytest.mark.parametrize(("nproc", "plan"), [(1, "table"), (2, "table")])
def test_restore_with_other_world_size_and_plan(
    two_rank_row_wise: tuple[Path, dict[str, Any]], tmp_path: Path, nproc: int, plan: str
) -> None:
    checkpoint, saved = two_rank_row_wise
    assert_same_state(saved, torchrun(nproc, "restore", checkpoint, plan, tmp_path / "out.pt"))


def test_one_rank_checkpoint_restores_on_two_ranks(tmp_path: Path) -> None:
    checkpoint = tmp_path / "run" / "5"
    saved = torchrun(1, "save", checkpoint, "table", tmp_path / "saved.pt")
    assert_same_state(saved, torchrun(2, "restore", checkpoint, "mixed", tmp_path / "out.pt"))


def test_sharded_table_reads_whole_without_process_group(
    two_rank_row_wise: tuple[Path, dict[str, Any]], capsys: pytest.CaptureFixture[str]
) -> None:
    import json

    checkpoint, saved = two_rank_row_wise
    snapshot = Snapshot.get_torch_snapshot(str(checkpoint.parent))
    assert snapshot is not None
    for name, key in [
        ("model/ebc.embedding_bags.t0.weight", "model/ebc.embedding_bags.t0.weight"),
        ("t1.momentum1", "optimizer/state/fused.ebc.embedding_bags.t1.weight/t1.momentum1"),
        ("model/dense.weight", "model/dense.weight"),
    ]:
        table = torch.full_like(saved[key], float("nan"))
        Snapshot.load_snapshot_to_weight(snapshot, name, table)
        assert torch.equal(table, saved[key]), name

    assert main(["checkpoints", "inspect", str(checkpoint), "--json"]) == 0
    entries = {e["name"]: e for e in json.loads(capsys.readouterr().out)["entries"]}
    table = entries["model/ebc.embedding_bags.t0.weight"]  # one row for both ranks' shards
    assert table["type"] == "ShardedTensor" and table["shape"] == [40, 8]
    assert table["bytes"] == 40 * 8 * 4


def test_sidecar_covers_every_rank_and_catches_a_flipped_byte_in_rank_1(
    two_rank_row_wise: tuple[Path, dict[str, Any]], tmp_path: Path
) -> None:
    source, _ = two_rank_row_wise
    checkpoint = tmp_path / "run" / "3"
    shutil.copytree(source, checkpoint)
    assert not list(checkpoint.glob(".integrity.json.rank-*"))  # merged at commit, removed
    fs, root = resolve(str(checkpoint))
    metadata, _ = read_metadata(fs, root, str(checkpoint))
    assert metadata is not None and metadata.world_size == 2
    rank_1_files = {
        shard.tensor.location
        for path, entry in metadata.manifest.items()
        if path.startswith("1/") and getattr(entry, "shards", None)
        for shard in entry.shards
    }
    rank_0_files = {
        shard.tensor.location
        for path, entry in metadata.manifest.items()
        if path.startswith("0/") and getattr(entry, "shards", None)
        for shard in entry.shards
    }
    only_rank_1 = sorted(rank_1_files - rank_0_files)
    assert only_rank_1, "rank 1 wrote no file of its own"
    sidecar = json.loads((checkpoint / ".integrity.json").read_text())["files"]
    assert set(only_rank_1) <= set(sidecar)
    assert verify_checkpoint(str(checkpoint), level="full").status == "valid"

    victim = checkpoint / only_rank_1[0]
    data = bytearray(victim.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size: only a checksum can tell
    victim.write_bytes(bytes(data))
    report = verify_checkpoint(str(checkpoint), level="full", raise_on_corrupt=False)
    assert report.status == "corrupt" and only_rank_1[0] in str(report.problems)
    torchrun(
        1, "restore", checkpoint, "table", tmp_path / "out.pt", fails_with="CorruptCheckpointError"
    )
