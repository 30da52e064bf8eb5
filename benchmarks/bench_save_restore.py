"""Save/restore speed of tml_checkpointing against torch.save, plain torchsnapshot and the disk.

All figures come from one run on the same state, so compare the ratios, not the absolute
numbers (2-core CI-class machines are noisy). Each contender writes a fresh directory;
every write ends durable (fsync) so the comparison is fair to ``torch.save``.

    .venv/bin/python benchmarks/bench_save_restore.py --size-mb 512 --repeat 3
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import shutil
import statistics
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
import torchsnapshot

from tml_checkpointing import Snapshot

# DCP says it assumes one process when no process group exists: that is what we measure.
warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def build_state(size_mb: int) -> dict[str, torch.nn.Module | torch.optim.Optimizer]:
    """A model of ~size_mb/3 parameters plus Adam's two moments: ~size_mb in all."""
    per_layer = 1024 * 1024  # 4 MiB of float32
    layers = max(1, size_mb // 12)
    model = torch.nn.Sequential(*[torch.nn.Linear(1024, 1024, bias=False) for _ in range(layers)])
    optimizer = torch.optim.Adam(model.parameters())
    for param in model.parameters():
        param.grad = torch.ones_like(param)
    optimizer.step()
    del per_layer
    return {"model": model, "optimizer": optimizer}


def state_bytes(state: dict) -> int:
    total = sum(p.numel() * p.element_size() for p in state["model"].parameters())
    for per_param in state["optimizer"].state_dict()["state"].values():
        total += sum(v.numel() * v.element_size() for v in per_param.values() if torch.is_tensor(v))
    return total


def dcp_load(path: Path, target: dict) -> None:
    """DCP loads in place into a state dict, then the objects take it back."""
    state_dicts = {k: v.state_dict() for k, v in target.items()}
    dcp.load(state_dicts, checkpoint_id=str(path), no_dist=True)
    for key, value in target.items():
        value.load_state_dict(state_dicts[key])


def fsync_tree(path: Path) -> None:
    for root, _, files in os.walk(path):
        for name in files:
            fd = os.open(os.path.join(root, name), os.O_RDONLY)
            os.fsync(fd)
            os.close(fd)


def drop_caches() -> bool:
    try:
        with open("/proc/sys/vm/drop_caches", "w") as handle:
            handle.write("3\n")
        return True
    except OSError:
        return False


def timed(action: Callable[[], object]) -> float:
    gc.collect()
    started = time.perf_counter()
    action()
    return time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size-mb", type=int, default=256)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()

    state = build_state(args.size_mb)
    nbytes = state_bytes(state)
    work = Path(tempfile.mkdtemp(prefix="tml-bench-", dir=args.dir))
    blob = os.urandom(nbytes)
    counter = iter(range(1_000_000))

    def fresh(name: str) -> Path:
        return work / f"{name}-{next(counter)}"

    def disk_write() -> None:
        path = fresh("dd")
        with open(path, "wb") as handle:
            handle.write(blob)
            handle.flush()
            os.fsync(handle.fileno())

    def torch_save() -> None:
        path = fresh("torch")
        with open(path, "wb") as handle:
            torch.save({k: v.state_dict() for k, v in state.items()}, handle)
            handle.flush()
            os.fsync(handle.fileno())

    def plain_torchsnapshot() -> None:
        path = fresh("ts")
        torchsnapshot.Snapshot.take(str(path), dict(state))
        fsync_tree(path)  # its fs plugin does not fsync; ours does

    def dcp_save() -> None:
        path = fresh("dcp")
        dcp.save({k: v.state_dict() for k, v in state.items()}, checkpoint_id=str(path),
                 no_dist=True)  # fmt: skip
        fsync_tree(path)  # its writer does not fsync every file either

    def ours() -> None:
        Snapshot(str(fresh("tml")), state).save(1).wait()

    def ours_stall() -> float:
        snapshot = Snapshot(str(fresh("tml")), state)
        started = time.perf_counter()
        pending = snapshot.save(1)
        stall = time.perf_counter() - started
        pending.wait()
        return stall

    results: dict[str, list[float]] = {
        k: []
        for k in (
            "disk write+fsync",
            "torch.save+fsync",
            "torchsnapshot take+fsync",
            "DCP save+fsync",
            "tml save",
            "tml save: training stall",
            "torch.load",
            "torchsnapshot restore",
            "DCP load",
            "tml restore",
        )
    }
    for _ in range(args.repeat):
        results["disk write+fsync"].append(timed(disk_write))
        results["torch.save+fsync"].append(timed(torch_save))
        results["torchsnapshot take+fsync"].append(timed(plain_torchsnapshot))
        results["DCP save+fsync"].append(timed(dcp_save))
        results["tml save"].append(timed(ours))
        results["tml save: training stall"].append(ours_stall())
        shutil.rmtree(work)
        work.mkdir()

    # Restores read what one save wrote; caches dropped first when we may (root).
    torch_file = fresh("torch")
    with open(torch_file, "wb") as handle:
        torch.save({k: v.state_dict() for k, v in state.items()}, handle)
    ts_dir = fresh("ts")
    torchsnapshot.Snapshot.take(str(ts_dir), dict(state))
    dcp_dir = fresh("dcp")
    dcp.save({k: v.state_dict() for k, v in state.items()}, checkpoint_id=str(dcp_dir),
             no_dist=True)  # fmt: skip
    tml_dir = fresh("tml")
    Snapshot(str(tml_dir), state).save(1).wait()
    target = build_state(args.size_mb)
    cold = drop_caches()
    for _ in range(args.repeat):
        drop_caches()
        results["torch.load"].append(
            timed(
                lambda: [
                    target[k].load_state_dict(v)
                    for k, v in torch.load(torch_file, weights_only=True).items()
                ]
            )
        )
        drop_caches()
        results["torchsnapshot restore"].append(
            timed(lambda: torchsnapshot.Snapshot(str(ts_dir)).restore(dict(target)))
        )
        drop_caches()
        results["DCP load"].append(timed(lambda: dcp_load(dcp_dir, target)))
        drop_caches()
        results["tml restore"].append(
            timed(lambda: Snapshot(str(tml_dir), target).restore(str(tml_dir / "1")))
        )
    shutil.rmtree(work, ignore_errors=True)

    gb = nbytes / 1e9
    rows = {name: statistics.median(times) for name, times in results.items()}
    report = {
        "state_gb": round(gb, 3),
        "repeat": args.repeat,
        "cold_cache_restores": cold,
        "seconds": {k: round(v, 3) for k, v in rows.items()},
        "gb_per_s": {k: round(gb / v, 3) for k, v in rows.items() if "stall" not in k},
        "ratios": {
            "tml save / torch.save": round(rows["tml save"] / rows["torch.save+fsync"], 2),
            "tml save / torchsnapshot take": round(
                rows["tml save"] / rows["torchsnapshot take+fsync"], 2
            ),
            "tml save / disk write": round(rows["tml save"] / rows["disk write+fsync"], 2),
            "tml restore / torch.load": round(rows["tml restore"] / rows["torch.load"], 2),
            "tml restore / torchsnapshot restore": round(
                rows["tml restore"] / rows["torchsnapshot restore"], 2
            ),
            "tml save / DCP save": round(rows["tml save"] / rows["DCP save+fsync"], 2),
            "tml restore / DCP load": round(rows["tml restore"] / rows["DCP load"], 2),
        },
    }
    if args.json:
        print(json.dumps(report))
        return
    print(
        f"state: {gb:.3f} GB (model + Adam), median of {args.repeat}, cold-cache restores: {cold}"
    )
    print(f"{'contender':32} {'seconds':>8} {'GB/s':>7}")
    for name, seconds in rows.items():
        rate = "" if "stall" in name else f"{gb / seconds:7.2f}"
        print(f"{name:32} {seconds:8.3f} {rate:>7}")
    print("ratios (time, lower is better):")
    for name, ratio in report["ratios"].items():
        print(f"  {name:40} {ratio:5.2f}x")


if __name__ == "__main__":
    main()
