"""The ``tml`` command: the library's ``checkpoints`` commands plus the flows (Prefect).

Prefect is imported only when a flow command runs, so ``tml checkpoints ...`` works without
it. Without a configured ``PREFECT_API_URL``, a flow command starts a private Prefect API server
for its own run (:mod:`flows.local_server`: out of the CLI's process group, dies with the CLI)
instead of Prefect's temporary one; analytics stay off (they would try to reach the internet).
SIGTERM / SIGINT end any command with 128 + signum, without a traceback, in bounded time
(:mod:`flows.signals`); while epochs run, the step in progress is checkpointed first.
With a configured ``PREFECT_API_URL`` whose server does not answer its health check (or is not
a Prefect server), a flow command ends before its flow starts with one line and exit status 4
(:mod:`flows.api_check`); one that stops answering while the flow runs is noticed within
~15 s: training stops at its next step (checkpointed) and the command exits with 4.

Bad input is one line (``error: ...``; under ``--json`` also ``{"error": ..., "exit_code": 2}``
as the only stdout line), never a traceback: options are checked as they are parsed, the model
validators' refusals are made one line (:func:`flows.cli_params.build_model`), and what the
flow would refuse is checked before it starts (``check_run_start``, partition names, the
writer lock). A refusal that still comes from inside the flow (a race) is logged by Prefect
without its traceback (:class:`_NoRefusalTracebacks`).

Start-up is a sequence of stages (``start``, ``server``, ``imports``, ``parse``, ``checks``,
``prefect``, ``flow``). A stop signal never starts the next one: each stage begins by checking
:func:`flows.signals.stopping_exit_code`, because a handler's exception can be swallowed on its
way up (raised inside code that catches everything, or in a destructor); and while modules
import, a signal is only noted (:func:`_signals_deferred`): an exception raised inside an
import can abort the interpreter ("Fatal Python error") or come out wrapped in another error.
``TML_REPORT_STAGES=1`` prints ``tml-stage: NAME`` on stderr as each stage begins (tests and
wrappers use it to know what a signal interrupted).
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import logging
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator, Sequence
from types import FrameType
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

# Only the standard library and the small modules below at import time: main() installs
# the signal handlers before the heavy imports (torch, Prefect) start.
from flows.api_check import (
    EXIT_PREFECT_API,
    ApiWatch,
    PrefectApiUnreachableError,
    api_down_during_run,
    not_a_prefect_api,
    require_reachable_api,
)
from flows.local_server import (
    LocalPrefectServer,
    LocalServerError,
    ensure_prefect_api,
    start_unless_api_in_environment,
)
from flows.signals import (
    TERMINATING_SIGNALS,
    exit_on_signals,
    exiting,
    is_signal_exit_code,
    stopping_exit_code,
)
from tml_checkpointing.cli.exit_codes import EXIT_BAD_INPUT, EXIT_SAVE_DIR_LOCKED

if TYPE_CHECKING:
    from rich.console import Console

    from training.config import TrainConfig

PREFECT_DEFAULTS = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "90",
    # A call to an API that has gone away fails after ~6 s (retried after 2 s and 4 s), not
    # ~62 s (5 retries): Prefect's calls between epochs and its final state report held a
    # run whose API had died for ~150 s. A transient 503 (SQLite busy) is still retried.
    "PREFECT_CLIENT_MAX_RETRIES": "2",
    # An API that stops answering without closing connections (a network partition).
    "PREFECT_API_REQUEST_TIMEOUT": "30",
}

STAGE_ENV = "TML_REPORT_STAGES"

FLOW_COMMANDS = frozenset({"train", "evaluate", "retrain"})
# What a flow command imports, loaded at once while signals are only noted (_signals_deferred).
_PRELOAD = {
    "train": ("flows.train", "training.start", "training.session"),
    "evaluate": ("flows.evaluate", "training.evaluation"),
    "retrain": ("flows.retrain",),
}
_server: LocalPrefectServer | None = None  # this run's private Prefect API server, if any
_prefect_prepared = False
_as_process = False  # main() runs as the console script (not called in-process by a test)
_as_json = False
_watch: ApiWatch | None = None  # watches an API the user named while a flow runs
_reported = threading.Lock()  # the final error line is printed once (main or the watch)

Result = TypeVar("Result")


# -- start-up stages and signals -------------------------------------------------------------


def _stop_if_signalled() -> None:
    """End here (``SystemExit(128 + signum)``) if a stop signal came, whatever happened to
    the exception its handler raised (swallowed by code that catches everything, or noted
    only while modules imported)."""
    code = stopping_exit_code()
    if code is not None:
        raise SystemExit(code)


def _stage(name: str) -> None:
    """A start-up stage begins: never after a stop signal; reported under TML_REPORT_STAGES."""
    _stop_if_signalled()
    if os.environ.get(STAGE_ENV) == "1":
        os.write(2, f"tml-stage: {name}\n".encode())


@contextlib.contextmanager
def _signals_deferred() -> Iterator[None]:
    """While modules import: a stop signal is noted (the exit deadline of flows.signals starts,
    and the usual line is printed), not raised inside the import; the process stops right
    after it. A second signal still ends the process at once."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous: dict[signal.Signals, Any] = {}

    def note(signum: int, frame: FrameType | None) -> None:
        handler = previous.get(signal.Signals(signum))
        if stopping_exit_code() is not None and callable(handler):
            handler(signum, frame)  # already stopping: flows.signals exits at once
            return
        exiting(128 + signum)
        name = signal.Signals(signum).name
        os.write(2, f"tml: {name} received: stopping (exit code {128 + signum})\n".encode())

    for sig in TERMINATING_SIGNALS:
        previous[sig] = signal.signal(sig, note)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler if handler is not None else signal.SIG_DFL)
    _stop_if_signalled()


def _preload(argv: Sequence[str]) -> None:
    """Import what the command needs, module by module with signals deferred (see the module
    docstring): a stop signal ends the process after the module importing when it came."""
    modules = ["tml_checkpointing.cli"]
    if _is_flow_command(argv):
        modules += ["torch", "prefect", "flows.cli_params", *_PRELOAD[_command(argv) or ""]]
    for module in modules:
        with _signals_deferred():
            importlib.import_module(module)


# -- Prefect ------------------------------------------------------------------------------------


def _apply_prefect_defaults() -> None:
    for key, value in PREFECT_DEFAULTS.items():
        os.environ.setdefault(key, value)


def _command(argv: Sequence[str]) -> str | None:
    return next((arg for arg in argv if not arg.startswith("-")), None)


def _is_flow_command(argv: Sequence[str]) -> bool:
    return _command(argv) in FLOW_COMMANDS and not {"-h", "--help"} & set(argv)


def _start_prefect_early(argv: Sequence[str]) -> None:
    """A flow command without PREFECT_API_URL in the environment: start the private server
    before anything heavy is imported, so that its start overlaps the CLI's imports."""
    global _server
    if _is_flow_command(argv):
        _apply_prefect_defaults()
        if not os.environ.get("PREFECT_API_URL"):
            _stage("server")
        _server = start_unless_api_in_environment()


def _prepare_prefect_environment() -> None:
    """Prefect defaults; the private API server unless Prefect's settings name an API (one
    started early is kept or stopped); :func:`_prefect_ready` waits for it."""
    global _server, _prefect_prepared
    _apply_prefect_defaults()
    if not _prefect_prepared:
        _stop_if_signalled()  # may start a server
        _server = ensure_prefect_api(_server)
        _prefect_prepared = True


def _prefect_ready() -> None:
    """Call right before the flow, after the command's own input checks (bad input is exit 2
    whatever the API's state): wait for the private server if this run has one, else check
    that the API the user named answers its health check as a Prefect server does, so that
    an unreachable one ends the command in one line before anything is written
    (:class:`PrefectApiUnreachableError`, made one line by :func:`main`) instead of after
    Prefect's retries, in a traceback."""
    _stage("prefect")
    if _server is not None:
        _server.wait_until_ready()
    else:
        require_reachable_api()


class _NoRefusalTracebacks(logging.Filter):
    """Prefect's engine logs a failed task or flow with its traceback ("Encountered exception
    during execution"); for the project's own refusals (a :class:`CheckpointError`, a
    parameter model's ``ValidationError``) the message says it all, and ``tml`` reports it
    in one line anyway: the log record keeps the message, without the traceback."""

    def filter(self, record: logging.LogRecord) -> bool:
        error = record.exc_info[1] if record.exc_info else None
        if error is not None and _is_refusal(error):
            record.exc_info = None
            record.exc_text = None
        return True


def _is_refusal(error: BaseException) -> bool:
    from pydantic import ValidationError

    from tml_checkpointing.errors import CheckpointError

    return isinstance(error, CheckpointError | ValidationError)


def _quiet_refusals() -> None:
    for name in ("prefect.flow_runs", "prefect.task_runs"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoRefusalTracebacks) for f in logger.filters):
            logger.addFilter(_NoRefusalTracebacks())


def _stop_training() -> bool:
    """For :class:`ApiWatch`: if epochs are running (a ``PreemptionGuard`` holds SIGTERM), ask
    them to stop as SIGTERM would (the step in progress is checkpointed) and return True."""
    from tml_checkpointing.lifecycle.preemption import PreemptionGuard

    handler = signal.getsignal(signal.SIGTERM)
    guard = getattr(handler, "__self__", None)
    if not isinstance(guard, PreemptionGuard):
        return False
    if not guard.requested and callable(handler):
        handler(int(signal.SIGTERM), None)
    return True


def _gone_api_exit(message: str) -> int:
    """Report that the API the user named has gone (once), and end with exit 4: at once when
    running as the console script (Prefect's teardown would only retry against the dead API;
    the flow has unwound, so the writer lock is released and the checkpoints are committed)."""
    with _reported:
        code = _fail_in_one_line(_as_json, message, EXIT_PREFECT_API)
        if _as_process:
            _hard_exit(code)
    return code


def _hard_exit(code: int) -> NoReturn:
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):
            stream.flush()
    os._exit(code)


def _run_flow(call: Callable[[], Result]) -> Result:
    """Start the flow (the last start-up stage): refusals logged without tracebacks, and an
    API the user named watched while it runs (the console script only: giving up ends the
    process)."""
    global _watch
    _stage("flow")
    _quiet_refusals()
    if _as_process and _server is None:
        _watch = ApiWatch.for_configured_api(stop_training=_stop_training, give_up=_gone_api_exit)
    try:
        return call()
    finally:
        if _watch is not None:
            _watch.stop()


def _console() -> Console:
    from rich.console import Console

    return Console()


# -- the flow commands --------------------------------------------------------------------------


def _refuse_if_locked(config: TrainConfig) -> None:
    """Another live run writing into ``save_dir`` refuses this one before its flow starts:
    take the writer lock and give it back at once (the flow takes it for the run). Raises
    :class:`~tml_checkpointing.errors.SaveDirLockedError`, naming the holder."""
    from tml_checkpointing.storage.locking import WriterLock

    lock = WriterLock(
        config.save_dir, owner="tml train (start-up check)", storage_options=config.storage_options
    )
    lock.acquire()
    lock.release()


def _train(args: argparse.Namespace) -> int:
    _prepare_prefect_environment()
    from flows.cli_params import build_model
    from flows.train import train
    from training.config import TrainConfig, TrainOptions
    from training.session import close_session
    from training.start import check_run_start

    config = build_model(args, TrainConfig)
    options = build_model(args, TrainOptions)
    # A start that cannot work fails here, in a second, before Prefect starts (the flow checks
    # again, for runs started from deployments). Nothing is written either way. Building the
    # config as the flow does makes it find the same in-process session (model) it trains.
    _stage("checks")
    options.check(config)
    try:
        check_run_start(config, allow_changed_config=options.allow_changed_config)
        _prefect_ready()
        if options.node_rank == 0:  # node 0's flow takes the lock; the others lend ranks
            _refuse_if_locked(config)
    except BaseException:
        close_session(config)
        raise
    result = _run_flow(lambda: train(config, options))
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
    from flows.cli_params import build_model
    from flows.evaluate import evaluate
    from training.config import check_partition_name
    from training.evaluation import EvalConfig, EvalParams, await_run

    config = build_model(args, EvalConfig)
    params = build_model(args, EvalParams)
    _stage("checks")
    check_partition_name(config.partition)
    if not config.wait_for_run:  # a missing save_dir fails at once, before Prefect starts
        await_run(config)
    _prefect_ready()
    summary = _run_flow(lambda: evaluate(config.save_dir, params, experiment=config.experiment))
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
    from flows.cli_params import build_model
    from flows.retrain import retrain
    from training.config import RunParams

    run = build_model(args, RunParams)
    _stage("checks")
    _prefect_ready()
    lineage = _run_flow(
        lambda: retrain(
            runs_dir=args.runs_dir,
            run=run,
            eval_partitions=args.partition,
            run_name=args.run_name,
        )
    )
    if args.json:
        print(lineage.model_dump_json(), flush=True)
    else:
        _console().print(
            f"[bold green]done[/]: {lineage.run_dir} (warm start: "
            f"{lineage.warm_start_checkpoint or 'none'}) -> {lineage.final_checkpoint}"
        )
    return 0


def _flow_errors(
    handler: Callable[[argparse.Namespace], int],
) -> Callable[[argparse.Namespace], int]:
    """Exit codes of what a flow command's flow raises, beyond the library's table: another
    live run holding the save_dir is 5; a preempted run ends as its signal asked."""

    def run(args: argparse.Namespace) -> int:
        from tml_checkpointing.errors import PreemptedError, SaveDirLockedError

        try:
            return handler(args)
        except SaveDirLockedError as error:
            return _fail_in_one_line(args.json, str(error), EXIT_SAVE_DIR_LOCKED)
        except PreemptedError as error:
            if _watch is not None and _watch.gone is not None:
                raise  # the watch stopped it: main reports the API, exit 4
            # Raised by the flow once the step in progress is committed (its warning is in
            # the log): 128 + signum, as a signal asks, never the "bad input" of an error.
            raise SystemExit(error.exit_code) from None

    return run


# -- options --------------------------------------------------------------------------------


def _recipe_imports(recipe: object) -> None:
    """The recipe is imported while parsing, so a typo, or something that imports but is no
    recipe builder, fails before anything starts or is written."""
    from recipes.base import RecipeError, load_recipe

    with _signals_deferred():  # the recipe's modules import (torchrec: seconds)
        try:
            load_recipe(str(recipe))
        except RecipeError as error:
            raise argparse.ArgumentTypeError(str(error)) from None


def _partition_name(name: object) -> None:
    from tml_checkpointing.errors import InvalidPartitionNameError
    from training.config import check_partition_name

    try:
        check_partition_name(str(name))
    except InvalidPartitionNameError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def _partition_argument(text: str) -> str:
    _partition_name(text)
    return text


def _flow_parser_class() -> type[argparse.ArgumentParser]:
    """The library's parser, but its errors are one line (the usage is 20 lines long for
    ``train``): ``error: tml train: argument ...``, under ``--json`` also the JSON object."""
    from tml_checkpointing.cli.common import Parser

    class FlowParser(Parser):
        def error(self, message: str) -> NoReturn:
            text = f"{self.prog}: {message} (`{self.prog} --help` lists the options)"
            _fail_in_one_line(Parser.json_errors, text, EXIT_BAD_INPUT)
            self.exit(EXIT_BAD_INPUT)

    return FlowParser


def add_flow_commands(parser: argparse.ArgumentParser) -> None:
    from flows.cli_params import add_model_options
    from training.config import RunParams, TrainConfig, TrainOptions
    from training.evaluation import EvalConfig

    commands = next(
        action for action in parser._actions if isinstance(action, argparse._SubParsersAction)
    )
    library_parser_class = commands._parser_class
    commands._parser_class = _flow_parser_class()  # for the three parsers added here
    try:
        checks = {"recipe": _recipe_imports, "wait_for_evaluators": _partition_name}
        train = commands.add_parser("train", help="run the training flow (resumes automatically)")
        # Every option but --json comes from the run's parameter models (training/config.py).
        add_model_options(train, TrainConfig, TrainOptions, checks=checks)
        train.add_argument("--json", action="store_true", help="last stdout line is a JSON summary")
        train.set_defaults(handler=_flow_errors(_train))

        evaluate = commands.add_parser(
            "evaluate", help="follow a run and evaluate each new checkpoint once"
        )
        add_model_options(evaluate, EvalConfig)  # training/evaluation.py
        evaluate.add_argument("--json", action="store_true")
        evaluate.set_defaults(handler=_flow_errors(_evaluate))

        retrain = commands.add_parser("retrain", help="a new dated run, warm-started from the last")
        retrain.add_argument("--runs-dir", required=True, help="one sub-directory per run")
        retrain.add_argument(
            "--partition",
            action="append",
            default=None,
            type=_partition_argument,
            help="repeatable",
        )
        retrain.add_argument("--run-name", default=None, help="default: UTC date-time")
        retrain.add_argument("--json", action="store_true")
        # The new run's parameters, as for `tml train` (the flow picks save_dir, warm start).
        add_model_options(retrain, RunParams, checks=checks)
        retrain.set_defaults(handler=_flow_errors(_retrain))
    finally:
        commands._parser_class = library_parser_class


def _fail_in_one_line(as_json: bool, message: str, code: int) -> int:
    """As ``tml checkpoints`` errors are reported: ``error: ...`` on stderr, and under
    ``--json`` also ``{"error": ..., "exit_code": ...}`` as the only stdout line."""
    if as_json:
        print(json.dumps({"error": message, "exit_code": code}), flush=True)
    print(f"error: {message}", file=sys.stderr, flush=True)
    return code


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``tml``. SIGTERM/SIGINT end it with 128 + signum in bounded time (flows.signals)."""
    global _as_process, _as_json, _watch
    restore_signals = exit_on_signals()  # first, before the heavy imports
    _watch = None
    _as_process = argv is None  # the console script, not a caller in this process (tests)
    argv = list(sys.argv[1:] if argv is None else argv)
    _as_json = "--json" in argv
    try:
        _stage("start")
        _start_prefect_early(argv)
        _stage("imports")
        _preload(argv)
        from tml_checkpointing.cli import main as tml_main

        _stage("parse")
        return tml_main(argv, extend=add_flow_commands)
    except SystemExit as stop:  # a signal's SignalExit, or a preempted run's 128 + signum
        if _watch is not None and _watch.gone is not None:  # the watch stopped training
            return _gone_api_exit(_watch.gone)
        if isinstance(stop.code, int) and is_signal_exit_code(stop.code):
            exiting(stop.code)
        raise
    except LocalServerError as error:
        print(f"error: {error}", file=sys.stderr, flush=True)
        return 1
    except PrefectApiUnreachableError as error:
        return _fail_in_one_line(_as_json, str(error), error.exit_code)
    except Exception as error:
        signalled = stopping_exit_code()
        if signalled is not None:  # the handler's SignalExit, wrapped on its way up
            raise SystemExit(signalled) from None
        if _watch is not None and _watch.gone is not None:
            return _gone_api_exit(_watch.gone)
        # A flow failed against an API the user named: if that server has stopped answering
        # since the check before the flow, say so (Prefect's own report is ~100 lines of
        # connection tracebacks) and exit as if it had been down from the start.
        named_api = _is_flow_command(argv) and _prefect_prepared and _server is None
        problem = not_a_prefect_api(error) if named_api else None
        if problem is not None:
            return _fail_in_one_line(_as_json, problem, EXIT_PREFECT_API)
        stopped = api_down_during_run() if named_api else None
        if stopped is None:
            if _as_json:  # stdout stays JSON, whatever failed (the traceback goes to stderr)
                message = f"unexpected {type(error).__name__}: {error}"
                print(json.dumps({"error": " ".join(message.split()), "exit_code": 1}))
            raise
        # Prefect's teardown then retries its queued logs and events against the dead API
        # (it held a finished run for minutes): bound it as a signal's exit is bounded. Not
        # when called in-process: the watchdog would end the caller.
        if _as_process:
            exiting(EXIT_PREFECT_API)
        return _fail_in_one_line(_as_json, stopped, EXIT_PREFECT_API)
    finally:
        restore_signals()  # matters only when called in-process (tests, argparse exits)


if __name__ == "__main__":
    sys.exit(main())
