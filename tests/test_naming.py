"""Runs and artifacts named after the experiment; a run form that explains every parameter.

The Prefect UI lists runs by name and artifacts by key, and shows each flow parameter's
description in the run form: these must tell experiments apart and say what a value means.
"""

from __future__ import annotations

import pytest
from prefect import Flow

from flows.evaluate import evaluate
from flows.retrain import retrain
from flows.train import train
from tasks.naming import artifact_key
from training.experiment import derived_experiment


def test_the_experiment_reads_as_its_directory_and_tells_directories_apart() -> None:
    # More in test_experiment_identity.py: the same last part never makes the same name.
    assert derived_experiment("s3://bucket/runs/exp1/").startswith("exp1-")
    assert derived_experiment("/data/runs/ranking-v2").startswith("ranking-v2-")
    assert derived_experiment("memory://x").startswith("x-")


def test_artifact_keys_are_valid_prefect_keys() -> None:
    assert artifact_key("train-epochs", "Exp_1.v2") == "train-epochs-exp-1-v2"
    assert (
        artifact_key("eval", "validation", "2026-11-30T0200") == "eval-validation-2026-11-30t0200"
    )


@pytest.mark.parametrize("flow", [train, evaluate, retrain], ids=lambda f: f.name)
def test_every_flow_parameter_has_a_description_for_the_run_form(flow: Flow) -> None:
    properties = flow.parameters.properties
    assert properties, flow.name
    missing = [name for name, schema in properties.items() if not schema.get("description")]
    assert not missing, f"{flow.name}: no description for {missing}"
    # A model parameter's form shows its fields, each with the description from the model.
    fields = {
        f"{name}.{field}": schema
        for name, parameter in properties.items()
        if "$ref" in parameter
        for field, schema in flow.parameters.definitions[parameter["$ref"].rsplit("/", 1)[-1]][
            "properties"
        ].items()
    }
    missing = [name for name, schema in fields.items() if not schema.get("description")]
    assert not missing, f"{flow.name}: no description for {missing}"
    if flow is train:
        assert "0 means" in fields["config.checkpoint_every_steps"]["description"]
