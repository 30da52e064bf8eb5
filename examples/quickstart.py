"""Save, "crash", and resume: the smallest end-to-end use of tml_checkpointing.

Trains a small model for a few steps, checkpointing asynchronously, then builds a fresh
model as a restarted process would, finds the latest checkpoint and resumes from it.
Run with ``make demo`` (or ``.venv/bin/python examples/quickstart.py [SAVE_DIR]``).
"""

from __future__ import annotations

import sys
import tempfile

import torch
from torchsnapshot import RNGState

from tml_checkpointing import Snapshot, get_checkpoints, get_latest_valid_checkpoint


def build() -> dict:
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.ReLU(), torch.nn.Linear(32, 1))
    return {
        "model": model,
        "optimizer": torch.optim.SGD(model.parameters(), lr=0.05),
        "rng": RNGState(),
    }


def train(snapshot: Snapshot, state: dict, until_step: int, save_every: int) -> None:
    model, optimizer = state["model"], state["optimizer"]
    for step in range(snapshot.step + 1, until_step + 1):
        inputs = torch.randn(64, 16)
        loss = (model(inputs).squeeze(1) - inputs.sum(1)).pow(2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        if step % save_every == 0:
            snapshot.save(step)  # returns at once; the write goes on in the background
            print(f"step {step:3d}  loss {loss.item():8.4f}  -> saving {snapshot.save_dir}/{step}")


def main() -> None:
    save_dir = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="tml-demo-")
    torch.manual_seed(0)
    with Snapshot(save_dir, build()) as snapshot:
        train(snapshot, snapshot.state, until_step=30, save_every=10)
    print(f"committed: {get_checkpoints(save_dir)}")

    print("-- a new process resumes --")
    torch.manual_seed(123)  # whatever it is, the restored RNG state replaces it
    resumed = Snapshot(save_dir, build())
    latest = get_latest_valid_checkpoint(save_dir)  # newest one that verifies
    resumed.restore(latest)
    print(f"resumed from {latest} at step {resumed.step}")
    with resumed:
        train(resumed, resumed.state, until_step=50, save_every=10)
    print(f"committed: {[c.rsplit('/', 1)[-1] for c in get_checkpoints(save_dir)]}")


if __name__ == "__main__":
    main()
