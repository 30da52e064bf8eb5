"""Screenshots of the real Prefect UI for the README, taken in a real headless browser.

Why: the README shows what a user sees after ``prefect deploy``: the train run's graph and task
list, its artifacts (checkpoint table, loss curve), the runs list with the evaluations the
checkpoint events started, the event feed and the deployment's run form. Pictures drawn by
hand go stale; these are taken from a run of the current code, so rerunning this script after
a change to the flows refreshes them.

What it does, all on loopback and in a temporary directory (nothing of the user's Prefect
profile or database is touched):

1. starts a private ``prefect server`` (free port, its own PREFECT_HOME);
2. creates the ``tml-process`` work pool and runs ``prefect --no-prompt deploy --all`` from the
   repository root, as README "Deploy" tells a user to;
3. starts ``prefect worker start --pool tml-process`` in the background;
4. runs the ``train/train`` deployment into a small ``save_dir`` with an injected failure (so
   the epoch's retry shows), waits through the API until it is final and, for at most
   ``--evaluate-wait`` seconds, until the ``evaluate`` runs for that ``save_dir`` (started by an
   automation on the checkpoint events) are final;
5. opens each page in headless Chromium (Debian's ``/usr/bin/chromium``, driven by Playwright;
   no browser download), waits for its content, and saves a viewport screenshot, reduced to a
   256-colour palette, under ``docs/screenshots/``.

Every process it starts (server, worker, the worker's flow runs) is killed in ``finally``.

Run (about 2-4 minutes)::

    apt-get install -y chromium
    .venv/bin/pip install -e '.[screenshots]'
    .venv/bin/python scripts/ui_screenshots.py

It prints the PNG paths, and exits 1 (listing why) when a page could not be captured or a
run it pictures did not complete (use ``--keep`` to keep the server and worker logs).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

REPO_ROOT = Path(__file__).resolve().parents[1]
POOL = "tml-process"  # the work pool named in prefect.yaml
EXPERIMENT = "ui-demo"  # given to the first run (config.experiment): keys its artifacts
SWEEP_RUN = "ui-demo-lr"  # a second run beside it, another learning rate, name derived
# The run's save_dir appears in the pictures (artifact descriptions, events): a fixed, short
# path keeps them readable and unchanged between reruns. Emptied before and after each run.
DEMO_ROOT = Path(tempfile.gettempdir()) / "tml-screenshots"
CHROMIUM = "/usr/bin/chromium"
VIEWPORT = {"width": 1400, "height": 900}
FINAL_STATES = {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}
TRAIN_PARAMETERS: dict[str, Any] = {
    "epochs": 3,
    "steps_per_epoch": 10,
    "batch_size": 32,
    "checkpoint_every_steps": 5,
    "fail_at_step": 12,  # once: epoch 1 fails and its retry restores step 10
    # The run waits for its evaluations: its own Artifacts tab then shows their metrics too.
    "wait_for_evaluators": ["validation"],
}
SWEEP_PARAMETERS: dict[str, Any] = {  # the second run: the same, another lr, no failure
    **{
        k: v
        for k, v in TRAIN_PARAMETERS.items()
        if k not in ("fail_at_step", "wait_for_evaluators")
    },
    "lr": 0.02,
}
T = TypeVar("T")


# -- processes ----------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Processes:
    """Background processes, each the leader of its own process group, all killed at the end."""

    started: list[subprocess.Popen[bytes]] = field(default_factory=list)

    def start(self, args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
        with log.open("wb") as output:
            process = subprocess.Popen(
                args,
                cwd=REPO_ROOT,
                env=env,
                stdout=output,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # its children (uvicorn, flow runs) share the group
            )
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        """SIGTERM each group (a worker then cancels its flow runs), SIGKILL what is left.

        Descendants are collected first: a child that moved to a session of its own would
        escape the group kill.
        """
        import psutil  # type: ignore[import-untyped]

        descendants: list[psutil.Process] = []
        for process in self.started:
            with contextlib.suppress(psutil.NoSuchProcess):
                descendants += psutil.Process(process.pid).children(recursive=True)
        for process in reversed(self.started):  # the worker before the server it reports to
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGTERM)
        for process in reversed(self.started):
            with contextlib.suppress(subprocess.TimeoutExpired):
                process.wait(timeout=20)
            with contextlib.suppress(ProcessLookupError):
                os.killpg(process.pid, signal.SIGKILL)
            process.wait()
        for child in descendants:
            with contextlib.suppress(psutil.NoSuchProcess):
                child.kill()
        psutil.wait_procs(descendants, timeout=10)


def run_cli(args: list[str], env: dict[str, str], timeout: float = 180) -> str:
    """``prefect ARGS`` from the repository root, as a user runs it; its output, or an error."""
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect", *args],
        cwd=REPO_ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        output = ""
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    if process.returncode != 0:
        raise RuntimeError(f"`prefect {' '.join(args)}` failed ({process.returncode}):\n{output}")
    return output


def poll(read: Callable[[], T], done: Callable[[T], bool], what: str, limit_s: float) -> T:
    """Read until ``done``: another process changes what is read, there is nothing to await."""
    deadline = time.monotonic() + limit_s
    while True:
        value = read()
        if done(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.5)


# -- the server's REST API -----------------------------------------------------------------------


@dataclass
class Api:
    url: str  # http://127.0.0.1:PORT/api

    def call(self, method: str, path: str, body: Any = None, attempts: int = 5) -> Any:
        """One API call; a 503 (SQLite busy under the run's own writes) is tried again after
        a back-off, as Prefect's own client does."""
        data = None if body is None else json.dumps(body).encode()
        for attempt in range(1, attempts + 1):
            request = urllib.request.Request(
                f"{self.url}{path}",
                data=data,
                method=method,
                headers={"Content-Type": "application/json"},
            )
            try:
                with urllib.request.urlopen(request, timeout=30) as response:
                    return json.loads(response.read() or b"null")
            except urllib.error.HTTPError as error:  # the server says what it refused
                detail = error.read().decode(errors="replace")[:2000]
                if error.code == 503 and attempt < attempts:
                    time.sleep(attempt)  # back-off before retrying a busy server, not a wait
                    continue
                raise RuntimeError(f"{method} {path}: HTTP {error.code} {detail}") from error
        raise AssertionError("unreachable")

    def healthy(self) -> bool:
        try:
            return bool(self.call("GET", "/health"))
        except (OSError, ValueError):
            return False

    def flow_run(self, flow_run_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("GET", f"/flow_runs/{flow_run_id}")
        return result

    def flow_runs_of(self, flow_name: str, save_dir: str) -> list[dict[str, Any]]:
        runs = self.call(
            "POST",
            "/flow_runs/filter",
            {"flows": {"name": {"any_": [flow_name]}}, "sort": "START_TIME_DESC", "limit": 200},
        )
        return [r for r in runs if r["parameters"].get("save_dir") == save_dir]

    def latest_artifact_like(self, prefix: str) -> dict[str, Any] | None:
        """The newest artifact whose key starts with ``prefix`` (a derived name's hash)."""
        found = self.call(
            "POST",
            "/artifacts/filter",
            {"artifacts": {"key": {"like_": f"{prefix}%"}}, "sort": "CREATED_DESC", "limit": 1},
        )
        return found[0] if found else None

    def latest_artifact(self, key: str) -> dict[str, Any] | None:
        found = self.call(
            "POST",
            "/artifacts/filter",
            {"artifacts": {"key": {"any_": [key]}}, "sort": "CREATED_DESC", "limit": 1},
        )
        return found[0] if found else None

    def artifact_keys(self, flow_run_id: str) -> list[str]:
        found = self.call(
            "POST", "/artifacts/filter", {"artifacts": {"flow_run_id": {"any_": [flow_run_id]}}}
        )
        return sorted({a["key"] for a in found if a["key"]})

    def committed_checkpoints(self, save_dir: str) -> set[str]:
        """Checkpoints of ``save_dir`` announced by ``tml.checkpoint.committed`` events."""
        page = self.call(
            "POST",
            "/events/filter",
            # One page (the API's largest is 50): a demo run commits a handful.
            {"filter": {"event": {"name": ["tml.checkpoint.committed"]}}, "limit": 50},
        )
        return {
            str(event["resource"]["prefect.resource.id"])
            for event in page["events"]
            if event.get("payload", {}).get("save_dir") == save_dir
        }

    def event_count(self, prefix: str) -> int:
        page = self.call(
            "POST", "/events/filter", {"filter": {"event": {"prefix": [prefix]}}, "limit": 1}
        )
        return int(page["total"])


def state_of(run: dict[str, Any]) -> str:
    return str((run.get("state") or {}).get("type") or "")


# -- the browser ---------------------------------------------------------------------------------


@dataclass
class Shot:
    name: str  # file name without .png
    path: str  # UI path, e.g. /runs/flow-run/<id>
    ready: str  # text that must be visible before the picture is taken
    prepare: Callable[[Any], None] | None = None  # e.g. click a tab; gets the Playwright page
    extra_ready: Callable[[Any], None] | None = None  # more waiting (images decoded...)
    scroll_to: str | None = None  # Playwright selector scrolled into view...
    scroll_block: str = "start"  # ...at the top ("start") or middle ("center") of the viewport
    full_page: bool = False  # the whole page (a list whose length depends on the run)


# The UI scrolls an inner element, not the document, so Playwright's full_page=True captures
# only the viewport: what is hidden is what the page's scrolling elements (those at least
# half the viewport tall, not small widgets) cannot show.
OVERFLOW_JS = """() => Math.max(document.documentElement.scrollHeight - innerHeight,
  ...[...document.querySelectorAll('*')]
    .filter(e => ['auto', 'scroll'].includes(getComputedStyle(e).overflowY)
                 && e.clientHeight >= innerHeight / 2)
    .map(e => e.scrollHeight - e.clientHeight))"""
MAX_HEIGHT = 2400
PAINTED_JS = (  # two animation frames: what was just laid out is painted
    "() => new Promise(r => requestAnimationFrame(() => requestAnimationFrame(() => r(null))))"
)


def save_small_png(raw: bytes, target: Path) -> None:
    """A 256-colour palette PNG: the UI's flat colours survive, the file is ~3x smaller."""
    try:
        from PIL import Image
    except ImportError:
        target.write_bytes(raw)
        return
    with Image.open(io.BytesIO(raw)) as image:
        palette = image.convert("RGB").quantize(colors=256, dither=Image.Dither.NONE)
        palette.save(target, optimize=True)


def take_screenshots(base_url: str, shots: list[Shot], out_dir: Path) -> dict[str, str]:
    """Each shot's PNG under ``out_dir``; returns name -> error for those that failed."""
    from playwright.sync_api import Error as PlaywrightError
    from playwright.sync_api import sync_playwright

    errors: dict[str, str] = {}
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True)
        try:
            context = browser.new_context(
                viewport=VIEWPORT,  # type: ignore[arg-type]
                device_scale_factor=1,
                color_scheme="dark",
                timezone_id="UTC",
            )
            page = context.new_page()
            page.set_default_timeout(30_000)
            for shot in shots:
                try:
                    page.set_viewport_size(VIEWPORT)  # type: ignore[arg-type]
                    page.goto(base_url + shot.path, wait_until="networkidle")
                    if shot.prepare:
                        shot.prepare(page)
                    page.get_by_text(shot.ready).first.wait_for(state="visible")
                    if shot.extra_ready:
                        shot.extra_ready(page)
                    if shot.scroll_to:
                        page.locator(shot.scroll_to).first.evaluate(
                            "(e, block) => e.scrollIntoView({block})", shot.scroll_block
                        )
                    if shot.full_page:
                        fit_height(page)
                    page.wait_for_load_state("networkidle")
                    page.evaluate(PAINTED_JS)
                    target = out_dir / f"{shot.name}.png"
                    save_small_png(page.screenshot(), target)
                    size_kib = target.stat().st_size // 1024
                    print(f"{shown(target)}  ({size_kib} KiB)")
                except PlaywrightError as error:
                    errors[shot.name] = f"{base_url}{shot.path}: {error.message.splitlines()[0]}"
        finally:
            browser.close()
    return errors


def shown(path: Path) -> Path:
    """``path`` relative to the repository when inside it (shorter, what the README links)."""
    return path.relative_to(REPO_ROOT) if path.is_relative_to(REPO_ROOT) else path


def fit_height(page: Any) -> None:
    """Grow the viewport to the content's height; charts resize with it, so until stable."""
    height = VIEWPORT["height"]
    for _ in range(4):
        hidden = int(page.evaluate(OVERFLOW_JS))
        if hidden <= 0 or height >= MAX_HEIGHT:
            return
        height = min(height + hidden + 16, MAX_HEIGHT)
        page.set_viewport_size({"width": VIEWPORT["width"], "height": height})
        page.evaluate(PAINTED_JS)


def click_tab(tab_id: str) -> Callable[[Any], None]:
    """The run page's tabs are ``li.p-tab`` with ids (``?tab=`` in the URL alone is ignored)."""

    def click(page: Any) -> None:
        page.locator(f"li.p-tab#{tab_id}").click()

    return click


def images_decoded(page: Any) -> None:
    """The loss curve is a PNG inlined as a data: URI: wait until the browser decoded it."""
    page.wait_for_function(
        "() => { const imgs = [...document.images].filter(i => i.src.startsWith('data:image/'));"
        " return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0); }"
    )


def table_filled(page: Any) -> None:
    page.locator("table td").first.wait_for(state="visible")


def graph_drawn(page: Any) -> None:
    page.locator("canvas").first.wait_for(state="visible")


# -- main ----------------------------------------------------------------------------------------


@contextlib.contextmanager
def workspace(keep: bool) -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="tml-ui-screenshots-"))
    try:
        yield path
    finally:
        if keep:
            print(f"kept {path} (server and worker logs) and {DEMO_ROOT} (checkpoints)")
        else:
            shutil.rmtree(path, ignore_errors=True)
            shutil.rmtree(DEMO_ROOT, ignore_errors=True)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO_ROOT / "docs" / "screenshots")
    parser.add_argument("--train-timeout", type=float, default=600, help="seconds")
    parser.add_argument(
        "--evaluate-wait",
        type=float,
        default=180,
        help="seconds to wait for the evaluate runs of the train run's save_dir (0: do not)",
    )
    parser.add_argument("--keep", action="store_true", help="keep the temp dir (logs)")
    args = parser.parse_args(argv)
    if not Path(CHROMIUM).exists():
        print(f"{CHROMIUM} not found: apt-get install -y chromium", file=sys.stderr)
        return 2
    started = time.monotonic()
    # SIGTERM (a CI job cancelled, `timeout`) ends like Ctrl-C: through the finally below.
    signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(128 + signum))
    args.out = args.out.resolve()
    args.out.mkdir(parents=True, exist_ok=True)
    processes = Processes()
    with workspace(args.keep) as tmp:
        try:
            return run(args, tmp, processes, started)
        finally:
            processes.stop_all()


def run(args: argparse.Namespace, tmp: Path, processes: Processes, started: float) -> int:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    api = Api(f"{base_url}/api")
    env = {
        key: value
        for key, value in os.environ.items()
        if not key.startswith("PREFECT_") or key == "PREFECT_HOME"
    }
    path = os.environ.get("PYTHONPATH")
    env.update(
        PREFECT_HOME=str(tmp / "prefect-home"),  # a private database and profile
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PYTHONPATH=f"{REPO_ROOT}{os.pathsep}{path}" if path else str(REPO_ROOT),
    )
    server_env = {**env, "PREFECT_UI_API_URL": api.url, "PREFECT_SERVER_UI_ENABLED": "true"}
    client_env = {
        **env,
        "PREFECT_API_URL": api.url,
        "PREFECT_WORKER_QUERY_SECONDS": "2",  # pick up the automation's runs promptly
    }

    print(f"prefect server on {base_url} (logs in {tmp})")
    server = processes.start(
        [
            sys.executable,
            "-m",
            "prefect",
            "server",
            "start",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--analytics-off",
        ],
        server_env,
        tmp / "server.log",
    )
    poll(api.healthy, lambda ok: ok or server.poll() is not None, "server health", 120)
    if not api.healthy():
        raise RuntimeError(f"prefect server not healthy:\n{tail(tmp / 'server.log')}")

    run_cli(["work-pool", "create", POOL, "--type", "process", "--overwrite"], client_env)
    run_cli(["--no-prompt", "deploy", "--all"], client_env)
    worker = processes.start(
        [sys.executable, "-m", "prefect", "worker", "start", "--pool", POOL],
        client_env,
        tmp / "worker.log",
    )

    shutil.rmtree(DEMO_ROOT, ignore_errors=True)
    save_dir = str(DEMO_ROOT / EXPERIMENT)
    sweep_dir = str(DEMO_ROOT / SWEEP_RUN)
    train_deployment = api.call("GET", "/deployments/name/train/train")
    # Two runs at the same time under one root: the comparison artifact puts them side by side.
    # The flow's `config` (training.config.TrainConfig) replaces the deployment's whole; its
    # `options` (epoch_retries) stay the deployment's.
    train_ids = [
        str(
            api.call(
                "POST",
                f"/deployments/{train_deployment['id']}/create_flow_run",
                {"parameters": {"config": config}},
            )["id"]
        )
        for config in (
            {"save_dir": save_dir, "experiment": EXPERIMENT, **TRAIN_PARAMETERS},
            {"save_dir": sweep_dir, **SWEEP_PARAMETERS},
        )
    ]
    train_id = train_ids[0]
    print(f"train runs {train_ids} into {save_dir}, {sweep_dir}")
    train_runs = poll(
        lambda: [api.flow_run(i) for i in train_ids],
        lambda runs: all(state_of(r) in FINAL_STATES for r in runs) or worker.poll() is not None,
        "train runs final",
        args.train_timeout,
    )
    train_run = train_runs[0]
    if any(state_of(r) not in FINAL_STATES for r in train_runs):
        raise RuntimeError(
            f"train runs {[state_of(r) or 'not started' for r in train_runs]} after "
            f"{args.train_timeout}s (worker exit {worker.poll()}):\n{tail(tmp / 'worker.log')}"
        )
    print(f"train runs: {[(r['name'], state_of(r)) for r in train_runs]}")
    # Pictures of failed runs are still taken (to look at), but the script then fails.
    problems: dict[str, str] = {}
    for finished in train_runs:
        if state_of(finished) != "COMPLETED":
            problems[f"train run {finished['name']}"] = f"ended {state_of(finished)}"

    # The automation starts one evaluate run per committed checkpoint; the first evaluates
    # what is pending and follows the run, the others find their checkpoint done. Done when
    # every announced checkpoint has its metrics and every evaluate run is final.
    def evaluations_settled() -> tuple[list[dict[str, Any]], set[str]]:
        runs = api.flow_runs_of("evaluate", save_dir) + api.flow_runs_of("evaluate", sweep_dir)
        committed = api.committed_checkpoints(save_dir) | api.committed_checkpoints(sweep_dir)
        return runs, committed

    evaluations, committed = poll(
        evaluations_settled,
        lambda seen: (
            bool(seen[0])
            and all(state_of(r) in FINAL_STATES for r in seen[0])
            and bool(seen[1])
            and all((Path(c) / "eval" / "validation.json").exists() for c in seen[1])
        ),
        "evaluate runs final",
        args.evaluate_wait,
    )
    states = [state_of(r) or "?" for r in evaluations]
    print(
        f"evaluate runs: {len(evaluations)} {states or '(none seen)'}"
        f" for {len(committed)} committed-checkpoint events"
    )
    for evaluation in evaluations:
        print(f"  {evaluation['name']}: {(evaluation.get('state') or {}).get('message')}")
    if any(state != "COMPLETED" for state in states):
        problems["evaluate runs"] = f"not all completed: {states}"
    busiest = next(
        (
            r
            for r in evaluations
            if r["parameters"].get("save_dir") == save_dir and " steps " in f"{r['name']} "
        ),
        None,
    )

    exp = EXPERIMENT
    keys = api.artifact_keys(train_id)
    print(f"artifacts of the train run: {', '.join(keys) or 'none'}")
    checkpoint_events = api.event_count("tml.checkpoint.")
    events_path = "/events?events=tml.checkpoint.*" if checkpoint_events else "/events"
    print(f"tml.checkpoint.* events: {checkpoint_events}")
    train_form = f"/deployments/deployment/{train_deployment['id']}/run"

    shots = [
        Shot(
            "train-run",
            f"/runs/flow-run/{train_id}",
            f"epoch 1 · {exp}",
            prepare=click_tab("task-runs"),
            extra_ready=graph_drawn,
        ),
        Shot(
            "train-run-logs",
            f"/runs/flow-run/{train_id}",
            "Retry 1/2",  # Prefect's line when the injected failure makes the epoch retry
            prepare=click_tab("logs"),
            scroll_to="text=Retry 1/2",
            scroll_block="center",
        ),
        Shot(
            "train-run-artifacts",
            f"/runs/flow-run/{train_id}",
            f"train-summary-{exp}",
            prepare=click_tab("artifacts"),
            scroll_to="li.p-tab#artifacts",
        ),
        Shot("flow-runs", "/runs", str(train_run["name"]), full_page=True),
        Shot("events", events_path, "tml.checkpoint" if checkpoint_events else "Flow run"),
        Shot("train-run-form", train_form, "Checkpoint directory of the run"),
        Shot("automations", "/automations", "tml: evaluate new checkpoints", full_page=True),
        Shot("concurrency", "/concurrency-limits", "Global", full_page=True),
    ]
    if busiest is not None:
        shots.append(
            Shot(
                "evaluate-run-logs",
                f"/runs/flow-run/{busiest['id']}",
                str(busiest["name"]),
                prepare=click_tab("logs"),
            )
        )
    else:
        problems["evaluate-run-logs"] = "no evaluate run of the first run evaluated anything"
    for name, prefix, extra in (
        ("compare-artifact", "compare-tml-screenshots-", table_filled),
        ("compare-curves-artifact", "compare-curves-tml-screenshots-", images_decoded),
    ):
        artifact = api.latest_artifact_like(prefix)
        if artifact is None:
            problems[name] = f"no artifact with a key starting {prefix!r}"
            continue
        shots.append(
            Shot(name, f"/artifacts/artifact/{artifact['id']}", artifact["key"], None, extra)
        )

    for name, key, ready, extra in (
        ("checkpoints-artifact", f"checkpoints-{exp}", f"checkpoints-{exp}", table_filled),
        ("loss-curve-artifact", f"loss-curve-{exp}", f"loss-curve-{exp}", images_decoded),
    ):
        artifact = api.latest_artifact(key)
        if artifact is None:
            problems[name] = f"no artifact with key {key!r}"
            continue
        shots.append(Shot(name, f"/artifacts/artifact/{artifact['id']}", ready, None, extra))

    problems |= take_screenshots(base_url, shots, args.out)
    for name, why in problems.items():
        print(f"PROBLEM {name}: {why}", file=sys.stderr)
    print(f"done in {time.monotonic() - started:.0f}s")
    return 1 if problems else 0


def tail(log: Path, chars: int = 3000) -> str:
    try:
        return log.read_text(errors="replace")[-chars:]
    except OSError:
        return ""


if __name__ == "__main__":
    sys.exit(main())
