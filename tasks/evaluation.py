"""Prefect task evaluating one checkpoint: a thin wrapper over
:func:`training.evaluation.evaluate_checkpoint`. Checkpoints already marked done for the
partition come back as COMPLETED task runs named "Skipped".

Exactly once: several evaluate runs may want the same checkpoint at the same moment (a burst
of ``tml.checkpoint.committed`` events starts one run each, and a polling evaluator may run
beside them). The flow therefore checks done-markers and evaluates while holding the one slot
of a Prefect global concurrency limit per experiment and partition,
``tml-eval-<exp>-<partition>`` (:func:`one_evaluation_at_a_time`; created on first use,
visible under Concurrency in the UI): whoever comes second finds the markers and skips.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from typing import Any

from prefect import get_run_logger, task
from prefect.cache_policies import NO_CACHE
from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.states import Completed

from tasks.naming import artifact_key, experiment
from training.evaluation import EvalConfig, evaluate_checkpoint


@task(
    name="evaluate-checkpoint",
    task_run_name="{config.partition}-step-{step}",
    retries=1,
    retry_delay_seconds=0,
    cache_policy=NO_CACHE,  # the done-marker in the checkpoint is the record of what is done
)
def evaluate_checkpoint_task(config: EvalConfig, checkpoint: str, step: int) -> Any:
    result = evaluate_checkpoint(config, checkpoint, log=get_run_logger().info)
    if result.status == "skipped":
        return Completed(
            name="Skipped",
            message=f"step {step} already evaluated on {config.partition}",
            data=result,
        )
    return result


def evaluation_limit_name(config: EvalConfig) -> str:
    """The global concurrency limit that serialises ``config``'s evaluations."""
    return artifact_key("tml-eval", experiment(config.save_dir), config.partition)


@contextmanager
def one_evaluation_at_a_time(
    config: EvalConfig, log: Callable[[str], object] | None = None
) -> Iterator[None]:
    """Hold the experiment and partition's evaluation slot (waits while another run has it;
    says so through ``log`` first).

    Hold it for a whole pass over several checkpoints rather than once per checkpoint: right
    after a release, Prefect's server answers the next acquisition "retry in about 2 s".
    """
    name = evaluation_limit_name(config)
    _ensure_limit(name)
    if log is not None:
        with get_client(sync_client=True) as client:
            if client.read_global_concurrency_limit_by_name(name).active_slots:
                log(f"Waiting for {name}: another evaluator of this run and partition has it.")
    with concurrency(name, occupy=1, strict=True):
        yield


_ensured: set[str] = set()
_ensured_lock = threading.Lock()


def _ensure_limit(name: str) -> None:
    """Create the limit (1 slot) unless it exists; two runs creating it at once is fine."""
    with _ensured_lock:
        if name in _ensured:
            return
        with get_client(sync_client=True) as client:
            try:
                client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                with suppress(ObjectAlreadyExists):
                    client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=1)
                    )
        _ensured.add(name)
