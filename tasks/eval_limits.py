"""The evaluation slot of an experiment and partition: a Prefect global concurrency limit
``tml-eval-<experiment>-<partition>`` of 1 slot, living as long as that evaluation does.

Why a limit: several evaluators may want the same checkpoint at once (each commit event starts
a run, a polling evaluator may run beside them). Whoever holds the slot checks done-markers and
evaluates; whoever comes second finds the markers and skips: each checkpoint once.

Why it is removed: one limit per experiment and partition, kept forever, piled up under
Concurrency in the UI (every nightly run is an experiment). So the limit is created when an
evaluator first needs it and deleted by the holder that sees the experiment's final checkpoint
evaluated on the partition, *while it still holds the slot* (Prefect releases a lease of a
deleted limit without error). Deleting while holding is what keeps it exactly-once: at that
moment nobody else holds a slot, and an evaluator still waiting for the old limit is refused
by the server ("must be created before acquiring slots"); it re-creates the limit and competes
for its one slot again (:func:`evaluation_slot`). A run resumed with more epochs later simply
gets a new limit.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress

from prefect.client.orchestration import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.responses import GlobalConcurrencyLimitResponse
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError
from prefect.concurrency.sync import concurrency
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound

from tasks.naming import artifact_key

logger = logging.getLogger(__name__)

_RECREATE_ATTEMPTS = 20  # a limit deleted under a waiter this often in a row is not a race


class SlotBusyError(TimeoutError):
    """The slot was not free within the time asked (another evaluator holds it)."""


def evaluation_limit_name(experiment: str, partition: str) -> str:
    """The global concurrency limit that serialises ``experiment``'s ``partition`` evaluations."""
    return artifact_key("tml-eval", experiment, partition)


def ensure_limit(name: str) -> None:
    """Create the limit (1 slot) unless it exists; two evaluators creating it at once is fine."""
    if _read_limit(name) is None:
        with get_client(sync_client=True) as client, suppress(ObjectAlreadyExists):
            client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=1))


def limit_exists(name: str) -> bool:
    return _read_limit(name) is not None


def slot_is_taken(name: str) -> bool:
    """Whether someone holds the slot now (for saying so before waiting)."""
    limit = _read_limit(name)
    return bool(limit is not None and limit.active_slots)


def _read_limit(name: str) -> GlobalConcurrencyLimitResponse | None:
    with get_client(sync_client=True) as client:
        try:
            return client.read_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return None


def remove_limit(name: str) -> bool:
    """Delete the limit (call it holding its slot: see the module's docstring); whether it was
    there."""
    with get_client(sync_client=True) as client:
        try:
            client.delete_global_concurrency_limit_by_name(name)
        except ObjectNotFound:
            return False
    return True


@contextmanager
def evaluation_slot(
    name: str,
    *,
    timeout_seconds: float | None = None,
    log: Callable[[str], object] | None = None,
) -> Iterator[None]:
    """Hold the limit's one slot (created if missing) while the block runs.

    Waits while another evaluator holds it: at most ``timeout_seconds`` (then
    :class:`SlotBusyError`), or for as long as it takes (``None``), saying so through ``log``.
    A limit deleted while this waits (its last holder saw the final checkpoint evaluated) is
    created again and waited for anew.
    """
    with ExitStack() as stack:
        for _ in range(_RECREATE_ATTEMPTS):
            ensure_limit(name)
            if log is not None and slot_is_taken(name):
                log(
                    f"Waiting for {name}: another evaluator of this experiment and partition has it"
                )
            try:
                stack.enter_context(
                    concurrency(name, occupy=1, strict=True, timeout_seconds=timeout_seconds)
                )
                break
            except ConcurrencySlotAcquisitionError:
                if limit_exists(name):
                    raise
                logger.info("%s was removed while waiting for it; creating it again.", name)
            except TimeoutError as error:
                raise SlotBusyError(f"{name} is held by another evaluator") from error
        else:
            raise ConcurrencySlotAcquisitionError(
                f"{name} vanished {_RECREATE_ATTEMPTS} times while waiting for it; is something "
                "deleting it?"
            )
        yield
