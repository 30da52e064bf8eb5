"""A plain training loop with checkpoints and preemption handling (the shape flows/ uses).

    python train_loop.py SAVE_DIR OUT_FILE [--steps N] [--save-every K] [--seed S]

Data is a pure function of (seed, step), so a resumed run sees exactly the batches an
uninterrupted one would. Prints "started" once training begins; on SIGTERM/SIGUSR1 it
checkpoints the current step and exits with 128 + signum. On completion it writes the final
weights to OUT_FILE.
"""

from __future__ import annotations

import argparse
import sys

import torch

from tml_checkpointing import (
    PreemptedError,
    PreemptionGuard,
    Snapshot,
    get_latest_valid_checkpoint,
    save_final_checkpoint,
)


def batch(seed: int, step: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
    x = torch.randn(32, 16, generator=generator)
    return x, x[:, :4] * 2.0 + 0.1 * torch.randn(32, 4, generator=generator)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("save_dir")
    parser.add_argument("out_file")
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--save-every", type=int, default=500)
    parser.add_argument("--seed", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(args.seed)
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    snapshot = Snapshot(args.save_dir, {"model": model, "optimizer": optimizer})
    try:
        # The guard goes up before anything else: a signal that arrives before it is
        # installed kills the process the default way (no final checkpoint, exit -15).
        with PreemptionGuard() as guard:
            start = 0
            latest = get_latest_valid_checkpoint(args.save_dir, verify="full")
            if latest:
                snapshot.restore(latest)
                start = snapshot.step + 1
            print(f"started {start}", flush=True)
            for step in range(start, args.steps):
                x, y = batch(args.seed, step)
                optimizer.zero_grad()
                torch.nn.functional.mse_loss(model(x), y).backward()
                optimizer.step()
                if step % args.save_every == 0:
                    snapshot.save(step)
                if guard.requested:
                    save_final_checkpoint(snapshot, step, guard)
        snapshot.close()
    except PreemptedError as error:
        print(f"preempted {error.step}", flush=True)
        return error.exit_code
    torch.save(model.state_dict(), args.out_file)
    print("finished", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
