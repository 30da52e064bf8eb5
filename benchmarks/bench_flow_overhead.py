"""Per-epoch cost of running epochs as Prefect tasks, against the same epochs as plain functions.

Runs the ``train`` flow and the plain loop (``training.loop.train_epoch``) on identical
configs with a short and a long run; the difference of slopes is the per-epoch Prefect
overhead (task run creation, state updates, logs), the difference of intercepts the per-run
overhead (flow run, artifacts). Uses ``PREFECT_API_URL`` if set, else Prefect's temporary
server (started once, before timing).

    .venv/bin/python benchmarks/bench_flow_overhead.py --short 2 --long 12
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import tempfile
import time

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "90")

from flows.train import train
from training.config import TrainConfig
from training.determinism import set_deterministic
from training.loop import train_epoch
from training.session import close_session, get_session

COMMON = {"steps_per_epoch": 5, "batch_size": 64, "seed": 0}


def plain(epochs: int) -> float:
    config = TrainConfig(save_dir=tempfile.mkdtemp(prefix="bench-plain-"), epochs=epochs, **COMMON)
    set_deterministic()
    started = time.perf_counter()
    session = get_session(config)
    for epoch in range(epochs):
        train_epoch(session, epoch)
    close_session(config)
    return time.perf_counter() - started


def with_prefect(epochs: int) -> float:
    save_dir = tempfile.mkdtemp(prefix="bench-flow-")
    started = time.perf_counter()
    train(TrainConfig(save_dir=save_dir, epochs=epochs, **COMMON))
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--short", type=int, default=2)
    parser.add_argument("--long", type=int, default=12)
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    with_prefect(1)  # start the temporary server and warm imports before timing
    plain(1)
    samples: dict[tuple[str, int], list[float]] = {}
    for _ in range(args.repeat):  # interleaved, so background activity hits all alike
        for kind, run in (("plain", plain), ("prefect", with_prefect)):
            for n in (args.short, args.long):
                samples.setdefault((kind, n), []).append(run(n))
    times = {key: statistics.median(values) for key, values in samples.items()}
    span = args.long - args.short
    kinds = ("plain", "prefect")
    slope = {k: (times[(k, args.long)] - times[(k, args.short)]) / span for k in kinds}
    fixed = {k: times[(k, args.short)] - slope[k] * args.short for k in kinds}
    report = {
        "seconds": {f"{k} x{n}": round(v, 3) for (k, n), v in times.items()},
        "per_epoch_ms": {k: round(v * 1000, 1) for k, v in slope.items()},
        "prefect_overhead_per_epoch_ms": round((slope["prefect"] - slope["plain"]) * 1000, 1),
        "prefect_overhead_per_run_s": round(fixed["prefect"] - fixed["plain"], 3),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
