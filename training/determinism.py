"""What a training process sets up before its first step so that its results are bit-identical
to any other process's: a resumed run must end exactly where an uninterrupted one would.

Two things, both process-wide:

- Deterministic kernels (``torch.use_deterministic_algorithms``).
- Oneself calling each of the math library's vector functions once, from one thread, before
  training. PyTorch computes ``sqrt``, ``exp``, ``log``... of a large CPU tensor through MKL's
  vector math, split into chunks over its OpenMP threads. When two threads call one of those
  functions for the first time at the same moment, one of them can get a different
  implementation for that call, which rounds differently. Measured on these machines
  (2 cores kept busy, fresh processes, ``scripts/vector_math_race.py``): 4 processes of 860
  computed their first ``sqrt`` of a 16,000-element tensor with 7,997 or 11,614 elements
  rounded differently. In training this was Adam's first step after a restore
  (``exp_avg_sq.sqrt()``), so the resumed run drifted from the uninterrupted one by 1-2 ulp
  in half of an embedding table's rows, and stayed apart. A
  first call made from one thread, on a tensor too small to be split, settles the choice
  before any two threads can race for it. ``train_epoch`` repeats it (0.1 ms) in the thread
  that trains, which under Prefect is a task's worker thread, not the one that set up.
"""

from __future__ import annotations

import torch

# Unary functions ATen may compute through MKL's vector math on x86 (ATen's vml.h; a few
# more cost nothing), in the dtypes a recipe computes in: each call takes microseconds.
VECTOR_MATH_FUNCTIONS = (
    "sqrt", "rsqrt", "reciprocal", "exp", "expm1", "log", "log1p", "log2", "log10",
    "sin", "cos", "tan", "asin", "acos", "atan", "sinh", "cosh", "tanh",
    "erf", "erfc", "erfinv", "lgamma", "sigmoid", "ceil", "floor", "round", "trunc", "abs",
)  # fmt: skip
VECTOR_MATH_DTYPES = (torch.float32, torch.float64)


def set_deterministic() -> None:
    """Make this process's training results bit-identical to any other process's."""
    torch.use_deterministic_algorithms(True, warn_only=True)
    settle_vector_math()


def settle_vector_math() -> None:
    """Call each vector math function once from this thread, on a tensor small enough that
    PyTorch does not split it over threads (see the module's docstring for why)."""
    for dtype in VECTOR_MATH_DTYPES:
        sample = torch.linspace(0.1, 0.9, 16, dtype=dtype)
        for name in VECTOR_MATH_FUNCTIONS:
            getattr(torch, name)(sample)
