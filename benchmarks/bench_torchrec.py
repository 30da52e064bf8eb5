"""Save/restore throughput of a sharded TorchRec state: 2 ranks against 1 rank, and against DCP.

What is measured: one ``EmbeddingBagCollection`` of ``--tables`` tables (``--table-rows`` x
``--dim`` float32 each) wrapped in TorchRec ``DistributedModelParallel`` with a row-wise plan
over all ranks and fused ``RowWiseAdagrad`` (``apply_optimizer_in_backward``), plus a small dense
``Linear`` with Adam, combined in a ``CombinedOptimizer`` -- the layout of the-algorithm-ml. One
training step runs first so that optimizer state exists. The SAME total state is measured with
1 rank and with 2 ranks (gloo, CPU), so the 2-rank/1-rank ratio says how the save and restore
scale when the shards are split.

Per repeat, each timed between barriers (the time is the slowest rank's):

* ``tml save``: ``Snapshot(save_dir, state).save(step).wait()`` (the library fsyncs and rank 0
  commits), a fresh step each repeat;
* ``tml restore``: ``Snapshot.restore`` of that checkpoint into the same state, default
  ``verify="full"`` (every byte hashed against the integrity sidecar);
* ``DCP save``: ``torch.distributed.checkpoint.save`` of ``{"model": dmp.state_dict(),
  "optimizer": opt.state_dict()}``, then an fsync of the written files by rank 0 so it is as
  durable as ``tml save``;
* ``DCP load``: ``torch.distributed.checkpoint.load`` into that state dict in place, then
  ``load_state_dict`` on model and optimizer (what ``tml restore`` does too).

When both 1 and 2 ranks are measured, the 2-rank job keeps its last checkpoints and a third
job restores them on 1 rank (``tml restore`` and ``DCP load``, 2 ranks -> 1: every shard read,
another plan), checking the sharded tensors' sum against the saving job's.

If DCP cannot handle the TorchRec optimizer state, DCP is measured on the model alone and the
output says so (``dcp_scope``). Throughput is total state bytes (every rank's local shards plus
the replicated dense part once) over the median seconds.

Run (about 2-3 minutes with the defaults on a 2-core machine)::

    .venv/bin/python benchmarks/bench_torchrec.py --table-rows 200000 --dim 64 --tables 4 \\
        --repeat 3 [--json]

The script is its own rank program: the driver starts ``torch.distributed.run`` with
``--worker`` for 1 and for 2 ranks and reads the JSON that rank 0 writes.

Caveats: restores read a checkpoint that was just written, from a warm page cache (dropping
caches needs root), so they measure CPU/memory work more than the disk. With 2 ranks on a
2-core machine the ranks compete for the same cores (and the machine may be shared), so a
2-rank/1-rank ratio near 1 means "no gain from splitting on this box", not "does not scale".
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
OPS = ("tml save", "tml restore", "DCP save", "DCP load")


# -- rank program ------------------------------------------------------------------------------


def worker(args: argparse.Namespace) -> None:
    """One rank: build the sharded state, time every operation, rank 0 writes the result."""
    import torch
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed._shard.sharded_tensor import ShardedTensor
    from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
    from torchrec.distributed import DistributedModelParallel
    from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
    from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
    from torchrec.distributed.types import ShardingEnv, ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
    from torchrec.optim.rowwise_adagrad import RowWiseAdagrad

    from tml_checkpointing import Snapshot

    warnings.filterwarnings("ignore", category=UserWarning)  # DCP/ShardedTensor deprecations
    dist.init_process_group("gloo", timeout=datetime.timedelta(seconds=60))
    rank, world = dist.get_rank(), dist.get_world_size()
    names = [f"t{i}" for i in range(args.tables)]
    features = [f"f{i}" for i in range(args.tables)]

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.ebc = EmbeddingBagCollection(
                tables=[
                    EmbeddingBagConfig(
                        name=name,
                        feature_names=[feature],
                        num_embeddings=args.table_rows,
                        embedding_dim=args.dim,
                    )
                    for name, feature in zip(names, features, strict=True)
                ],
                device=torch.device("meta"),  # materialised shard by shard by DMP
            )
            self.dense = torch.nn.Linear(args.tables * args.dim, 1)

        def forward(self, kjt: KeyedJaggedTensor) -> torch.Tensor:
            return self.dense(self.ebc(kjt).values())

    torch.manual_seed(0)
    model = Model()
    apply_optimizer_in_backward(RowWiseAdagrad, model.ebc.parameters(), {"lr": 0.1})
    plan = construct_module_sharding_plan(
        model.ebc,
        {name: row_wise() for name in names},
        sharder=EmbeddingBagCollectionSharder(),
        local_size=world,
        world_size=world,
        device_type="cpu",
    )
    dmp = DistributedModelParallel(
        model,
        env=ShardingEnv.from_process_group(dist.group.WORLD),
        device=torch.device("cpu"),
        plan=ShardingPlan({"ebc": plan}),
        sharders=[EmbeddingBagCollectionSharder()],
    )
    dense = KeyedOptimizerWrapper(
        {name: p for name, p in dmp.named_parameters() if "dense" in name},
        lambda params: torch.optim.Adam(params, lr=0.01),
    )
    opt = CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", dense)])

    # One training step so that Adagrad and Adam state exist.
    generator = torch.Generator().manual_seed(rank)
    batch_size = 8
    lengths = torch.randint(1, 4, (args.tables * batch_size,), generator=generator)
    ids = torch.randint(0, args.table_rows, (int(lengths.sum()),), generator=generator)
    kjt = KeyedJaggedTensor.from_lengths_sync(keys=features, values=ids, lengths=lengths)
    opt.zero_grad()
    dmp(kjt).pow(2).mean().backward()
    opt.step()

    def tensor_bytes(value: Any) -> int:
        """Local bytes: a rank's shards of sharded tensors; replicated tensors on rank 0 only."""
        if isinstance(value, dict):
            return sum(tensor_bytes(item) for item in value.values())
        if isinstance(value, list | tuple):
            return sum(tensor_bytes(item) for item in value)
        if isinstance(value, ShardedTensor):
            return sum(s.tensor.numel() * s.tensor.element_size() for s in value.local_shards())
        if isinstance(value, torch.Tensor) and rank == 0:
            return value.numel() * value.element_size()
        return 0

    total = torch.tensor(
        [tensor_bytes(dmp.state_dict()), tensor_bytes(opt.state_dict())], dtype=torch.int64
    )
    dist.all_reduce(total)
    model_bytes, optimizer_bytes = (int(v) for v in total)
    state_bytes = model_bytes + optimizer_bytes

    work = Path(args.dir)
    state = {"model": dmp, "optimizer": opt}

    def timed(action: Callable[..., object], *action_args: Any) -> float:
        dist.barrier()
        started = time.perf_counter()
        action(*action_args)
        dist.barrier()
        elapsed = torch.tensor([time.perf_counter() - started], dtype=torch.float64)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
        return float(elapsed)

    def dcp_state(scope: str) -> dict[str, Any]:
        if scope == "model":
            return {"model": dmp.state_dict()}
        return {"model": dmp.state_dict(), "optimizer": opt.state_dict()}

    def dcp_save(path: Path, scope: str) -> None:
        dcp.save(dcp_state(scope), checkpoint_id=str(path))
        dist.barrier()  # every rank's file is written before rank 0 syncs the tree
        if rank == 0:
            for root, _, files in os.walk(path):
                for name in files:
                    fd = os.open(os.path.join(root, name), os.O_RDONLY)
                    os.fsync(fd)
                    os.close(fd)

    def dcp_load(path: Path, scope: str) -> None:
        loaded = dcp_state(scope)
        dcp.load(loaded, checkpoint_id=str(path))
        dmp.load_state_dict(loaded["model"])
        if "optimizer" in loaded:
            opt.load_state_dict(loaded["optimizer"])

    # Can DCP take the whole state (TorchRec ShardedTensor optimizer state included)?
    scope, scope_error = "model+optimizer", ""
    probe = work / "dcp-probe"
    try:
        dcp_save(probe, scope)
        dcp_load(probe, scope)
        ok = torch.tensor([1])
    except Exception as error:  # any failure: "model only", reported
        scope_error = f"{type(error).__name__}: {str(error)[:300]}"
        ok = torch.tensor([0])
    dist.all_reduce(ok, op=dist.ReduceOp.MIN)
    if not int(ok):
        scope = "model"
        scope_error = scope_error or "failed on another rank"
    dist.barrier()
    if rank == 0:
        shutil.rmtree(probe, ignore_errors=True)
    dist.barrier()

    def disk_bytes(path: Path) -> int:
        return sum(
            os.path.getsize(os.path.join(root, name))
            for root, _, files in os.walk(path)
            for name in files
        )

    def local_tensors(scope: str) -> list[torch.Tensor]:
        """This rank's floating-point tensors of the state (shards, dense, optimizer)."""
        found: list[torch.Tensor] = []

        def walk(value: Any) -> None:
            if isinstance(value, dict):
                for item in value.values():
                    walk(item)
            elif isinstance(value, list | tuple):
                for item in value:
                    walk(item)
            elif isinstance(value, ShardedTensor):
                found.extend(s.tensor for s in value.local_shards())
            elif isinstance(value, torch.Tensor) and value.is_floating_point():
                found.append(value)

        walk(dcp_state(scope))
        return [t for t in found if t.is_floating_point() and t.numel() > 1]

    def fingerprint(scope: str) -> float:
        total = torch.tensor(
            [sum(float(t.double().sum()) for t in local_tensors(scope))], dtype=torch.float64
        )
        dist.all_reduce(total)
        return float(total)

    def scramble(scope: str) -> None:
        """Untimed: overwrite the state so a restore that reads nothing cannot pass."""
        with torch.no_grad():
            for tensor in local_tensors(scope):
                tensor.fill_(0.5)

    def tml_save(step: int) -> None:
        Snapshot(str(save_dir), state).save(step).wait()

    def tml_restore(checkpoint: str) -> None:
        Snapshot(str(save_dir), state).restore(checkpoint)

    def close(a: float, b: float) -> bool:
        return abs(a - b) <= 1e-6 * max(1.0, abs(a), abs(b))

    def sharded_fingerprint(scope: str) -> float:
        """Sum of every sharded tensor's elements over all ranks: the same for any world size."""
        local: list[torch.Tensor] = []

        def walk(value: Any) -> None:
            if isinstance(value, dict):
                for item in value.values():
                    walk(item)
            elif isinstance(value, ShardedTensor):
                local.extend(s.tensor for s in value.local_shards())

        walk(dcp_state(scope))
        total = torch.tensor([sum(float(t.double().sum()) for t in local)], dtype=torch.float64)
        dist.all_reduce(total)
        return float(total)

    if args.restore_from:  # another job's checkpoints, restored on this world size
        kept = Path(args.restore_from)
        expected = json.loads(args.expect)
        tml_checkpoint = next(p for p in (kept / "tml").iterdir() if p.is_dir())
        reshard_times: dict[str, list[float]] = {"tml restore": [], "DCP load": []}
        reshard_ok = {"tml restore": True, "DCP load": True}
        for _ in range(args.repeat):
            scramble("model+optimizer")
            reshard_times["tml restore"].append(
                timed(lambda: Snapshot(str(kept / "tml"), state).restore(str(tml_checkpoint)))
            )
            reshard_ok["tml restore"] &= close(
                sharded_fingerprint("model+optimizer"), expected["model+optimizer"]
            )
            scramble(scope)
            reshard_times["DCP load"].append(timed(dcp_load, kept / "dcp", scope))
            reshard_ok["DCP load"] &= close(sharded_fingerprint(scope), expected[scope])
        if rank == 0:
            result = {
                "ranks": world,
                "state_bytes": state_bytes,
                "dcp_scope": scope,
                "restored_ok": reshard_ok,
                "times": reshard_times,
            }
            Path(args.out).write_text(json.dumps(result))
        dist.barrier()
        dist.destroy_process_group()
        return

    times: dict[str, list[float]] = {op: [] for op in OPS}
    restored_ok = {"tml restore": True, "DCP load": True}
    scramble_effective = True
    on_disk: dict[str, int] = {}
    save_dir = work / "tml"
    for repeat in range(args.repeat):
        step = repeat + 1
        checkpoint = str(save_dir / str(step))
        dcp_dir = work / f"dcp-{step}"
        full, partial = fingerprint("model+optimizer"), fingerprint(scope)
        times["tml save"].append(timed(tml_save, step))
        scramble("model+optimizer")
        scramble_effective &= not close(fingerprint("model+optimizer"), full)
        times["tml restore"].append(timed(tml_restore, checkpoint))
        restored_ok["tml restore"] &= close(fingerprint("model+optimizer"), full)
        times["DCP save"].append(timed(dcp_save, dcp_dir, scope))
        scramble(scope)
        times["DCP load"].append(timed(dcp_load, dcp_dir, scope))
        restored_ok["DCP load"] &= close(fingerprint(scope), partial)
        if rank == 0:
            on_disk = {"tml": disk_bytes(Path(checkpoint)), "DCP": disk_bytes(dcp_dir)}
            if args.keep and repeat == args.repeat - 1:  # for a job on another world size
                (Path(args.keep) / "tml").mkdir(parents=True)
                os.rename(checkpoint, Path(args.keep) / "tml" / str(step))
                os.rename(dcp_dir, Path(args.keep) / "dcp")
            # Keep the disk footprint to one checkpoint of each kind.
            shutil.rmtree(checkpoint, ignore_errors=True)
            shutil.rmtree(dcp_dir, ignore_errors=True)
        dist.barrier()
    # A collective per name, in the same order on every rank (a set's order is per process).
    fingerprints = {
        name: sharded_fingerprint(name) for name in dict.fromkeys(["model+optimizer", scope])
    }

    if rank == 0:
        result = {
            "ranks": world,
            "state_bytes": state_bytes,
            "model_bytes": model_bytes,
            "optimizer_bytes": optimizer_bytes,
            "on_disk_bytes": on_disk,
            "dcp_scope": scope,
            "dcp_scope_error": scope_error,
            "restored_ok": restored_ok,
            "scramble_effective": scramble_effective,
            "times": times,
            "sharded_fingerprint": fingerprints,
        }
        Path(args.out).write_text(json.dumps(result))
    dist.barrier()
    dist.destroy_process_group()


# -- driver ------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def run_job(
    ranks: int, args: argparse.Namespace, work: Path, extra: list[str] | None = None
) -> dict[str, Any]:
    """Start one torchrun job of ``ranks`` ranks and return rank 0's result (``extra``:
    more worker arguments; the job's name is its rank count and ``extra``'s first word)."""
    name = f"{ranks}{extra[0] if extra else ''}"
    out = work / f"result-{name}.json"
    job_dir = work / f"job-{name}"
    job_dir.mkdir()
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        str(ranks),
        "--master-addr",
        "127.0.0.1",
        "--master-port",
        str(free_port()),
        str(Path(__file__).resolve()),
        "--worker",
        "--out",
        str(out),
        "--dir",
        str(job_dir),
        "--table-rows",
        str(args.table_rows),
        "--dim",
        str(args.dim),
        "--tables",
        str(args.tables),
        "--repeat",
        str(args.repeat),
        *(extra or []),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    started = time.perf_counter()
    proc = subprocess.run(command, env=env, capture_output=True, text=True, timeout=args.timeout)
    if proc.returncode != 0:
        sys.stderr.write(proc.stdout[-4000:] + proc.stderr[-8000:])
        raise SystemExit(f"{ranks}-rank job failed with exit status {proc.returncode}")
    result: dict[str, Any] = json.loads(out.read_text())
    result["job_seconds"] = round(time.perf_counter() - started, 1)
    shutil.rmtree(job_dir, ignore_errors=True)
    return result


def summarise(
    results: dict[int, dict[str, Any]],
    args: argparse.Namespace,
    reshard: dict[str, Any] | None = None,
) -> dict[str, Any]:
    per_ranks: dict[str, Any] = {}
    medians: dict[int, dict[str, float]] = {}
    for ranks, result in results.items():
        gb = result["state_bytes"] / 1e9
        medians[ranks] = {op: statistics.median(result["times"][op]) for op in OPS}
        per_ranks[str(ranks)] = {
            "state_gb": round(gb, 4),
            "on_disk_gb": {k: round(v / 1e9, 4) for k, v in result["on_disk_bytes"].items()},
            "dcp_scope": result["dcp_scope"],
            "dcp_scope_error": result["dcp_scope_error"],
            "restored_ok": result["restored_ok"],
            "scramble_effective": result["scramble_effective"],
            "seconds": {op: round(s, 3) for op, s in medians[ranks].items()},
            "gb_per_s": {op: round(gb / s, 3) for op, s in medians[ranks].items()},
            "all_seconds": {op: [round(s, 3) for s in result["times"][op]] for op in OPS},
            "job_seconds": result["job_seconds"],
        }
    report: dict[str, Any] = {
        "config": {
            "tables": args.tables,
            "table_rows": args.table_rows,
            "dim": args.dim,
            "repeat": args.repeat,
            "sharding": "row-wise over all ranks",
            "optimizers": "fused RowWiseAdagrad (tables) + Adam (dense)",
            "backend": "gloo, CPU, OMP_NUM_THREADS=1",
            "cpu_count": os.cpu_count(),
        },
        "page_cache": "warm (restores read a just-written checkpoint; no root to drop caches)",
        "statistic": "median over repeats; time of the slowest rank, between barriers",
        "ranks": per_ranks,
    }
    if 1 in medians and 2 in medians:
        report["time_ratio_2_over_1"] = {
            op: round(medians[2][op] / medians[1][op], 2) for op in OPS
        }
        report["time_ratio_tml_over_dcp"] = {
            str(ranks): {
                "save": round(m["tml save"] / m["DCP save"], 2),
                "restore": round(m["tml restore"] / m["DCP load"], 2),
            }
            for ranks, m in medians.items()
        }
    if reshard is not None:
        seconds = {op: statistics.median(t) for op, t in reshard["times"].items()}
        report["restore_2_to_1"] = {
            "dcp_scope": reshard["dcp_scope"],
            "restored_ok": reshard["restored_ok"],
            "seconds": {op: round(t, 3) for op, t in seconds.items()},
            "all_seconds": {op: [round(t, 3) for t in ts] for op, ts in reshard["times"].items()},
            "time_ratio_tml_over_dcp": round(seconds["tml restore"] / seconds["DCP load"], 2),
        }
    return report


def print_table(report: dict[str, Any]) -> None:
    try:
        from rich.console import Console
        from rich.table import Table
    except ImportError:  # plain text when rich is missing
        Console = Table = None

    per_ranks = report["ranks"]
    ranks = sorted(per_ranks, key=int)
    ratio = report.get("time_ratio_2_over_1", {})
    header = (
        ["operation"] + [f"{r} rank(s) s" for r in ranks] + [f"{r} rank(s) GB/s" for r in ranks]
    )
    header += ["time 2/1"] if ratio else []
    rows = []
    for op in OPS:
        row = [op]
        row += [f"{per_ranks[r]['seconds'][op]:.3f}" for r in ranks]
        row += [f"{per_ranks[r]['gb_per_s'][op]:.3f}" for r in ranks]
        row += [f"{ratio[op]:.2f}x"] if ratio else []
        rows.append(row)
    first = per_ranks[ranks[0]]
    title = (
        f"TorchRec DMP state {first['state_gb']:.3f} GB ({report['config']['tables']} tables x "
        f"{report['config']['table_rows']} x {report['config']['dim']}, row-wise), median of "
        f"{report['config']['repeat']}, {report['page_cache'].split(' (')[0]} page cache"
    )
    if Table is not None:
        table = Table(title=title)
        for name in header:
            table.add_column(name, justify="left" if name == "operation" else "right")
        for row in rows:
            table.add_row(*row)
        Console().print(table)
    else:
        print(title)
        print("  ".join(f"{h:>16}" for h in header))
        for row in rows:
            print("  ".join(f"{c:>16}" for c in row))
    for r in ranks:
        info = per_ranks[r]
        print(
            f"{r} rank(s): on disk {info['on_disk_gb']}, DCP scope: {info['dcp_scope']}"
            + (f" ({info['dcp_scope_error']})" if info["dcp_scope_error"] else "")
            + f", restored state checked: {info['restored_ok']}"
            + f", job {info['job_seconds']} s"
        )
    for r, pair in report.get("time_ratio_tml_over_dcp", {}).items():
        print(
            f"{r} rank(s): tml/DCP time: save {pair['save']:.2f}x, restore {pair['restore']:.2f}x"
        )
    if "restore_2_to_1" in report:
        reshard = report["restore_2_to_1"]
        print(
            f"2 ranks -> 1: tml restore {reshard['seconds']['tml restore']:.3f} s, DCP load "
            f"{reshard['seconds']['DCP load']:.3f} s ({reshard['dcp_scope']}): tml/DCP time "
            f"{reshard['time_ratio_tml_over_dcp']:.2f}x, restored state checked: "
            f"{reshard['restored_ok']}"
        )
    print(f"{report['config']['cpu_count']} CPU cores: 2 ranks share them (ratios are this box's).")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--table-rows", type=int, default=200_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--tables", type=int, default=4)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--ranks", default="1,2", help="world sizes to measure, comma-separated")
    parser.add_argument("--dir", default=None, help="where to write (default: a temp dir)")
    parser.add_argument("--timeout", type=float, default=900, help="seconds per torchrun job")
    parser.add_argument("--json", action="store_true", help="print one JSON object to stdout")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--out", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--keep", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--restore-from", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--expect", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return

    work = Path(tempfile.mkdtemp(prefix="tml-bench-torchrec-", dir=args.dir))
    world_sizes = [int(n) for n in args.ranks.split(",")]
    reshard = None
    try:
        kept = work / "kept"
        results = {
            n: run_job(n, args, work, ["--keep", str(kept)] if n == 2 and 1 in world_sizes else [])
            for n in world_sizes
        }
        if kept.exists():  # the 2-rank checkpoints, restored on 1 rank
            expect = json.dumps(results[2]["sharded_fingerprint"])
            reshard = run_job(1, args, work, ["--restore-from", str(kept), "--expect", expect])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    report = summarise(results, args, reshard)
    if args.json:
        print(json.dumps(report))
    else:
        print_table(report)


if __name__ == "__main__":
    main()
