"""How long the first save of a fresh training process takes to commit.

A fresh process imports torch and the library, makes a ``Snapshot`` of a ~64 MiB state
(``writer="auto"``: the writer process), optionally trains for ``--work-s`` seconds, calls
``save(1)`` and waits for the commit. Reported per run: *committed*, seconds from the call
to ``save()`` until ``PendingSave.wait()`` returns (the checkpoint is durable and marked), and
*blocked*, how long ``save()`` itself took. Each run is a new process, because only the first
save of a process pays for starting the writer (its interpreter and imports).

    .venv/bin/python benchmarks/bench_first_save.py --runs 7            # idle machine
    .venv/bin/python benchmarks/bench_first_save.py --runs 7 --busy     # both cores busy

``--busy`` starts two ``yes > /dev/null`` processes for the whole measurement (one per core
of a 2-core machine; always stopped, also on errors and Ctrl-C). To measure another version
of the library with the same script, put its checkout first on the path, e.g.
``git worktree add /tmp/old HEAD`` then ``PYTHONPATH=/tmp/old .venv/bin/python
benchmarks/bench_first_save.py``: the library each run used is printed.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

STATE_SIDE = 4096  # one Linear(4096, 4096): 64 MiB of float32 weights (+16 KiB of bias)


def child(save_dir: str, work_s: float) -> dict[str, Any]:
    """One fresh process's first save (run in the child: ``--child``)."""
    started = time.perf_counter()
    import torch

    import tml_checkpointing
    from tml_checkpointing import Snapshot

    model = torch.nn.Linear(STATE_SIDE, STATE_SIDE)
    snapshot = Snapshot(save_dir, {"model": model})
    created = time.perf_counter()
    if work_s > 0:  # training goes on meanwhile (both cores, as torch uses them)
        x = torch.randn(256, STATE_SIDE)
        deadline = created + work_s
        while time.perf_counter() < deadline:
            model(x).sum().backward()
    called = time.perf_counter()
    pending = snapshot.save(1)
    returned = time.perf_counter()
    path = pending.wait()
    committed = time.perf_counter()
    snapshot.close()
    return {
        "library": os.path.dirname(tml_checkpointing.__file__),
        "path": path,
        "startup_s": created - started,  # imports, the state, Snapshot(...)
        "blocked_s": returned - called,
        "committed_s": committed - called,
    }


@contextmanager
def busy_cores(count: int) -> Iterator[list[subprocess.Popen[bytes]]]:
    """``count`` processes of ``yes > /dev/null``, stopped however the block ends."""
    hogs: list[subprocess.Popen[bytes]] = []
    try:
        for _ in range(count):
            hogs.append(subprocess.Popen(["yes"], stdout=subprocess.DEVNULL))
        yield hogs
    finally:
        for hog in hogs:
            hog.kill()
        for hog in hogs:
            hog.wait()


def run_once(work_s: float) -> dict[str, Any]:
    save_dir = tempfile.mkdtemp(prefix="bench-first-save-")
    try:
        done = subprocess.run(
            [sys.executable, __file__, "--child", save_dir, "--work-s", str(work_s)],
            capture_output=True,
            text=True,
            check=False,
            # Not the repository: ``python -m`` (the writer) puts its working directory first
            # on the path, which would load the checkout there instead of PYTHONPATH's.
            cwd=save_dir,
        )
        if done.returncode != 0:
            raise RuntimeError(f"a run failed (exit {done.returncode}):\n{done.stderr}")
        result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
        return result
    finally:
        shutil.rmtree(save_dir, ignore_errors=True)


def summary(values: list[float]) -> dict[str, float]:
    return {
        "median": statistics.median(values),
        "min": min(values),
        "max": max(values),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5, help="fresh processes to measure")
    parser.add_argument("--work-s", type=float, default=0.0,
                        help="seconds of training between Snapshot(...) and save(1)")  # fmt: skip
    parser.add_argument("--busy", action="store_true",
                        help="two `yes > /dev/null` run during the measurement")  # fmt: skip
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument("--child", metavar="SAVE_DIR", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.work_s)))
        return 0
    with busy_cores(2 if args.busy else 0):
        runs = [run_once(args.work_s) for _ in range(args.runs)]
    report = {
        "library": runs[0]["library"],
        "busy": args.busy,
        "work_s": args.work_s,
        "runs": len(runs),
        "load_average": os.getloadavg(),
        **{key: summary([run[key] for run in runs]) for key in ("committed_s", "blocked_s")},
        "committed_each_s": [round(run["committed_s"], 3) for run in runs],
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    print(f"library {report['library']}  busy={args.busy}  work={args.work_s}s  "
          f"runs={len(runs)}  load={report['load_average'][0]:.1f}")  # fmt: skip
    for key in ("committed_s", "blocked_s"):
        stats = report[key]
        print(f"  {key:12} median {stats['median']:.2f}  min {stats['min']:.2f}  "
              f"max {stats['max']:.2f}")  # fmt: skip
    print(f"  committed each: {report['committed_each_s']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
