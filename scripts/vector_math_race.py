"""Count fresh processes whose first ``torch.sqrt`` of a large tensor rounds differently.

    .venv/bin/python scripts/vector_math_race.py --processes 200 [--settled] [--busy 2]

Each child process imports torch, computes ``sqrt`` of a 16,000-element float32 tensor (the
shape of the recipe's user table, values like Adam's ``exp_avg_sq``) with every thread, and
again with one thread, and reports how many elements differ. ``--settled`` has the child call
:func:`training.determinism.settle_vector_math` first, as training does. ``--busy N`` keeps N
``yes`` processes running meanwhile (the race needs a loaded machine to show). See
``training/determinism.py`` for what this measures and why it matters.
"""

from __future__ import annotations

import argparse
import collections
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CHILD = """
import sys, torch
if sys.argv[1] == "settled":
    from training.determinism import settle_vector_math
    settle_vector_math()
values = torch.rand(1000, 16, generator=torch.Generator().manual_seed(0)) * 1e-6
first = values.sqrt()
torch.set_num_threads(1)
print(int((first != values.sqrt()).sum()))
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--processes", type=int, default=200)
    parser.add_argument("--parallel", type=int, default=4)
    parser.add_argument("--busy", type=int, default=2, help="yes processes kept running")
    parser.add_argument("--settled", action="store_true")
    args = parser.parse_args()
    mode = "settled" if args.settled else "cold"
    busy = [subprocess.Popen(["yes"], stdout=subprocess.DEVNULL) for _ in range(args.busy)]
    outcomes: collections.Counter[int] = collections.Counter()
    try:
        for _ in range(0, args.processes, args.parallel):
            children = [
                subprocess.Popen(
                    [sys.executable, "-c", CHILD, mode], stdout=subprocess.PIPE, text=True, cwd=REPO
                )
                for _ in range(args.parallel)
            ]
            for child in children:
                outcomes[int(child.communicate()[0])] += 1
    finally:
        for process in busy:
            process.kill()
            process.wait()
    differing = sum(count for elements, count in outcomes.items() if elements)
    print(
        f"{mode}: {differing} of {sum(outcomes.values())} processes rounded their first sqrt "
        f"differently; elements differing -> processes: {dict(sorted(outcomes.items()))}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
