"""The ``tml`` command: the library's ``checkpoints`` commands plus the flows (Prefect).

Prefect is imported only when a flow command runs, so ``tml checkpoints ...`` works without
it. Without a configured ``PREFECT_API_URL``, a flow command starts a private Prefect API server
for its own run (:mod:`flows.local_server`: out of the CLI's process group, dies with the CLI)
instead of Prefect's temporary one; analytics stay off (they would try to reach the internet).
SIGTERM / SIGINT end any command with 128 + signum, without a traceback, in bounded time
(:mod:`flows.signals`); while epochs run, the step in progress is checkpointed first.
With a configured ``PREFECT_API_URL`` whose server does not answer its health check, a flow
command ends before its flow starts with one line and exit status 4 (:mod:`flows.api_check`).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

# Only the standard library and the small modules below at import time: main() installs
# the signal handlers before the heavy imports (torch, Prefect) start.
from flows.api_check import (
    EXIT_PREFECT_API,
    PrefectApiUnreachableError,
    api_down_during_run,
    require_reachable_api,
)
from flows.local_server import (
    LocalPrefectServer,
    LocalServerError,
    ensure_prefect_api,
    start_unless_api_in_environment,
)
from flows.signals import exit_on_signals, exiting, is_signal_exit_code

if TYPE_CHECKING:
    from rich.console import Console

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
}


FLOW_COMMANDS = frozenset({"train", "evaluate", "retrain"})
_server: LocalPrefectServer | None = None  # this run's private Prefect API server, if any
_prefect_prepared = False


def _apply_prefect_defaults() -> None:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _is_flow_command(argv: Sequence[str]) -> bool:
    command = next((arg for arg in argv if not arg.startswith("-")), None)
    return command in FLOW_COMMANDS and not {"-h", "--help"} & set(argv)


def _start_prefect_early(argv: Sequence[str]) -> None:
    """A flow command without PREFECT_API_URL in the environment: start the private server
    before anything heavy is imported, so that its start overlaps the CLI's imports."""
    global _server
    if _is_flow_command(argv):
        _apply_prefect_defaults()
        _server = start_unless_api_in_environment()


def _prepare_prefect_environment() -> None:
    """Prefect defaults; the private API server unless Prefect's settings name an API (one
    started early is kept or stopped); :func:`_prefect_ready` waits for it."""
    global _server, _prefect_prepared
    _apply_prefect_defaults()
    if not _prefect_prepared:
        _server = ensure_prefect_api(_server)
        _prefect_prepared = True


def _prefect_ready() -> None:
    """Call right before the flow, after the command's own input checks (bad input is exit 2
    whatever the API's state): wait for the private server if this run has one, else check
    that the API the user named answers its health check, so that an unreachable one ends
    the command in one line before anything is written (:class:`PrefectApiUnreachableError`,
    made one line by :func:`main`) instead of after Prefect's retries, in a traceback."""
    if _server is not None:
        _server.wait_until_ready()
    else:
        require_reachable_api()


def _console() -> Console:
    from rich.console import Console

    return Console()


def _train(args: argparse.Namespace) -> int:
    _prepare_prefect_environment()
    from flows.train import FLOW_ONLY_PARAMETERS, train, train_config
    from training.launch import NodeLayout
    from training.session import close_session
    from training.start import check_run_start

    params: dict[str, Any] = dict(
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
        incremental=args.incremental,
        allow_changed_config=args.allow_changed_config,
        nproc_per_node=args.nproc_per_node,
        nnodes=args.nnodes,
        node_rank=args.node_rank,
        rdzv_endpoint=args.rdzv_endpoint,
    )
    # Not given: the flow's defaults (not imported here, see the imports above).
    for name in ("full_every", "incremental_min_bytes"):
        if getattr(args, name) is not None:
            params[name] = getattr(args, name)
    # A start that cannot work fails here, in a second, before Prefect starts (the flow checks
    # again, for runs started from deployments). Nothing is written either way.
    config = train_config(**{k: v for k, v in params.items() if k not in FLOW_ONLY_PARAMETERS})
    NodeLayout(node_rank=args.node_rank, rdzv_endpoint=args.rdzv_endpoint).check(config)
    try:
        check_run_start(config, allow_changed_config=args.allow_changed_config)
        _prefect_ready()
    except BaseException:
        close_session(config)
        raise
    result = train(**params)
    if args.json:
        summary = result.model_dump(exclude={"epochs"})
        print(json.dumps(summary), flush=True)
    else:
        _console().print(
            f"[bold green]done[/]: step {result.final_step} -> {result.checkpoint} "
            f"(trained epochs {result.epochs_run or 'none'}, "
            f"skipped {result.epochs_skipped or 'none'})"
        )
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    _prepare_prefect_environment()
    from flows.evaluate import evaluate
    from training.evaluation import EvalConfig, await_run

    if not args.wait_for_run:  # a missing save_dir fails at once, before Prefect starts
        await_run(EvalConfig(save_dir=args.save_dir, partition=args.partition))
    _prefect_ready()
    summary = evaluate(
        save_dir=args.save_dir,
        partition=args.partition,
        eval_steps=args.eval_steps,
        timeout=args.timeout,
        poll_seconds=args.poll_seconds,
        wait_for_run=args.wait_for_run,
    )
    if args.json:
        print(json.dumps(summary.model_dump(exclude={"results"})), flush=True)
    else:
        _console().print(
            f"[bold green]done[/]: evaluated steps {summary.evaluated or 'none'} on "
            f"{summary.partition} (already done: {summary.skipped or 'none'}; "
            f"final checkpoint reached: {summary.reached_final})"
        )
    return 0


def _retrain(args: argparse.Namespace) -> int:
    _prepare_prefect_environment()
    from flows.retrain import retrain

    _prefect_ready()
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
        _console().print(
            f"[bold green]done[/]: {lineage.run_dir} (warm start: "
            f"{lineage.warm_start_checkpoint or 'none'}) -> {lineage.final_checkpoint}"
        )
    return 0


def _positive_float(text: str) -> float:
    """Seconds: > 0 (``inf`` allowed, meaning no limit; ``nan`` is not a number of seconds)."""
    value = float(text)
    if math.isnan(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def _learning_rate(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not math.isfinite(value) or value <= 0:
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text!r}")
    return value


def _recipe(text: str) -> str:
    """The recipe is imported here, so a typo fails before anything starts or is written."""
    from recipes.base import RecipeError, load_recipe

    try:
        load_recipe(text)
    except RecipeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None
    return text


def _non_negative(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def add_flow_commands(parser: argparse.ArgumentParser) -> None:
    from recipes.base import DEFAULT_RECIPE
    from tml_checkpointing.cli import positive_int

    commands = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    train = commands.add_parser("train", help="run the training flow (resumes automatically)")
    train.add_argument("--save-dir", required=True, help="checkpoint directory or fsspec URL")
    train.add_argument("--epochs", type=positive_int, required=True)
    train.add_argument("--steps-per-epoch", type=positive_int, default=20)
    train.add_argument("--batch-size", type=positive_int, default=256)
    train.add_argument("--lr", type=_learning_rate, default=1e-3, help="finite, > 0")
    train.add_argument("--seed", type=int, default=0)
    train.add_argument("--checkpoint-every-steps", type=_non_negative, default=0)
    train.add_argument("--recipe", type=_recipe, default=DEFAULT_RECIPE, help="module:function")
    train.add_argument("--initial-checkpoint", default=None, help="warm start (weights only)")
    train.add_argument("--fail-at-step", type=positive_int, default=None, help="inject a failure")
    train.add_argument(
        "--wait-for-evaluator", action="append", default=None, metavar="PARTITION",
        help="after the final save, wait for this partition's evaluator (repeatable)",
    )  # fmt: skip
    train.add_argument("--evaluator-timeout", type=_positive_float, default=600.0)
    train.add_argument("--keep-last", type=positive_int, default=None, help="retention")
    train.add_argument("--keep-every-steps", type=positive_int, default=None, help="milestones")
    incremental = train.add_argument_group("incremental checkpoints (see docs/incremental.md)")
    incremental.add_argument(
        "--incremental", action="store_true",
        help="large tensors (embedding tables) save only the rows changed since the last save",
    )  # fmt: skip
    incremental.add_argument(
        "--full-every", type=positive_int, default=None,
        help="every N-th save is a full checkpoint that starts a new chain (default 10)",
    )  # fmt: skip
    incremental.add_argument(
        "--incremental-min-bytes", type=positive_int, default=None,
        help="tensors at least this large (bytes) are saved as changed rows (default 1 MiB)",
    )  # fmt: skip
    train.add_argument(
        "--allow-changed-config", action="store_true",
        help="resume with other recipe/seed/batch size/steps per epoch/lr/world size than "
        "run.json records "
        "(recorded there as a new segment); refused otherwise",
    )  # fmt: skip
    ranks = train.add_argument_group("ranks and machines (torchrun; see docs/scaling.md)")
    ranks.add_argument("--nproc-per-node", type=positive_int, default=1, help="ranks here")
    ranks.add_argument("--nnodes", type=positive_int, default=1, help="machines in the job")
    ranks.add_argument("--node-rank", type=int, default=0, help="this machine, 0 = commits")
    ranks.add_argument("--rdzv-endpoint", default=None, help="host:port of node 0 (nnodes > 1)")
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
    evaluate.add_argument(
        "--wait-for-run", action="store_true",
        help="wait (up to --timeout) for SAVE_DIR to appear instead of failing when it is missing",
    )  # fmt: skip
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


def _fail_in_one_line(as_json: bool, message: str, code: int) -> int:
    """As ``tml checkpoints`` errors are reported: ``error: ...`` on stderr, and under
    ``--json`` also ``{"error": ..., "exit_code": ...}`` as the only stdout line."""
    if as_json:
        print(json.dumps({"error": message, "exit_code": code}), flush=True)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tml``. SIGTERM/SIGINT end it with 128 + signum in bounded time (flows.signals)."""
    restore_signals = exit_on_signals()  # first, before the heavy imports
    as_process = argv is None  # the console script, not a caller in this process (tests)
    argv = list(sys.argv[1:] if argv is None else argv)
    _start_prefect_early(argv)
    from tml_checkpointing.cli import main as tml_main

    try:
        return tml_main(argv, extend=add_flow_commands)
    except SystemExit as stop:  # a signal's SignalExit, or a preempted run's 128 + signum
        if isinstance(stop.code, int) and is_signal_exit_code(stop.code):
            exiting(stop.code)
        raise
    except LocalServerError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except PrefectApiUnreachableError as error:
        return _fail_in_one_line("--json" in argv, str(error), error.exit_code)
    except Exception:
        # A flow failed against an API the user named: if that server has stopped answering
        # since the check before the flow, say so (Prefect's own report is ~100 lines of
        # connection tracebacks) and exit as if it had been down from the start.
        named_api = _is_flow_command(argv) and _prefect_prepared and _server is None
        stopped = api_down_during_run() if named_api else None
        if stopped is None:
            raise
        # Prefect's teardown then retries its queued logs and events against the dead API
        # (it held a finished run for minutes): bound it as a signal's exit is bounded. Not
        # when called in-process: the watchdog would end the caller.
        if as_process:
            exiting(EXIT_PREFECT_API)
        return _fail_in_one_line("--json" in argv, stopped, EXIT_PREFECT_API)
    finally:
        restore_signals()  # matters only when called in-process (tests, argparse exits)


if __name__ == "__main__":
    sys.exit(main())
