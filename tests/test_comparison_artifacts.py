"""The comparison of runs and the training run's report as Prefect artifacts, against the
session's real server: one table row per run and a chart of them all; every version a
training run publishes is distinct, its second epoch is published, and its end adds no copy."""

from __future__ import annotations

import base64
import json
import re
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import flow
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
)

from flows.comparison import publish_comparison
from flows.reporting import ThrottledReport
from training.config import TrainConfig
from training.loop import train_epoch
from training.session import close_session, get_session

from .conftest import PrefectServer
from .helpers.artifacts import latest_artifact, table_rows
from .test_run_comparison import evaluate, recorded_run


def artifacts_of(run_id: UUID, key: str) -> list[Any]:
    """Every version of ``key`` the flow run created, oldest first."""
    with get_client(sync_client=True) as client:
        found = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run_id]))
        )
    return sorted((a for a in found if a.key == key), key=lambda a: a.created)


def png_of(markdown: str) -> bytes:
    match = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert match, markdown[:200]
    return base64.b64decode(match.group(1))


def test_the_runs_under_a_root_are_compared_in_two_artifacts(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    root = tmp_path / "sweep"
    slow = recorded_run(root / "slow", lr=0.001, epochs=2)
    fast = recorded_run(root / "fast", lr=0.01, epochs=2)
    evaluate(slow.save_dir, {4: 0.6, 8: 0.7})
    evaluate(fast.save_dir, {4: 0.5, 8: 0.4})

    @flow
    def compare(runs_root: str) -> None:
        publish_comparison(runs_root, None, key_name="Sweep A", moment="after the sweep")
        publish_comparison(str(tmp_path / "nowhere"), None, key_name="empty", moment="now")
        publish_comparison("nosuchproto://x/y", None, key_name="broken", moment="now")

    state = compare(str(root), return_state=True)
    assert state.is_completed()  # a root that is missing or unreadable is only logged

    rows = table_rows("compare-sweep-a")
    assert [(r["run"], r["lr"], r["best step"]) for r in rows] == [
        ("fast", 0.01, 8),
        ("slow", 0.001, 4),
    ]
    assert [r["best checkpoint"] for r in rows] == [f"{fast.save_dir}/8", f"{slow.save_dir}/4"]
    assert [r["final eval loss"] for r in rows] == [0.4, 0.7]
    table = latest_artifact("compare-sweep-a")
    assert table.description.startswith("After the sweep: the 2 runs under ")
    curves = latest_artifact("compare-curves-sweep-a")
    assert "fast, slow" in curves.description
    assert png_of(curves.data).startswith(b"\x89PNG\r\n\x1a\n")
    run_id = state.state_details.flow_run_id
    assert not artifacts_of(run_id, "compare-empty") and not artifacts_of(run_id, "compare-broken")


def test_a_training_report_publishes_each_version_once_with_its_own_description(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    config = TrainConfig(
        save_dir=str(tmp_path / "exp-report"), epochs=4, steps_per_epoch=2, batch_size=16, seed=1
    )

    @flow
    def training() -> None:
        report = ThrottledReport(config.save_dir, None, "exp-report")
        session = get_session(config)
        try:
            for epoch in range(config.epochs):
                train_epoch(session, epoch)
                report.epoch_trained(epoch)
        finally:
            close_session(config)
        report.flush()  # the end of the run: epoch 3 was throttled, published now
        report.flush()  # nothing new: no copy

    state = training(return_state=True)
    assert state.is_completed()
    run_id = state.state_details.flow_run_id
    for key in ("checkpoints-exp-report", "loss-curve-exp-report"):
        versions = artifacts_of(run_id, key)
        moments = [a.description.split(":", 1)[0] for a in versions]
        # Epochs 0 and 1 at once, epoch 2 inside the 30 s throttle, epoch 3 at the end.
        assert moments == ["After epoch 0", "After epoch 1", "After epoch 3"], key
        assert len({a.description for a in versions}) == len(versions)
    tables = artifacts_of(run_id, "checkpoints-exp-report")
    data = [json.loads(a.data) if isinstance(a.data, str) else a.data for a in tables]
    assert [[row["step"] for row in rows] for rows in data] == [[2], [2, 4], [2, 4, 6, 8]]
    assert "4 checkpoints up to step 8" in tables[-1].description
