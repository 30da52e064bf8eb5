"""Deterministic data helpers shared by the recipes: seeding, partition salts, batching.

Why shared: a batch must be a pure function of its inputs in every recipe, and two copies of
the seeding arithmetic would drift apart silently (and with them, bit-identical resume).
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping

import torch

Batch = Mapping[str, torch.Tensor]


def seeded_generator(*parts: int) -> torch.Generator:
    """A generator seeded from a tuple of ints (stable across runs and machines)."""
    seed = 0
    for part in parts:
        seed = (seed * 1_000_003 + part) % (2**63 - 1)
    return torch.Generator().manual_seed(seed)


def partition_salt(partition: str) -> int:
    """A stable, non-zero salt per evaluation partition (0 is the training data's)."""
    # int(): typeshed types ``int ** int`` as Any (a negative exponent gives a float).
    return int(sum(ord(c) * 31**i for i, c in enumerate(partition))) % 1_000_003 + 1


def sliced_batches(
    data: Mapping[str, torch.Tensor], steps: int, batch_size: int
) -> Iterator[dict[str, torch.Tensor]]:
    """``steps`` consecutive batches of ``batch_size`` rows of every tensor in ``data``."""
    for index in range(steps):
        rows = slice(index * batch_size, (index + 1) * batch_size)
        yield {key: value[rows] for key, value in data.items()}
