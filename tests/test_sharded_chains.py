"""Incremental saves of sharded TorchRec state: deltas per rank, restored anywhere, bit-exact.

Each job runs tests/helpers/dist_torchrec.py under ``torchrun`` (gloo, CPU). ``save-chain``
trains a ``DistributedModelParallel`` (fused row-wise Adagrad on the tables, Adam on the dense
layer) and saves after every step through an incremental ``Snapshot``: one full checkpoint,
then deltas in which every rank writes the changed rows of its own shards. The chain's tip is
then restored with another number of ranks, under another plan, in one process without a
process group, from disk and from S3 (moto), and compared tensor for tensor with the full
state the saving job had.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from tests.conftest import S3Server
from tests.helpers.dist_torchrec import CHAIN_SAVES
from tests.test_distributed import assert_same_state, torchrun
from tml_checkpointing import Snapshot
from tml_checkpointing.format.chain_link import ChainLink
from tml_checkpointing.reading.chains import read_chain_link
from tml_checkpointing.reading.verify import verify_checkpoint

ROOT = Path(__file__).parent.parent
TABLE = "model/ebc.embedding_bags.t0.weight"


def _tip_link(save_dir: str) -> ChainLink:
    link = read_chain_link(f"{save_dir}/{CHAIN_SAVES}")
    assert link is not None
    return link


@pytest.fixture(scope="module")
def two_rank_chain(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, dict[str, Any]]:
    """A chain saved by 2 ranks, both tables split by rows over both ranks."""
    root = tmp_path_factory.mktemp("chain")
    saved = torchrun(2, "save-chain", root / "run", "row", root / "saved.pt")
    return str(root / "run"), saved


def test_every_rank_writes_the_changed_rows_of_its_own_shards(
    two_rank_chain: tuple[str, dict[str, Any]],
) -> None:
    save_dir, _ = two_rank_chain
    link = _tip_link(save_dir)
    assert link.is_delta and link.depth == CHAIN_SAVES - 1
    tables = [t for t in link.tensors if t.path == TABLE]
    assert sorted(t.rank for t in tables) == [0, 1]  # one piece per rank's shard
    assert sorted(t.offsets for t in tables) == [(0, 0), (20, 0)]  # where each shard sits
    assert all(t.global_shape == (40, 8) for t in tables)
    assert link.written_bytes < link.full_bytes
    for step in range(1, CHAIN_SAVES + 1):
        assert verify_checkpoint(f"{save_dir}/{step}", level="full").status == "valid"


def test_a_two_rank_chain_restores_with_two_ranks(
    two_rank_chain: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    save_dir, saved = two_rank_chain
    tip = Path(save_dir) / str(CHAIN_SAVES)
    restored = torchrun(2, "restore", tip, "row", tmp_path / "out.pt")
    assert_same_state(saved, restored)
    assert restored["__step__"] == CHAIN_SAVES


def test_a_two_rank_chain_restores_in_one_rank_under_another_plan(
    two_rank_chain: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    save_dir, saved = two_rank_chain
    tip = Path(save_dir) / str(CHAIN_SAVES)
    assert_same_state(saved, torchrun(1, "restore", tip, "table", tmp_path / "out.pt"))


def test_a_sharded_table_of_the_chain_loads_whole_without_a_process_group(
    two_rank_chain: tuple[str, dict[str, Any]],
) -> None:
    save_dir, saved = two_rank_chain
    snapshot = Snapshot.get_torch_snapshot(save_dir, CHAIN_SAVES)
    assert snapshot is not None
    table = torch.full((40, 8), float("nan"))
    Snapshot.load_snapshot_to_weight(snapshot, TABLE, table)
    assert torch.equal(table, saved[TABLE])


def test_materialize_writes_the_chain_tip_as_a_full_checkpoint(
    two_rank_chain: tuple[str, dict[str, Any]], tmp_path: Path
) -> None:
    save_dir, saved = two_rank_chain
    destination = tmp_path / "full" / str(CHAIN_SAVES)
    job = subprocess.run(
        [sys.executable, "-m", "tml_checkpointing.cli", "checkpoints", "materialize",
         f"{save_dir}/{CHAIN_SAVES}", str(destination)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert job.returncode == 0, job.stderr[-3000:]
    materialized = read_chain_link(str(destination))
    assert materialized is None or not materialized.is_delta
    assert_same_state(saved, torchrun(2, "restore", destination, "table", tmp_path / "out.pt"))


def test_a_one_rank_chain_restores_with_two_ranks(tmp_path: Path) -> None:
    saved = torchrun(1, "save-chain", tmp_path / "run", "row", tmp_path / "saved.pt")
    assert _tip_link(str(tmp_path / "run")).is_delta
    tip = tmp_path / "run" / str(CHAIN_SAVES)
    assert_same_state(saved, torchrun(2, "restore", tip, "row", tmp_path / "out.pt"))


def test_a_two_rank_chain_on_s3_restores_in_one_rank(s3_server: S3Server, tmp_path: Path) -> None:
    save_dir = f"s3://{s3_server.new_bucket()}/run"
    saved = torchrun(2, "save-chain", save_dir, "row", tmp_path / "saved.pt")
    assert _tip_link(save_dir).is_delta
    tip = f"{save_dir}/{CHAIN_SAVES}"
    restored = torchrun(1, "restore", tip, "table", tmp_path / "out.pt")
    assert_same_state(saved, restored)
