"""The ``tml`` command: the library's ``checkpoints`` commands plus the flows (Prefect).

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

from tml_checkpointing.cli import main as tml_main
from tml_checkpointing.cli import positive_int

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
        wait_for_evaluators=args.wait_for_evaluator,
        evaluator_timeout=args.evaluator_timeout,
        keep_last=args.keep_last,
        keep_every_steps=args.keep_every_steps,
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


def _evaluate(args: argparse.Namespace) -> int:
    _prepare_prefect_environment()
    from flows.evaluate import evaluate

    summary = evaluate(
        save_dir=args.save_dir,
        partition=args.partition,
        eval_steps=args.eval_steps,
        timeout=args.timeout,
        poll_seconds=args.poll_seconds,
    )
    if args.json:
        print(json.dumps(summary.model_dump(exclude={"results"})), flush=True)
    else:
        Console().print(
            f"[bold green]done[/]: evaluated steps {summary.evaluated or 'none'} on "
            f"{summary.partition} (already done: {summary.skipped or 'none'}; "
            f"final checkpoint reached: {summary.reached_final})"
        )
    return 0


def _retrain(args: argparse.Namespace) -> int:
    _prepare_prefect_environment()
    from flows.retrain import retrain

    lineage = retrain(
        runs_dir=args.runs_dir,
        epochs=args.epochs,
        steps_per_epoch=args.steps_per_epoch,
        seed=args.seed,
        eval_partitions=args.partition,
        run_name=args.run_name,
    )
    if args.json:
        print(lineage.model_dump_json(), flush=True)
    else:
        Console().print(
            f"[bold green]done[/]: {lineage.run_dir} (warm start: "
            f"{lineage.warm_start_checkpoint or 'none'}) -> {lineage.final_checkpoint}"
        )
    return 0


def _positive_float(text: str) -> float:
    value = float(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
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
    train.add_argument("--epochs", type=positive_int, required=True)
    train.add_argument("--steps-per-epoch", type=positive_int, default=20)
    train.add_argument("--batch-size", type=positive_int, default=256)
    train.add_argument("--lr", type=float, default=1e-3)
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every-steps", type=_non_negative, default=0)
    train.add_argument("--recipe", default=DEFAULT_RECIPE, help="module:function")
    train.add_argument("--initial-checkpoint", default=None, help="warm start (weights only)")
    train.add_argument("--fail-at-step", type=positive_int, default=None, help="inject a failure")
    train.add_argument(
        "--wait-for-evaluator", action="append", default=None, metavar="PARTITION",
        help="after the final save, wait for this partition's evaluator (repeatable)",
    )  # fmt: skip
    train.add_argument("--evaluator-timeout", type=_positive_float, default=600.0)
    train.add_argument("--keep-last", type=positive_int, default=None, help="retention")
    train.add_argument("--keep-every-steps", type=positive_int, default=None, help="milestones")
    train.add_argument("--json", action="store_true", help="last stdout line is a JSON summary")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate", help="follow a run and evaluate each new checkpoint once"
    )
    evaluate.add_argument("--save-dir", required=True)
    evaluate.add_argument("--partition", default="validation")
    evaluate.add_argument("--eval-steps", type=positive_int, default=10)
    evaluate.add_argument("--timeout", type=_positive_float, default=1800.0)
    evaluate.add_argument("--poll-seconds", type=_positive_float, default=10.0)
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=_evaluate)

    retrain = commands.add_parser("retrain", help="a new dated run, warm-started from the last")
    retrain.add_argument("--runs-dir", required=True)
    retrain.add_argument("--epochs", type=positive_int, default=3)
    retrain.add_argument("--steps-per-epoch", type=positive_int, default=20)
    retrain.add_argument("--seed", type=int, default=0)
    retrain.add_argument("--partition", action="append", default=None, help="repeatable")
    retrain.add_argument("--run-name", default=None, help="default: UTC date-time")
    retrain.add_argument("--json", action="store_true")
    retrain.set_defaults(handler=_retrain)


def main(argv: Sequence[str] | None = None) -> int:
    return tml_main(argv, extend=add_flow_commands)


if __name__ == "__main__":
    sys.exit(main())
