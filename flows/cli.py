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
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

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
from flows.signals import exit_on_signals, exiting, is_signal_exit_code, stopping_exit_code

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
    from flows.cli_params import model_arguments
    from flows.train import train
    from training.config import TrainConfig, TrainOptions
    from training.session import close_session
    from training.start import check_run_start

    config = TrainConfig(**model_arguments(args, TrainConfig))
    options = TrainOptions(**model_arguments(args, TrainOptions))
    # A start that cannot work fails here, in a second, before Prefect starts (the flow checks
    # again, for runs started from deployments). Nothing is written either way. Building the
    # config as the flow does makes it find the same in-process session (model) it trains.
    options.check(config)
    try:
        check_run_start(config, allow_changed_config=options.allow_changed_config)
        _prefect_ready()
    except BaseException:
        close_session(config)
        raise
    result = train(config, options)
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
    from flows.cli_params import model_arguments
    from flows.evaluate import evaluate
    from training.evaluation import EvalConfig, EvalParams, await_run

    config = EvalConfig(**model_arguments(args, EvalConfig))
    if not config.wait_for_run:  # a missing save_dir fails at once, before Prefect starts
        await_run(config)
    _prefect_ready()
    summary = evaluate(config.save_dir, EvalParams(**model_arguments(args, EvalParams)))
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
    from flows.cli_params import model_arguments
    from flows.retrain import retrain
    from training.config import RunParams

    _prefect_ready()
    lineage = retrain(
        runs_dir=args.runs_dir,
        run=RunParams(**model_arguments(args, RunParams)),
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


def _recipe_imports(recipe: object) -> None:
    """The recipe is imported while parsing, so a typo fails before anything starts or is
    written."""
    from recipes.base import RecipeError, load_recipe

    try:
        load_recipe(str(recipe))
    except RecipeError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def add_flow_commands(parser: argparse.ArgumentParser) -> None:
    from flows.cli_params import add_model_options
    from training.config import RunParams, TrainConfig, TrainOptions
    from training.evaluation import EvalConfig

    commands = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    train = commands.add_parser("train", help="run the training flow (resumes automatically)")
    # Every option but --json comes from the run's parameter models (training/config.py).
    add_model_options(train, TrainConfig, TrainOptions, checks={"recipe": _recipe_imports})
    train.add_argument("--json", action="store_true", help="last stdout line is a JSON summary")
    train.set_defaults(handler=_train)

    evaluate = commands.add_parser(
        "evaluate", help="follow a run and evaluate each new checkpoint once"
    )
    add_model_options(evaluate, EvalConfig)  # training/evaluation.py
    evaluate.add_argument("--json", action="store_true")
    evaluate.set_defaults(handler=_evaluate)

    retrain = commands.add_parser("retrain", help="a new dated run, warm-started from the last")
    retrain.add_argument("--runs-dir", required=True, help="one sub-directory per run")
    retrain.add_argument("--partition", action="append", default=None, help="repeatable")
    retrain.add_argument("--run-name", default=None, help="default: UTC date-time")
    retrain.add_argument("--json", action="store_true")
    # The new run's parameters, as for `tml train` (the flow picks its save_dir and warm start).
    add_model_options(retrain, RunParams, checks={"recipe": _recipe_imports})
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
        signalled = stopping_exit_code()
        if signalled is not None:  # the handler's SignalExit, wrapped on its way up
            raise SystemExit(signalled) from None
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
