"""Train one epoch on several ranks: launch them with ``torchrun``, forward their logs, report.

Why ``torchrun`` (``torch.distributed.run``) and not a home-made spawner: it is what users run
on GPUs and clusters already, it sets the rank environment, hosts the rendezvous between
machines, and stops every local rank as soon as one fails (``--max-restarts 0``: retrying is
Prefect's job, one epoch at a time, from the last committed checkpoint).

One machine (``nnodes == 1``): a standalone rendezvous on a free loopback port. Several
machines: each runs the same flow with its ``node_rank``; all meet at ``rdzv_endpoint``
(``host:port`` on node 0, where global rank 0 -- the committing rank -- runs). Every node
launches every epoch, even one that is already committed: the ranks decide together (rank 0
looks, all follow) and finish at once, so no node waits at a rendezvous the others skipped.

No process outlives the launcher, however it dies (SIGKILL of its process group included):
``torchrun`` gets SIGKILL when the launcher dies, each rank when ``torchrun`` dies, each rank's
writer process when its rank dies (:mod:`tml_checkpointing.writing.parent_death`), and nothing
is committed after that. SIGKILL, not SIGTERM: a rank answers SIGTERM by saving the step in
progress, for a launcher that is no longer there. A preemption signal the launcher receives
(and survives) is forwarded as SIGTERM: the ranks checkpoint the step in progress together and
exit 128 + signum.

A failure a retry cannot fix -- the checkpoint to restore does not fit the model, which the
ranks find before they restore (each checks its own part; the flow process never builds the
model) -- cannot be told apart by ``torchrun``'s exit status (1 whatever the ranks' was). So
the ranks say it in a file (:class:`RankRefusal`, next to the result file) and the launcher
raises it as the named error, which the epoch task does not retry.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Literal

from pydantic import BaseModel

from tml_checkpointing import get_latest_valid_checkpoint, join_url, step_from_checkpoint
from tml_checkpointing.errors import (
    CheckpointError,
    CheckpointShapeMismatchError,
    PreemptedError,
)
from tml_checkpointing.lifecycle.preemption import PreemptionGuard
from tml_checkpointing.writing.parent_death import parent_death_preexec

from .config import NodeLayout, TrainConfig
from .loop import EpochResult
from .rank_epoch import LAUNCHER_PID

POLL_SECONDS = 0.2


class RankJobFailedError(CheckpointError, RuntimeError):
    """The ranks of an epoch did not all finish (one crashed, was killed, or timed out).

    Retryable: the retry relaunches every rank from the newest committed checkpoint.
    """


class RankRefusal(BaseModel):
    """Why the ranks refused an epoch: a named error a retry cannot fix, and its message.

    Written by each node's local rank 0 (every rank raises the same error, agreed on before
    any restore), read by that node's launcher once ``torchrun`` has exited.
    """

    error: Literal["CheckpointShapeMismatchError"]
    message: str

    @classmethod
    def of(cls, error: CheckpointShapeMismatchError) -> RankRefusal:
        return cls(error="CheckpointShapeMismatchError", message=str(error))

    def write(self, path: Path) -> None:
        """Whole or not at all: the launcher may read it as soon as the ranks are gone."""
        partial = path.with_suffix(".partial")
        partial.write_text(self.model_dump_json())
        partial.replace(path)

    def as_error(self) -> CheckpointShapeMismatchError:
        return CheckpointShapeMismatchError(self.message)


def refusal_file(result_file: Path) -> Path:
    """Where the ranks write their :class:`RankRefusal` for the launcher of ``result_file``."""
    return result_file.with_name(f"{result_file.stem}.refused.json")


def torchrun_command(config: TrainConfig, layout: NodeLayout, rank_args: list[str]) -> list[str]:
    """The ``torch.distributed.run`` command line for this node's ranks of one epoch."""
    command = [sys.executable, "-m", "torch.distributed.run"]
    command += ["--nproc-per-node", str(config.nproc_per_node), "--max-restarts", "0"]
    if config.nnodes == 1:
        command += ["--standalone"]
    else:
        assert layout.rdzv_endpoint is not None  # NodeLayout.check
        host, port = layout.rdzv_endpoint.rsplit(":", 1)
        command += ["--nnodes", str(config.nnodes), "--node-rank", str(layout.node_rank)]
        command += ["--master-addr", host, "--master-port", port]
    return [*command, "-m", "training.rank_epoch", *rank_args]


def train_epoch_on_ranks(
    config: TrainConfig,
    epoch: int,
    layout: NodeLayout,
    *,
    config_from_step: int = 1,
    attempt: int = 1,
    inject_failure: bool = True,
    preemption: PreemptionGuard | None = None,
    log: Callable[[str], object] = print,
) -> EpochResult:
    """Run ``epoch`` on this node's ranks; return the epoch's result once they all finished.

    Raises :class:`RankJobFailedError` when any rank failed, :class:`PreemptedError` when
    ``preemption`` was requested meanwhile (the ranks saved the step in progress first), and
    ``CheckpointShapeMismatchError`` when the ranks found, before restoring anything, that
    the checkpoint does not fit the model they built (see :class:`RankRefusal`).
    ``inject_failure``: pass ``config.fail_at_step`` on (the caller injects it once per run).
    ``attempt``: which attempt of the epoch's task this is (recorded with each checkpoint).
    """
    layout.check(config)
    if config.nnodes == 1:  # no other machine waits at a rendezvous: skip without launching
        done = _already_committed(config, epoch)
        if done is not None:
            log(f"epoch {epoch}: skipped, checkpoint at step {done.resumed_from_step} covers it")
            return done
    job_config = config if inject_failure else config.model_copy(update={"fail_at_step": None})
    with tempfile.TemporaryDirectory(prefix="tml-epoch-") as scratch:
        config_file, result_file = Path(scratch, "config.json"), Path(scratch, "result.json")
        config_file.write_text(job_config.model_dump_json())
        rank_args = ["--config", str(config_file), "--epoch", str(epoch)]
        rank_args += ["--config-from-step", str(config_from_step), "--result", str(result_file)]
        rank_args += ["--attempt", str(attempt), "--refusal", str(refusal_file(result_file))]
        command = torchrun_command(config, layout, rank_args)
        log(f"epoch {epoch}: launching {config.nproc_per_node} rank(s) on node {layout.node_rank}")
        returncode, forwarded = _run_forwarding(command, preemption, log)
        if forwarded is not None:
            raise PreemptedError(
                f"training stopped by {forwarded.signal_name} during epoch {epoch}: forwarded to "
                "the ranks, which save the step they are at before stopping (torchrun exited "
                f"{returncode}). Resume from get_latest_valid_checkpoint(save_dir).",
                step=None,
                signal_name=forwarded.signal_name or "preemption request",
                exit_code=forwarded.exit_code,
            )
        refused = refusal_file(result_file)
        if returncode != 0 and refused.exists():
            raise RankRefusal.model_validate_json(refused.read_text()).as_error()
        if returncode != 0 or not result_file.exists():
            raise RankJobFailedError(
                f"epoch {epoch}: the ranks did not all finish (torchrun exited {returncode}); "
                "their output is in the log above. A retry resumes every rank from the newest "
                "committed checkpoint."
            )
        return EpochResult.model_validate_json(result_file.read_text())


def _already_committed(config: TrainConfig, epoch: int) -> EpochResult | None:
    """The "skipped" result when a checkpoint at or past ``epoch``'s end is committed."""
    first, last = config.epoch_steps(epoch)
    latest = get_latest_valid_checkpoint(config.save_dir, storage_options=config.storage_options)
    latest_step = step_from_checkpoint(latest) if latest else 0
    if latest_step < last:
        return None
    return EpochResult(
        epoch=epoch,
        status="skipped",
        checkpoint=join_url(config.save_dir, str(last)),
        first_step=first,
        last_step=last,
        resumed_from_step=latest_step,
    )


def _run_forwarding(
    command: list[str], preemption: PreemptionGuard | None, log: Callable[[str], object]
) -> tuple[int, PreemptionGuard | None]:
    """Run ``command``, each output line to ``log``; SIGTERM it once ``preemption`` fires."""
    job = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        env=_rank_environment(),
        # SIGKILL when this thread ends: it waits for torchrun below, so only with the process.
        preexec_fn=parent_death_preexec(),  # prctl has no spawn-safe form
    )
    assert job.stdout is not None
    stdout = job.stdout

    def forward() -> None:
        for line in stdout:
            log(line.rstrip("\n"))

    reader = threading.Thread(target=forward, name="rank-logs", daemon=True)
    reader.start()
    forwarded: PreemptionGuard | None = None
    try:
        while job.poll() is None:
            if forwarded is None and preemption is not None and preemption.requested:
                forwarded = preemption
                log(f"{preemption.signal_name}: asking the ranks to checkpoint and stop")
                job.send_signal(signal.SIGTERM)
            reader.join(POLL_SECONDS)
    finally:
        if job.poll() is None:  # the launcher itself is failing: take the ranks with it
            job.terminate()
            job.wait()
        reader.join()
    return job.returncode, forwarded


def _rank_environment() -> dict[str, str]:
    """The ranks import this project's packages however the launcher did, and know it (the
    pid their ``torchrun``'s parent must have, see ``training.rank_epoch``)."""
    root = str(Path(__file__).resolve().parent.parent)
    path = os.environ.get("PYTHONPATH", "")
    return {
        **os.environ,
        "PYTHONPATH": f"{root}{os.pathsep}{path}" if path else root,
        "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1"),
        "PYTHONUNBUFFERED": "1",
        LAUNCHER_PID: str(os.getpid()),
    }
