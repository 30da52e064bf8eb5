"""How a run's ranks are launched: the torchrun command line, refused layouts, failure injection,
what the flow process of a run with ranks leaves to them (the model, the shape check).

Quick (no process started): the real launches are in tests/test_ranks.py.
"""

from __future__ import annotations

from pathlib import Path

import psutil
import pytest

from flows.cli import main
from tml_checkpointing import CheckpointShapeMismatchError
from training.config import InvalidNodeLayoutError, NodeLayout, TrainConfig
from training.failures import retry_cannot_help
from training.launch import (
    RankJobFailedError,
    RankRefusal,
    torchrun_command,
    train_epoch_on_ranks,
)
from training.loop import claim_injected_failure
from training.run_info import RunInfo, write_run_info
from training.session import close_session, get_session
from training.start import check_run_start

from .training_helpers import plain_run

RANK_ARGS = ["--epoch", "0"]


def config(**fields: object) -> TrainConfig:
    merged: dict[str, object] = {"save_dir": "/tmp/unused", "epochs": 2, "steps_per_epoch": 5}
    return TrainConfig.model_validate({**merged, **fields})


def test_one_machine_uses_a_standalone_rendezvous() -> None:
    command = torchrun_command(config(nproc_per_node=4), NodeLayout(), RANK_ARGS)
    assert command[1:3] == ["-m", "torch.distributed.run"]
    assert "--standalone" in command and "--nnodes" not in command
    assert command[command.index("--nproc-per-node") + 1] == "4"
    assert command[command.index("--max-restarts") + 1] == "0"  # retries are Prefect's
    assert command[-4:] == ["-m", "training.rank_epoch", *RANK_ARGS]


def test_several_machines_meet_at_node_zeros_endpoint() -> None:
    layout = NodeLayout(node_rank=1, rdzv_endpoint="10.0.0.5:29500")
    command = torchrun_command(config(nproc_per_node=2, nnodes=3), layout, RANK_ARGS)
    assert "--standalone" not in command
    flags = dict(zip(command[3::2], command[4::2], strict=False))
    assert flags["--nnodes"] == "3" and flags["--node-rank"] == "1"
    assert flags["--master-addr"] == "10.0.0.5" and flags["--master-port"] == "29500"


@pytest.mark.parametrize(
    ("layout", "message"),
    [
        (NodeLayout(), "needs rdzv_endpoint"),
        (NodeLayout(node_rank=2, rdzv_endpoint="h:1"), "node_rank must be in [0, 2)"),
        (NodeLayout(rdzv_endpoint="no-port"), "must look like host:port"),
        (NodeLayout(rdzv_endpoint="h:99999"), "must look like host:port"),
    ],
)
def test_layouts_that_cannot_form_the_job_are_refused(layout: NodeLayout, message: str) -> None:
    with pytest.raises(
        InvalidNodeLayoutError, match=message.replace("[", r"\[").replace(")", r"\)")
    ):
        layout.check(config(nnodes=2))


def test_the_cli_refuses_a_bad_layout_before_anything_starts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # An API URL nothing listens on (port 9, discard): the refusal must come before Prefect is
    # used at all, and no private Prefect server is started for it -- also in a process whose
    # Prefect settings were read before the variable was set (a test session, a notebook).
    from prefect.settings import PREFECT_API_URL

    PREFECT_API_URL.value()  # Prefect's settings context exists, made without the variable
    monkeypatch.setenv("PREFECT_API_URL", "http://127.0.0.1:9/api")
    code = main(["train", "--save-dir", str(tmp_path / "run"), "--epochs", "1", "--nnodes", "2"])
    assert code == 2
    assert "needs rdzv_endpoint" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()  # nothing written
    servers = [c for c in psutil.Process().children() if "local_server.py" in " ".join(c.cmdline())]
    assert not servers, servers


def test_an_injected_failure_fires_once_per_run_in_the_epoch_that_holds_it() -> None:
    run = config(fail_at_step=7, save_dir="/tmp/unused-injection")
    assert not claim_injected_failure(run, 0)  # steps 1-5
    assert claim_injected_failure(run, 1)  # steps 6-10: the first launch injects it
    assert not claim_injected_failure(run, 1)  # the retry runs clean


def test_a_start_with_ranks_builds_no_model_in_the_flow_process(tmp_path: Path) -> None:
    """The recipe raises when built outside a torchrun rank: the start must not build it, not
    even to compare the checkpoint's shapes (the ranks do, each for its own part)."""
    save_dir = str(tmp_path / "run")
    one_process = config(save_dir=save_dir, epochs=1, steps_per_epoch=2, batch_size=16)
    plain_run(one_process)
    write_run_info(RunInfo.of(one_process), save_dir)
    ranked = config(
        save_dir=save_dir, epochs=2, steps_per_epoch=2, batch_size=16, nproc_per_node=2,
        recipe="tests.helpers.rank_recipes:build",
    )  # fmt: skip
    try:
        start = check_run_start(ranked, allow_changed_config=True)
        assert start.resumed_from == f"{save_dir}/2"
        session = get_session(ranked)
        assert not session.is_built
        assert session.config_from_step == 3  # the new segment's, passed on to the ranks
    finally:
        close_session(ranked)


def test_the_ranks_refusal_is_raised_as_the_named_error_and_not_retried(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """torchrun exits 1 whatever its ranks exited with: the refusal travels as a file."""
    message = "checkpoint /x/6 does not fit the state being restored: model/t (saved shape ...)"

    def ranks(refuse: bool) -> object:
        def run(command: list[str], *_: object) -> tuple[int, None]:
            if refuse:
                refusal = Path(command[command.index("--refusal") + 1])
                RankRefusal.of(CheckpointShapeMismatchError(message)).write(refusal)
            return 1, None

        return run

    run_config = config(save_dir=str(tmp_path / "run"), nproc_per_node=2)
    monkeypatch.setattr("training.launch._run_forwarding", ranks(refuse=True))
    with pytest.raises(CheckpointShapeMismatchError) as refused:
        train_epoch_on_ranks(run_config, 0, NodeLayout(), log=lambda _: None)
    assert str(refused.value) == message and retry_cannot_help(refused.value)
    monkeypatch.setattr("training.launch._run_forwarding", ranks(refuse=False))
    with pytest.raises(RankJobFailedError) as failed:  # any other failure: retried
        train_epoch_on_ranks(run_config, 0, NodeLayout(), log=lambda _: None)
    assert not retry_cannot_help(failed.value)
