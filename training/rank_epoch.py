"""One rank of one training epoch: the program ``torchrun`` starts when a run has several ranks.

    python -m torch.distributed.run --nproc-per-node N ... -m training.rank_epoch \\
        --config CONFIG.json --epoch E --config-from-step S --result RESULT.json

Every rank runs :func:`training.loop.train_epoch` on its part of the model (TorchRec shards the
tables over the ranks, the dense part is data-parallel). The loop is the one-process loop: the
decisions that must be common are collective there (:mod:`training.collective`: the resume
point comes from rank 0, a signal on any rank stops all ranks at the same step) and the
checkpoint is one collective torchsnapshot take whose marker and sidecar rank 0 commits.

Collectives time out after :data:`COLLECTIVE_TIMEOUT`, so a rank that died (or a machine that
vanished) fails the others within a minute instead of hanging the epoch; ``torchrun`` itself
stops the rest of the job as soon as one local rank exits non-zero. Every line a rank prints
carries ``[rank R]``, so the launcher can forward all ranks' output into one log.
The local rank 0 of each node writes the epoch's result (rank 0's loss and timing on node 0).

A rank dies with its ``torchrun``: SIGKILL (``PR_SET_PDEATHSIG``, armed first thing in
:func:`main`; see :mod:`tml_checkpointing.writing.parent_death`). ``torchrun`` stops its ranks
itself when it can, but it starts each in a session of its own: a SIGKILL of the launcher's
process group killed ``torchrun`` and missed the ranks, which then trained on for nobody.

Before a rank restores a checkpoint it checks that the checkpoint fits its part of the model
(the flow process, which never builds the model, cannot). A checkpoint that does not fit
stops every rank with ``CheckpointShapeMismatchError`` before anything is restored; the local
rank 0 writes it to ``--refusal`` for the launcher, which raises it unretried, and the ranks
exit :data:`EXIT_REFUSED`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import warnings
from collections.abc import Sequence
from datetime import timedelta
from pathlib import Path
from typing import TextIO

# Only what arming the death signal needs is imported with the module: torch, the recipe and
# the library are imported by main() afterwards (seconds, tens of seconds on a loaded machine,
# which a rank whose torchrun died must not spend first).
from tml_checkpointing.writing.parent_death import die_with_parent

COLLECTIVE_TIMEOUT = timedelta(seconds=30)
EXIT_REFUSED = 2  # the checkpoint does not fit: as `tml train` exits for it
LAUNCHER_PID = "TML_LAUNCHER_PID"
"""Environment variable, set by the launcher (``training.launch``): its pid, which this rank's
parent (``torchrun``) must have as parent. A rank whose ``torchrun`` died before the death
signal was armed has another parent by then, and ends at once."""

logger = logging.getLogger("training.rank_epoch")


class _PrefixedLines:
    """A text stream that starts every line with ``prefix`` (for stdout/stderr of a rank).

    Whole lines only, each in one write: the ranks share the launcher's pipe, and a prefix
    written apart from its text would interleave with another rank's line.
    """

    def __init__(self, inner: TextIO, prefix: str) -> None:
        self._inner = inner
        self._prefix = prefix
        self._partial = ""

    def write(self, text: str) -> int:
        *lines, self._partial = (self._partial + text).split("\n")
        if lines:
            self._inner.write("".join(f"{self._prefix}{line}\n" for line in lines))
            self._inner.flush()
        return len(text)

    def flush(self) -> None:
        if self._partial:
            self.write("\n")
        self._inner.flush()

    def __getattr__(self, name: str) -> object:
        return getattr(self._inner, name)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m training.rank_epoch")
    parser.add_argument("--config", type=Path, required=True, help="TrainConfig as JSON")
    parser.add_argument("--epoch", type=int, required=True)
    parser.add_argument("--config-from-step", type=int, default=1)
    parser.add_argument("--attempt", type=int, default=1, help="of the epoch's task")
    parser.add_argument("--result", type=Path, required=True, help="written by local rank 0")
    parser.add_argument(
        "--refusal", type=Path, default=None, help="written by local rank 0 on a refusal"
    )
    args = parser.parse_args(argv)
    launcher = os.environ.get(LAUNCHER_PID)  # absent: torchrun run by hand, nothing to check
    die_with_parent(grandparent=int(launcher) if launcher else None)  # torchrun's death: ours
    import torch
    import torch.distributed as dist

    from tml_checkpointing.errors import CheckpointShapeMismatchError, PreemptedError
    from tml_checkpointing.lifecycle.preemption import PreemptionGuard

    from .config import TrainConfig
    from .determinism import set_deterministic
    from .launch import RankRefusal
    from .loop import train_epoch
    from .session import TrainingSession

    rank = int(os.environ["RANK"])
    sys.stdout = _PrefixedLines(sys.stdout, f"[rank {rank}] ")
    sys.stderr = _PrefixedLines(sys.stderr, f"[rank {rank}] ")
    logging.basicConfig(  # libraries' chatter (fbgemm, torchsnapshot) at WARNING, ours at INFO
        level=logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
        force=True,
    )
    for ours in ("training", "tml_checkpointing"):
        logging.getLogger(ours).setLevel(logging.INFO)
    _quiet_library_deprecations()
    config = TrainConfig.model_validate_json(args.config.read_text())
    backend = os.environ.get("TML_DIST_BACKEND") or (
        "nccl" if torch.cuda.is_available() else "gloo"
    )
    dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT)
    set_deterministic()
    try:
        with PreemptionGuard() as guard:
            session = TrainingSession(config)
            session.config_from_step = args.config_from_step
            session.attempt = args.attempt
            session.preemption = guard
            try:
                result = train_epoch(session, args.epoch, log=logger.info)
            finally:
                session.close()
    except PreemptedError as preempted:
        logger.warning("%s", preempted)
        return preempted.exit_code
    except CheckpointShapeMismatchError as refused:  # every rank: agreed before restoring
        logger.error("%s", refused)
        if args.refusal is not None and int(os.environ.get("LOCAL_RANK", "0")) == 0:
            RankRefusal.of(refused).write(args.refusal)
        return EXIT_REFUSED
    finally:
        dist.destroy_process_group()
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        partial = args.result.with_suffix(".partial")
        partial.write_text(result.model_dump_json())
        partial.replace(args.result)
    return 0


def _quiet_library_deprecations() -> None:
    """TorchRec 1.8 on torch 2.13 warns about its own deprecated calls on every rank and every
    epoch; none of it is actionable for a user, and it would bury the training log."""
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch(rec)?\.")
    warnings.filterwarnings("ignore", category=DeprecationWarning, module=r"torch(rec)?\.")
    logging.getLogger("torch.fx._symbolic_trace").setLevel(logging.ERROR)


if __name__ == "__main__":
    sys.exit(main())
