"""Our S3 path against plain s3fs, on a local moto S3 server, all in one run.

Why one run against a reference: the only S3 here is moto, a CPU-bound Python server on the
same 2 cores as the client, so its absolute rates say more about moto than about us. What
carries over to real S3 is how close we come to plain s3fs moving the same bytes to the same
server at the same moment (the ratios), and how many HTTP requests each operation makes.

Run::

    .venv/bin/python benchmarks/bench_s3.py --quick        # 64 MiB x2, < 1 min
    .venv/bin/python benchmarks/bench_s3.py --json > benchmarks/results/s3.json  # ~3 min

(with ``--json`` the table goes to stderr, stdout is one JSON object)

The state is ``{"model": StateDict(t0=..., t1=...)}``: float32 tensors of ``--tensor-mib``
each, ``--size-mib`` in all. Per repeat, in this order (time: median [min-max] of
``--repeat``; MiB/s: state size over the median):

* ``s3fs upload``: ``fs.pipe_file(url, data)``, data = the tensors' bytes concatenated, as
  one object, with s3fs's defaults: one PUT below 100 MiB, else a multipart upload of 50 MiB
  parts sent ``max_concurrency`` at a time. The reference for saving.
* ``tml save``: ``Snapshot("s3://bench/run", state).save(step).wait()``, until committed,
  a fresh step each repeat, one ``Snapshot`` for all of them as in training (our writer
  process sends the data file as 8 MiB parts, 8 at a time). The first save (which starts
  the writer process and plans its staging) is timed apart, in the notes, as is the *stall*
  (until ``save()`` returns: staging, the commit check, the save claim) in the JSON.
  *ratio*: its throughput over ``s3fs upload``'s (1.00x = as fast as plain s3fs).
* ``s3fs download``: ``fs.cat_file(url)`` of that object. The reference for restoring.
* ``tml restore``: ``Snapshot.restore(checkpoint)`` (default ``verify="full"``: every byte
  hashed against the integrity sidecar) into the same state, zeroed first; the restored
  tensors are compared with the saved ones. *ratio*: throughput over ``s3fs download``'s.
* ``get_checkpoint`` / ``get_checkpoints``: on a second save_dir holding 2,000 committed
  checkpoints (``<step>/.snapshot_metadata`` non-empty, the commit rule of
  ``tml_checkpointing.format.layout``, plus one small data file each; made with one ``fs.pipe``).
  The issue's target: finding the latest of 2,000 checkpoints in <= 10 requests.

*requests*: HTTP requests moto logged during one operation (its log has one line per request
containing `` HTTP/1.1" ``), median over repeats; for ``tml save`` that includes the writer
process's requests, for the 2,000-checkpoint listings it is the number the target is about.

Caveat on the download ratio: moto answers every ranged GET by reading and copying the
whole object, then slicing it. ``cat_file`` of a large object sends a HEAD and parallel
ranged GETs (6 for 256 MiB), our restore one ranged GET for the whole data file, so on moto
``s3fs download`` pays for the object several times and ``tml restore`` can come out faster;
against real S3 the parallel ranges are the advantage. Likewise moto concatenates multipart
parts in Python at completion. Read the ratios with the request counts next to them.

Only loopback traffic: moto runs as ``python -m moto.server -H 127.0.0.1`` on a free port and
is stopped (terminate, then kill) however the run ends. Clients find it through
``AWS_ENDPOINT_URL`` and the ``testing`` keys in ``os.environ``, as the tests do.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torchsnapshot import StateDict

MIB = 2**20
BUCKET = "bench"
CHECKPOINTS = 2_000
LISTING_TARGET = 10  # requests to find the latest of 2,000 checkpoints (the target)


# -- moto ----------------------------------------------------------------------------------


@dataclass
class Moto:
    """moto's S3 server in its own process; its log has one line per HTTP request."""

    endpoint: str
    log_path: Path
    process: subprocess.Popen[bytes]

    def requests(self) -> int:
        text = self.log_path.read_text(errors="replace")
        return sum(1 for line in text.splitlines() if ' HTTP/1.1" ' in line)

    def stop(self) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def start_moto(work: Path) -> Moto:
    """Start moto on loopback and wait until it answers (a started process is no server)."""
    port = free_port()
    endpoint = f"http://127.0.0.1:{port}"
    log_path = work / "moto.log"
    with log_path.open("wb") as log:
        process = subprocess.Popen(
            [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    moto = Moto(endpoint, log_path, process)
    deadline = time.monotonic() + 60
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"moto exited with {process.returncode}: {log_path.read_text()}")
        try:
            with urllib.request.urlopen(f"{endpoint}/moto-api/", timeout=2):
                return moto
        except OSError:
            if time.monotonic() > deadline:
                moto.stop()
                raise RuntimeError(f"moto at {endpoint} not ready after 60s") from None
            time.sleep(0.1)  # polling a readiness endpoint: there is no event to await


def point_clients_at(endpoint: str) -> None:
    """What the tests do (conftest's ``_S3_ENV``): s3fs, botocore and our writer process
    (started later, it inherits this environment) all find moto from here."""
    os.environ.update(
        AWS_ENDPOINT_URL=endpoint,
        AWS_ACCESS_KEY_ID="testing",
        AWS_SECRET_ACCESS_KEY="testing",
        AWS_DEFAULT_REGION="us-east-1",
    )


# -- state ---------------------------------------------------------------------------------


def build_state(size_mib: int, tensor_mib: int) -> dict[str, Any]:
    """``{"model": StateDict(t0=..., ...)}``: float32 tensors of ``tensor_mib`` each, random
    (so nothing compresses or dedups), ``size_mib`` in all."""
    count = max(1, size_mib // tensor_mib)
    numel = tensor_mib * MIB // 4
    generator = torch.Generator().manual_seed(0)
    tensors = {f"t{i}": torch.randn(numel, generator=generator) for i in range(count)}
    return {"model": StateDict(**tensors)}


def state_tensors(state: dict[str, Any]) -> list[torch.Tensor]:
    return [value for value in state["model"].values() if torch.is_tensor(value)]


def concatenated(state: dict[str, Any]) -> bytes:
    """The reference's payload: exactly the state's tensor bytes, one buffer."""
    return b"".join(t.numpy().tobytes() for t in state_tensors(state))


# -- measuring -----------------------------------------------------------------------------


@dataclass
class Op:
    """One operation's measurements over the repeats."""

    name: str
    seconds: list[float] = field(default_factory=list)
    requests: list[int] = field(default_factory=list)
    note: str = ""


def measured(op: Op, moto: Moto, action: Callable[[], object]) -> object:
    """Run ``action`` once, adding its wall time and moto's request count to ``op``."""
    before = moto.requests()
    started = time.perf_counter()
    result = action()
    op.seconds.append(time.perf_counter() - started)
    op.requests.append(moto.requests() - before)
    return result


def save_until_committed(snapshot: Any, step: int, stalls: list[float]) -> str:
    """One ``tml save`` until committed; the stall (until ``save()`` returns) goes to
    ``stalls``: on S3 it includes a HEAD, a listing and a PUT before any byte is staged."""
    started = time.perf_counter()
    pending = snapshot.save(step)
    stalls.append(time.perf_counter() - started)
    return str(pending.wait())


def make_checkpoints(fs: Any, root: str, count: int) -> None:
    """``count`` committed checkpoints, cheaply: a non-empty marker and one small data file
    per step, all in one ``fs.pipe`` (s3fs sends them concurrently)."""
    from tml_checkpointing.format.layout import COMMIT_MARKER

    files: dict[str, bytes] = {}
    for step in range(count):
        files[f"{root}/{step}/{COMMIT_MARKER}"] = b"manifest: {}\n"  # non-empty: committed
        files[f"{root}/{step}/0/model/t0"] = b"\0" * 16
    fs.pipe(files)


def run(args: argparse.Namespace, moto: Moto, log: Callable[[str], None]) -> dict[str, Any]:
    import s3fs

    from tml_checkpointing import Snapshot, get_checkpoint, get_checkpoints

    # The reference: plain s3fs with its defaults, its own instance (no shared caches).
    fs = s3fs.S3FileSystem(endpoint_url=moto.endpoint, skip_instance_cache=True)
    fs.mkdir(BUCKET)
    state = build_state(args.size_mib, args.tensor_mib)
    saved = [t.clone() for t in state_tensors(state)]
    data = concatenated(state)
    nbytes = len(data)
    log(f"state: {nbytes / MIB:.0f} MiB in {len(saved)} tensors; moto at {moto.endpoint}")

    ops = {name: Op(name) for name in ("s3fs upload", "tml save", "s3fs download", "tml restore")}
    object_url = f"{BUCKET}/reference.bin"
    save_dir = f"s3://{BUCKET}/run"
    snapshot = Snapshot(save_dir, state)
    first = Op("first tml save")
    measured(first, moto, lambda: snapshot.save(0).wait())
    fs.rm(f"{BUCKET}/run/0", recursive=True)
    ops["tml save"].note = (
        f"first save {first.seconds[0]:.2f}s, {first.requests[0]} requests "
        "(starts the writer process)"
    )
    restored_ok = True
    stalls: list[float] = []
    try:
        for repeat in range(1, args.repeat + 1):
            measured(ops["s3fs upload"], moto, lambda: fs.pipe_file(object_url, data))
            save = functools.partial(save_until_committed, snapshot, repeat, stalls)
            checkpoint = str(measured(ops["tml save"], moto, save))
            got = measured(ops["s3fs download"], moto, lambda: fs.cat_file(object_url))
            if got != data:
                raise RuntimeError("s3fs download returned other bytes than were uploaded")
            del got
            for tensor in state_tensors(state):
                tensor.zero_()
            measured(ops["tml restore"], moto, functools.partial(snapshot.restore, checkpoint))
            restored_ok = restored_ok and all(
                torch.equal(a, b) for a, b in zip(state_tensors(state), saved, strict=True)
            )
            fs.rm(f"{BUCKET}/run/{repeat}", recursive=True)  # moto keeps objects in memory
            fs.rm(object_url)
            log(
                f"repeat {repeat}: "
                + ", ".join(f"{op.name} {op.seconds[-1]:.2f}s" for op in ops.values())
            )
    finally:
        snapshot.close()
    if not restored_ok:
        raise RuntimeError("tml restore brought back other tensors than were saved")

    many = f"{BUCKET}/many"
    started = time.perf_counter()
    make_checkpoints(fs, many, CHECKPOINTS)
    log(f"{CHECKPOINTS} checkpoints made in {time.perf_counter() - started:.1f}s")
    listing = {name: Op(name) for name in ("get_checkpoint", "get_checkpoints")}
    for _ in range(args.repeat):
        latest = measured(listing["get_checkpoint"], moto, lambda: get_checkpoint(f"s3://{many}"))
        if latest != f"s3://{many}/{CHECKPOINTS - 1}":
            raise RuntimeError(f"get_checkpoint found {latest!r}")
        found = measured(listing["get_checkpoints"], moto, lambda: get_checkpoints(f"s3://{many}"))
        if not isinstance(found, list) or len(found) != CHECKPOINTS:
            raise RuntimeError(f"get_checkpoints found {len(found or [])} checkpoints")
    fs.rm(many, recursive=True)
    ops["tml save"].note = f"stall {statistics.median(stalls):.2f}s; " + ops["tml save"].note
    data = report(args, nbytes, len(saved), ops, listing, restored_ok)
    data["rows"]["tml save"]["stall_s"] = [round(s, 4) for s in stalls]
    data["rows"]["tml save"]["first_save"] = summary(first)
    return data


def summary(op: Op) -> dict[str, Any]:
    return {
        "median_s": round(statistics.median(op.seconds), 4),
        "min_s": round(min(op.seconds), 4),
        "max_s": round(max(op.seconds), 4),
        "all_s": [round(s, 4) for s in op.seconds],
        "requests": int(statistics.median(op.requests)),
        "all_requests": op.requests,
    }


def report(
    args: argparse.Namespace,
    nbytes: int,
    tensors: int,
    ops: dict[str, Op],
    listing: dict[str, Op],
    restored_ok: bool,
) -> dict[str, Any]:
    rows: dict[str, Any] = {}
    for op in ops.values():
        rows[op.name] = summary(op)
        rows[op.name]["mib_per_s"] = round(nbytes / MIB / statistics.median(op.seconds), 1)
        if op.note:
            rows[op.name]["note"] = op.note
    for reference, ours in (("s3fs upload", "tml save"), ("s3fs download", "tml restore")):
        rows[ours]["throughput_ratio_to"] = reference
        rows[ours]["throughput_ratio"] = round(
            statistics.median(ops[reference].seconds) / statistics.median(ops[ours].seconds), 3
        )
    for op in listing.values():
        rows[f"{op.name} ({CHECKPOINTS} checkpoints)"] = summary(op)
    latest_requests = int(statistics.median(listing["get_checkpoint"].requests))
    return {
        "benchmark": "bench_s3",
        "mode": "quick" if args.quick else "full",
        "state_bytes": nbytes,
        "state_mib": round(nbytes / MIB, 1),
        "tensors": tensors,
        "repeat": args.repeat,
        "statistic": "median [min-max] over repeats; requests: median per operation",
        "server": "moto (python -m moto.server) on 127.0.0.1, same cores as the client",
        "restored_ok": restored_ok,
        "rows": rows,
        "latest_of_2000": {
            "requests": latest_requests,
            "target": LISTING_TARGET,
            "meets_target": latest_requests <= LISTING_TARGET,
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "torch": torch.__version__,
            "load_avg_1min": round(os.getloadavg()[0], 2),
        },
    }


def print_table(data: dict[str, Any], stderr: bool) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150, stderr=stderr)
    table = Table(
        title=f"S3 (moto, loopback): {data['state_mib']:.0f} MiB in {data['tensors']} float32 "
        f"tensors; median \\[min-max] of {data['repeat']}",
        title_justify="left",
    )
    for column in ("operation", "time", "MiB/s", "ratio", "requests", "note"):
        table.add_column(column, justify="left" if column in ("operation", "note") else "right")
    for name, row in data["rows"].items():
        spread = f"{row['median_s']:.3f}s [{row['min_s']:.3f}-{row['max_s']:.3f}]"
        rate = f"{row['mib_per_s']:.0f}" if "mib_per_s" in row else ""
        ratio = ""
        if "throughput_ratio" in row:
            ratio = f"{row['throughput_ratio']:.2f}x of {row['throughput_ratio_to']}"
        note = row.get("note", "")
        if name.startswith("get_checkpoint ("):
            latest = data["latest_of_2000"]
            verdict = "meets" if latest["meets_target"] else "MISSES"
            note = f"target <= {latest['target']} requests: {verdict} it"
        bold = name.startswith(("tml", "get_"))
        table.add_row(f"[bold]{name}[/bold]" if bold else name, spread, rate, ratio,
                      str(row["requests"]), note)  # fmt: skip
    console.print(table)
    console.print(
        f"  restored tensors equal to saved: {data['restored_ok']}; moto is a Python server on "
        f"the same {data['machine']['cpus']} cores: absolute rates are moto's, ratios carry."
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        epilog="Columns and caveats: see the module docstring.",
    )
    parser.add_argument("--quick", action="store_true", help="64 MiB, 2 repeats")
    parser.add_argument("--size-mib", type=int, default=None, help="state size (default 256)")
    parser.add_argument("--tensor-mib", type=int, default=4, help="size of each tensor")
    parser.add_argument("--repeat", type=int, default=None, help="default 5 (quick: 2)")
    parser.add_argument(
        "--json", action="store_true", help="one JSON object on stdout (table: stderr)"
    )
    args = parser.parse_args()
    args.size_mib = args.size_mib or (64 if args.quick else 256)
    args.repeat = args.repeat or (2 if args.quick else 5)

    def log(message: str) -> None:
        print(f"{time.strftime('%H:%M:%S')} {message}", file=sys.stderr, flush=True)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tml-bench-s3-") as work:
        moto = start_moto(Path(work))
        try:
            point_clients_at(moto.endpoint)
            data = run(args, moto, log)
        finally:
            from tml_checkpointing.writing.writer_process import close_shared_writer

            close_shared_writer()  # our writer process: it ends with us, but say so
            moto.stop()
    data["wall_s"] = round(time.perf_counter() - started, 1)
    log(f"done in {data['wall_s']:.0f}s")
    print_table(data, stderr=args.json)
    if args.json:
        print(json.dumps(data, indent=1))


if __name__ == "__main__":
    main()
