"""The ``tml`` command: the library's ``checkpoints`` commands plus ``train`` (Prefect).

Prefect is imported only when a flow command runs, so ``tml checkpoints ...`` works without
it. Without ``PREFECT_API_URL``, Prefect starts its temporary local server; we turn off its
analytics (it would try to reach the internet) and give it time to start on small machines.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence

from rich.console import Console

from tml_checkpointing.cli import build_parser
from tml_checkpointing.errors import CheckpointError

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


def _prepare_prefect_environment() -> None:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _train(args: argparse.Namespace) -> int:
    _prepare_prefect_environment()
    from flows.train import train

    result = train(
        save_dir=args.save_dir,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        checkpoint_every_steps=args.checkpoint_every_steps,
        recipe=args.recipe,
        initial_checkpoint=args.initial_checkpoint,
        fail_at_step=args.fail_at_step,
    )
    if args.json:
        summary = result.model_dump(exclude={"epochs"})
        print(json.dumps(summary), flush=True)
    else:
        Console().print(
            f"[bold green]done[/]: step {result.final_step} -> {result.checkpoint} "
            f"(trained epochs {result.epochs_run or 'none'}, "
            f"skipped {result.epochs_skipped or 'none'})"
        )
    return 0


def _positive(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_flow_commands(parser: argparse.ArgumentParser) -> None:
    from recipes.base import DEFAULT_RECIPE

    commands = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    train = commands.add_parser("train", help="run the training flow (resumes automatically)")
    train.add_argument("--save-dir", required=True, help="checkpoint directory or fsspec URL")
    train.add_argument("--epochs", type=_positive, required=True)
    train.add_argument("--steps-per-epoch", type=_positive, default=20)
    train.add_argument("--batch-size", type=_positive, default=256)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every-steps", type=_non_negative, default=0)
    train.add_argument("--recipe", default=DEFAULT_RECIPE, help="module:function")
    train.add_argument("--initial-checkpoint", default=None, help="warm start (weights only)")
    train.add_argument("--fail-at-step", type=_positive, default=None, help="inject a failure")
    train.add_argument("--json", action="store_true", help="last stdout line is a JSON summary")
    train.set_defaults(handler=_train)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    add_flow_commands(parser)
    args = parser.parse_args(argv)
    try:
        return int(args.handler(args))
    except CheckpointError as error:
        Console(stderr=True).print(f"[bold red]error:[/] {error}")
        return 2


if __name__ == "__main__":
    sys.exit(main())
