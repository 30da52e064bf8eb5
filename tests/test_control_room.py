"""Prefect as the control room, against the session's real server: checkpoint events, the
per-run checkpoint table and loss curve, retries and warm starts shown as they happened, and
event-started evaluation that evaluates each checkpoint once."""

from __future__ import annotations

import base64
import contextvars
import re
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterName,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.events.filters import EventFilter, EventNameFilter, EventResourceFilter
from prefect.events.schemas.events import ResourceSpecification
from prefect.events.worker import EventsWorker

from flows.evaluate import EvalSummary, evaluate
from flows.train import TrainResult, train
from tasks.checkpoint_events import COMMITTED, CORRUPT, DELETED
from tasks.eval_limits import evaluation_limit_name, evaluation_slot
from tml_checkpointing import (
    get_checkpoints,
    is_done_eval,
    mark_done_eval,
    read_checkpoint_metrics,
)
from training.config import TrainConfig
from training.evaluation import EvalParams
from training.experiment import derived_experiment
from training.run_info import experiment_of

from .conftest import PrefectServer
from .helpers.artifacts import latest_artifact, table_rows
from .test_deployment import poll

SMALL: dict[str, Any] = {"epochs": 2, "steps_per_epoch": 4, "batch_size": 32, "seed": 5}


def checkpoint_events(save_dir: str, done: Callable[[list[Any]], bool]) -> list[Any]:
    """The server's ``tml.checkpoint.*`` events about ``save_dir``, once ``done(events)``
    (the client sends them in the background and the server stores them in batches)."""
    EventsWorker.drain_all(timeout=10)
    event_filter = EventFilter(
        event=EventNameFilter(prefix=["tml.checkpoint."]),
        resource=EventResourceFilter(labels=ResourceSpecification({"tml.save_dir": save_dir})),
    )

    def read() -> list[Any]:
        with get_client(sync_client=True) as client:
            return list(client.read_events(filter=event_filter, limit=50).events)

    return poll(read, done, f"the expected events of {save_dir}")


def named(name: str, found: list[Any]) -> list[Any]:
    return sorted((e for e in found if e.event == name), key=lambda e: e.payload["step"])


def test_every_commit_deletion_and_corruption_is_a_prefect_event(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    save_dir = str(tmp_path / "exp-events")
    state = train(
        TrainConfig(save_dir=save_dir, checkpoint_every_steps=2, keep_last=2, **SMALL),
        return_state=True,
    )
    result: TrainResult = state.result()
    run_id = str(state.state_details.flow_run_id)
    assert result.final_step == 8

    # Commits at 2, 4, 6 and 8, each once; keep_last=2 pruned 2 and 4.
    found = checkpoint_events(
        save_dir,
        lambda found: len(named(COMMITTED, found)) >= 4 and len(named(DELETED, found)) >= 2,
    )
    commits = named(COMMITTED, found)
    assert [e.payload["step"] for e in commits] == [2, 4, 6, 8]
    for event in commits:
        step = event.payload["step"]
        assert event.resource.id == f"{save_dir}/{step}"
        assert event.resource["tml.experiment"] == derived_experiment(save_dir)
        assert (event.payload["epoch"], event.payload["mid_epoch"]) == (
            (step - 1) // 4,
            step % 4 != 0,
        )
        assert event.payload["flow_run_id"] == run_id
        assert event.payload["metrics"]["train_steps"] == 2.0
        assert f"prefect.flow-run.{run_id}" in [r.id for r in event.related]
    # The loss in the event is the one recorded next to the checkpoint.
    kept = read_checkpoint_metrics(f"{save_dir}/8")
    assert commits[-1].payload["metrics"]["train_loss"] == pytest.approx(kept["train_loss"])
    assert kept["epoch_loss"] == pytest.approx(result.epochs[-1].mean_loss)
    assert [e.payload["step"] for e in named(DELETED, found)] == [2, 4]

    # A truncated file in the newest checkpoint: the resume skips it and says so as an event.
    files = [p for p in (tmp_path / "exp-events" / "8").rglob("*") if p.is_file()]
    biggest = max(files, key=lambda p: p.stat().st_size)
    biggest.write_bytes(biggest.read_bytes()[: biggest.stat().st_size // 2])
    again: TrainResult = train(TrainConfig(save_dir=save_dir, **SMALL))
    assert again.resumed_from == f"{save_dir}/6"
    corrupt = named(CORRUPT, checkpoint_events(save_dir, lambda found: bool(named(CORRUPT, found))))
    assert [e.resource.id for e in corrupt] == [f"{save_dir}/8"]
    assert biggest.name in corrupt[0].payload["error"]


def test_checkpoint_table_loss_curve_retry_and_skipped_epochs(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    save_dir = str(tmp_path / "exp-table")
    exp = derived_experiment(save_dir)  # exp-table-<hash of the URL>
    state = train(
        TrainConfig(save_dir=save_dir, checkpoint_every_steps=2, fail_at_step=7, **SMALL),
        return_state=True,
    )
    first: TrainResult = state.result()
    rows = table_rows(f"checkpoints-{exp}")
    assert [r["step"] for r in rows] == [2, 4, 6, 8]
    assert [r["kind"] for r in rows] == ["mid-epoch", "epoch end"] * 2
    assert [r["epoch"] for r in rows] == [0, 0, 1, 1]
    # Step 7 failed once: the retry restored 6 and wrote 8 as attempt 2.
    assert [r["attempt"] for r in rows] == [1, 1, 1, 2]
    for row in rows:
        recorded = read_checkpoint_metrics(row["path"])
        assert row["train loss"] == pytest.approx(recorded["train_loss"], abs=1e-5)
        assert row["MiB"] > 0
    with get_client(sync_client=True) as client:
        run = client.read_flow_run(state.state_details.flow_run_id)
    assert f"experiment:{exp}" in run.tags

    epochs = table_rows(f"train-epochs-{exp}")
    assert [(r["status"], r["attempt"]) for r in epochs] == [("trained", 1), ("trained", 2)]
    assert latest_artifact(f"checkpoints-{exp}").description.startswith("After epoch 1: ")

    curve = latest_artifact(f"loss-curve-{exp}").data
    match = re.search(r"data:image/png;base64,([A-Za-z0-9+/=]+)\)", curve)
    assert match, curve[:200]
    assert base64.b64decode(match.group(1)).startswith(b"\x89PNG\r\n\x1a\n")

    # An evaluation of step 4 adds its metrics to a new version of the same table.
    summary: EvalSummary = evaluate(
        save_dir, EvalParams(partition="validation", eval_steps=2), checkpoint=f"{save_dir}/4"
    )
    assert summary.evaluated == [2, 4, 6, 8]  # the trigger's checkpoint and every other pending
    rows = {r["step"]: r for r in table_rows(f"checkpoints-{exp}")}
    for step in (2, 4, 6, 8):
        loss = read_checkpoint_metrics(f"{save_dir}/{step}", partition="validation")["loss"]
        assert rows[step]["validation/loss"] == pytest.approx(loss, abs=1e-5)

    # A resumed run that skips both epochs still shows what they trained.
    again: TrainResult = train(TrainConfig(save_dir=save_dir, checkpoint_every_steps=2, **SMALL))
    assert again.epochs_skipped == [0, 1]
    assert [e.mean_loss for e in again.epochs] == pytest.approx([e.mean_loss for e in first.epochs])


def test_warm_start_is_reported_as_a_warm_start(prefect_api: PrefectServer, tmp_path: Path) -> None:
    base: TrainResult = train(TrainConfig(save_dir=str(tmp_path / "base"), **SMALL))
    save_dir = str(tmp_path / "warm")
    warm: TrainResult = train(
        TrainConfig(save_dir=save_dir, initial_checkpoint=base.checkpoint, **SMALL)
    )
    assert (warm.resumed_from, warm.initial_checkpoint) == ("", base.checkpoint)
    summary = latest_artifact(f"train-summary-{derived_experiment(save_dir)}").data
    assert f"- resumed from: warm start from `{base.checkpoint}`" in summary
    assert "scratch" not in summary


def test_a_second_evaluator_waits_for_the_slot_then_finds_the_checkpoint_done(
    prefect_api: PrefectServer, tmp_path: Path
) -> None:
    save_dir = str(tmp_path / "exp-once")
    train(TrainConfig(save_dir=save_dir, **{**SMALL, "epochs": 1}))
    (checkpoint,) = get_checkpoints(save_dir)
    experiment = experiment_of(save_dir)
    limit_name = evaluation_limit_name(experiment, "validation")
    outcome: dict[str, Any] = {}

    def second_evaluator() -> None:
        outcome["summary"] = evaluate(
            save_dir, EvalParams(partition="validation", eval_steps=2), checkpoint=checkpoint
        )

    # This test is the first evaluator: it holds the slot while the second one starts.
    with evaluation_slot(limit_name):
        # In this test's Prefect settings (a plain new thread would see none, and start a
        # temporary server of its own).
        thread = threading.Thread(target=contextvars.copy_context().run, args=(second_evaluator,))
        thread.start()
        flow_run_name = f"evaluate · {experiment} · partition=validation · step 4"

        def messages() -> list[str]:
            with get_client(sync_client=True) as client:
                runs = client.read_flow_runs(
                    flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[flow_run_name]))
                )
                logs = client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[r.id for r in runs]))
                )
            return [log.message for log in logs]

        # The second evaluator says it waits for the slot (evaluating nothing meanwhile)...
        poll(
            messages,
            lambda found: any(m.startswith(f"{limit_name} is held by another") for m in found),
            "the second evaluator waiting",
            limit_s=60,
        )
        assert not is_done_eval(checkpoint, "validation")
        mark_done_eval(checkpoint, "validation")  # ...and the first one finishes meanwhile.
    thread.join(timeout=120)
    assert not thread.is_alive()
    summary: EvalSummary = outcome["summary"]
    assert (summary.evaluated, summary.skipped) == ([], [4])
    with get_client(sync_client=True) as client:  # released; or removed: the final step is done
        limits = [lim for lim in client.read_global_concurrency_limits() if lim.name == limit_name]
    assert [(lim.limit, lim.active_slots) for lim in limits] in ([], [(1, 0)])
