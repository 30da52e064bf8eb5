"""Experiments that never mix: one identity per save_dir, given or derived from the whole URL.

Keys, run names, ``experiment:`` tags, events and evaluation limits all carry the experiment.
Taken from the directory's last part alone, ``/x/demo`` and ``/x/sweep/demo`` shared all of
them; a given name that two directories would share is refused, and so is a resume that
renames its run.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from pydantic import ValidationError

from flows.train import TrainResult, train
from tasks.naming import ExperimentCollisionError, artifact_key
from tml_checkpointing import list_checkpoints
from training.config import TrainConfig
from training.experiment import (
    ExperimentMismatchError,
    InvalidExperimentNameError,
    check_experiment_name,
    derived_experiment,
)
from training.run_info import experiment_of, read_run_info

from .conftest import PrefectServer

TINY: dict[str, Any] = {"epochs": 1, "steps_per_epoch": 2, "batch_size": 16, "seed": 1}


def test_a_derived_name_is_readable_and_differs_for_every_directory(tmp_path: Path) -> None:
    demo, sweep_demo = derived_experiment("/x/demo"), derived_experiment("/x/sweep/demo")
    assert demo.startswith("demo-") and sweep_demo.startswith("demo-")
    assert demo != sweep_demo
    # The same directory, however spelled, is one experiment.
    assert derived_experiment("/x/demo/") == demo
    assert derived_experiment("file:///x/demo") == demo
    # A generic or numeric last part comes with its parent.
    assert derived_experiment("s3://bucket/exp1/checkpoints").startswith("exp1-checkpoints-")
    assert derived_experiment("s3://bucket/exp2/checkpoints").startswith("exp2-checkpoints-")
    assert derived_experiment("/r/nightly/20261207T020000Z").startswith("nightly-20261207t020000z-")
    for name in (demo, derived_experiment("s3://b/Odd Name_v2.1"), derived_experiment("/")):
        assert check_experiment_name(name) == name  # a valid Prefect key part
        assert artifact_key("checkpoints", name) == f"checkpoints-{name}"


@pytest.mark.parametrize("bad", ["Demo", "a b", "-x", "x-", "", "x" * 49, "exp/1"])
def test_a_name_prefect_cannot_key_by_is_refused_with_what_to_do(bad: str) -> None:
    with pytest.raises(InvalidExperimentNameError, match="lowercase letters, digits and dashes"):
        check_experiment_name(bad)
    with pytest.raises(ValidationError, match="is not a valid name"):
        TrainConfig(save_dir="/x/run", experiment=bad or "?")


def _run(**config: Any) -> Any:
    return train(TrainConfig(**config, **TINY), return_state=True)


def _run_keys_and_tags(flow_run_id: UUID) -> tuple[str, set[str], set[str]]:
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(flow_run_id)
        artifacts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.id]))
        )
    return run.name, {a.key for a in artifacts if a.key}, set(run.tags)


def test_two_directories_with_one_last_part_share_nothing(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    seen = []
    for save_dir in (tmp_path / "x" / "demo", tmp_path / "x" / "sweep" / "demo"):
        state = _run(save_dir=str(save_dir), checkpoint_every_steps=1)
        assert state.is_completed(), state.message
        name = derived_experiment(str(save_dir))
        run_name, keys, tags = _run_keys_and_tags(state.state_details.flow_run_id)
        assert run_name.startswith(f"train · {name} · ")
        assert f"experiment:{name}" in tags
        assert {f"checkpoints-{name}", f"train-summary-{name}"} <= keys
        seen.append((name, keys, tags))
    (first, first_keys, first_tags), (second, second_keys, second_tags) = seen
    assert first != second
    assert not first_keys & second_keys  # no artifact key in common
    assert {t for t in first_tags if t.startswith("experiment:")} != {
        t for t in second_tags if t.startswith("experiment:")
    }


def test_a_given_name_is_recorded_kept_on_resume_and_never_shared(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    first_dir, other_dir = str(tmp_path / "a" / "run"), str(tmp_path / "b" / "run")
    state = _run(save_dir=first_dir, experiment="shared-exp")
    assert state.is_completed(), state.message
    assert read_run_info(first_dir).experiment == "shared-exp"
    run_name, keys, tags = _run_keys_and_tags(state.state_details.flow_run_id)
    assert run_name == "train · shared-exp · epochs=1"
    assert "experiment:shared-exp" in tags and "train-summary-shared-exp" in keys

    # A resume without the name finds it in run.json: same identity.
    again = _run(save_dir=first_dir)
    assert again.is_completed(), again.message
    result: TrainResult = again.result()
    assert result.epochs_skipped == [0]
    assert _run_keys_and_tags(again.state_details.flow_run_id)[0] == run_name
    assert experiment_of(first_dir) == "shared-exp"

    # Another directory may not take the name: its runs would share every key and limit.
    taken = _run(save_dir=other_dir, experiment="shared-exp")
    assert taken.is_failed()
    with pytest.raises(ExperimentCollisionError, match=f"already names the runs of {first_dir}"):
        taken.result()
    assert not Path(other_dir).exists()  # refused before anything was written

    # And the run may not be renamed: every key of it would change.
    renamed = _run(save_dir=first_dir, experiment="another-name")
    assert renamed.is_failed()
    with pytest.raises(ExperimentMismatchError, match="is experiment 'shared-exp'"):
        renamed.result()
    assert [c.step for c in list_checkpoints(first_dir)] == [2]
    assert json.loads((Path(first_dir) / "run.json").read_text())["experiment"] == "shared-exp"
