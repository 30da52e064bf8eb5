"""Cost of integrity checking against the save and restore of the same checkpoint, in one run.

Measures, on one state (model + Adam moments, ~``--size-mb``):

* ``tml save`` until committed (includes hashing every buffer with xxh3_64 and the sidecar);
* ``xxh3_64 of the state in memory``: the hashing part of that save, measured alone;
* ``verify size`` (one listing + marker + sidecar), ``verify full`` (reads and hashes every
  byte) with a warm page cache, and again cold when the page cache can be dropped (root);
* ``tml restore`` with ``verify="none"``, ``"size"`` and the default ``"full"`` (sizes up
  front, then every byte hashed as it is read), cold when possible, in rotating order so that
  no level always runs first; the report gives each one's overhead over ``verify="none"``.

    .venv/bin/python benchmarks/bench_verify.py --size-mb 1024 --repeat 3

(from a checkout that is not the installed copy, prefix ``PYTHONPATH=.``).
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import xxhash

sys.path.insert(0, str(Path(__file__).parent))
from bench_save_restore import build_state, drop_caches, state_bytes

from tml_checkpointing import Snapshot, verify_checkpoint


def timed(action: Callable[[], object]) -> float:
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def hash_state(state: dict) -> None:
    for module in state.values():
        for value in module.state_dict().values() if hasattr(module, "state_dict") else []:
            _hash_tree(value)


def _hash_tree(value: object) -> None:
    if isinstance(value, torch.Tensor):
        xxhash.xxh3_64_hexdigest(value.detach().contiguous().numpy().data)
    elif isinstance(value, dict):
        for item in value.values():
            _hash_tree(item)
    elif isinstance(value, list | tuple):
        for item in value:
            _hash_tree(item)


def one_round(
    save_dir: Path, state: dict, size_mb: int, record: Callable[[str, float], None]
) -> None:
    """Save once, then time hashing, verification and restores of that checkpoint."""
    record(
        "tml save (until committed)", timed(lambda: Snapshot(str(save_dir), state).save(1).wait())
    )
    checkpoint = str(save_dir / "1")
    record("xxh3_64 of the state in memory", timed(lambda: hash_state(state)))
    record("verify size", timed(lambda: verify_checkpoint(checkpoint, level="size")))
    record("verify full (warm cache)", timed(lambda: verify_checkpoint(checkpoint, level="full")))
    target = build_state(size_mb)
    cold = drop_caches()
    suffix = " (cold)" if cold else " (warm)"
    levels = ["none", "size", "full"]
    shift = record.rounds % len(levels)  # type: ignore[attr-defined]
    for level in levels[shift:] + levels[:shift]:
        drop_caches()
        record(
            f"tml restore verify={level}{suffix}",
            timed(
                lambda level=level: Snapshot(str(save_dir), target).restore(
                    checkpoint, verify=level
                )
            ),
        )
    # Warm page cache: no disk in the way, so what verification adds shows most plainly.
    for level in levels[shift:] + levels[:shift]:
        record(
            f"tml restore verify={level} (warm)",
            timed(
                lambda level=level: Snapshot(str(save_dir), target).restore(
                    checkpoint, verify=level
                )
            ),
        )
    if cold:
        drop_caches()
        record("verify full (cold)", timed(lambda: verify_checkpoint(checkpoint, level="full")))
    shutil.rmtree(save_dir)


def _baseline(rows: dict[str, float], name: str) -> float:
    """The ``verify=none`` restore measured under the same cache conditions as ``name``."""
    condition = name[name.index(" (") :]
    return rows[f"tml restore verify=none{condition}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=1024)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    state = build_state(args.size_mb)
    gb = state_bytes(state) / 1e9
    work = Path(tempfile.mkdtemp(prefix="tml-bench-verify-", dir=args.dir))
    results: dict[str, list[float]] = {}

    def record(name: str, seconds: float) -> None:
        results.setdefault(name, []).append(seconds)

    record.rounds = 0  # type: ignore[attr-defined]
    try:
        for attempt in range(args.repeat):
            record.rounds = attempt  # type: ignore[attr-defined]
            one_round(work / f"run{attempt}", state, args.size_mb, record)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    rows = {name: statistics.median(times) for name, times in results.items()}
    save = rows["tml save (until committed)"]
    restore = next(v for k, v in rows.items() if k.startswith("tml restore verify=none"))
    report = {
        "state_gb": round(gb, 3),
        "repeat": args.repeat,
        "seconds": {k: round(v, 4) for k, v in rows.items()},
        "relative": {
            k: {"of_save": round(v / save, 4), "of_restore": round(v / restore, 4)}
            for k, v in rows.items()
            if k.startswith(("verify", "xxh3"))
        },
        "restore_overhead_vs_none": {
            k: round(v / _baseline(rows, k) - 1, 4)
            for k, v in rows.items()
            if k.startswith("tml restore")
        },
    }
    if args.json:
        print(json.dumps(report))
        return
    print(f"state: {gb:.3f} GB (model + Adam), median of {args.repeat}")
    print(f"{'what':40} {'seconds':>8} {'GB/s':>7} {'% of save':>10} {'% of restore':>13}")
    for name, seconds in rows.items():
        share = ""
        if name.startswith(("verify", "xxh3")):
            share = f"{100 * seconds / save:9.1f}% {100 * seconds / restore:12.1f}%"
        if name.startswith("tml restore"):
            over = 100 * (seconds / _baseline(rows, name) - 1)
            share = f"{'':10} {over:+11.1f}% (vs verify=none)"
        print(f"{name:40} {seconds:8.3f} {gb / seconds:7.2f} {share}")


if __name__ == "__main__":
    main()
