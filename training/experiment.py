"""An experiment's identity: the one name that keys everything a person sees of a run.

Why: artifact keys, run names, ``experiment:`` tags, evaluation concurrency limits and events
all carry a name, never the whole ``save_dir``. Taken from the directory's last part alone,
``/runs/demo`` and ``/runs/sweep/demo`` shared every key, and ``s3://b/exp1/checkpoints`` and
``s3://b/exp2/checkpoints`` were both "checkpoints": one run's table replaced the other's and
their evaluations waited on one limit. So:

- a name given by the user (``experiment``) is used as is, and recorded in ``run.json``: a
  resume, an evaluator or ``tml checkpoints list`` reading the run finds it there, and a resume
  that passes another one is refused (:class:`ExperimentMismatchError`);
- otherwise it is derived from the whole URL: the last part, readable, plus a short hash of the
  full URL (``demo-3f9a1c``), so two different directories never share one. A derived name is
  not recorded: a copy of the directory elsewhere is another experiment.

Plain functions, no Prefect: the library's CLI and the flows use the same rule.
"""

from __future__ import annotations

import hashlib
import re

from tml_checkpointing import CheckpointError
from tml_checkpointing.storage.filesystem import StorageOptions, resolve

NAME_PATTERN = re.compile(r"[a-z0-9](?:[a-z0-9-]{0,46}[a-z0-9])?")
"""What Prefect accepts in an artifact key (lowercase letters, digits, dashes), at most 48."""

_HASH_CHARS = 6  # 16.7 M values: two directories of one user never meet
_READABLE_CHARS = 32
# Last parts that say nothing of the experiment: its parent is shown with them (also before a
# last part that starts with a digit: a dated run of ``retrain``, a numbered trial).
_GENERIC_PARTS = frozenset({"checkpoints", "checkpoint", "ckpt", "ckpts", "run", "runs", "output"})


class InvalidExperimentNameError(CheckpointError, ValueError):
    """An ``experiment`` name Prefect cannot use as a key part."""


class ExperimentMismatchError(CheckpointError, ValueError):
    """A run was given another experiment name than the one its ``run.json`` records."""


def check_experiment_name(name: str) -> str:
    """``name`` if it is a valid experiment name, else :class:`InvalidExperimentNameError`."""
    if not NAME_PATTERN.fullmatch(name):
        raise InvalidExperimentNameError(
            f"experiment {name!r} is not a valid name: use 1-48 lowercase letters, digits and "
            "dashes, starting and ending with a letter or digit (it keys artifacts, tags and "
            "concurrency limits), e.g. 'ranking-lr3e-4'; or leave it out to derive one from "
            "save_dir."
        )
    return name


def canonical_url(save_dir: str, storage_options: StorageOptions | None = None) -> str:
    """The full URL of ``save_dir`` as its filesystem spells it (``file:///abs/path`` for a
    relative local path): the same directory always gives the same string."""
    fs, path = resolve(save_dir, storage_options)
    url: str = fs.unstrip_protocol(path.rstrip("/"))
    return url


def derived_experiment(save_dir: str, storage_options: StorageOptions | None = None) -> str:
    """``s3://bucket/sweep/demo/`` -> ``demo-3f9a1c``: the last part plus a hash of the URL.

    A generic or numeric last part comes with its parent: ``s3://bucket/exp1/checkpoints`` ->
    ``exp1-checkpoints-51f71a``, ``runs/nightly/20261207T020000Z`` ->
    ``nightly-20261207t020000z-5e0b2f``.
    """
    url = canonical_url(save_dir, storage_options)
    parts = [part for part in url.split("://", 1)[-1].split("/") if part]
    vague = parts and (parts[-1].lower() in _GENERIC_PARTS or parts[-1][:1].isdigit())
    shown = parts[-2:] if len(parts) > 1 and vague else parts[-1:]
    readable = re.sub(r"[^a-z0-9]+", "-", "-".join(shown).lower()).strip("-")
    readable = readable[:_READABLE_CHARS].strip("-")
    digest = hashlib.sha256(url.encode()).hexdigest()[:_HASH_CHARS]
    return f"{readable or 'run'}-{digest}"


def chosen_experiment(
    save_dir: str,
    given: str | None,
    recorded: str | None,
    storage_options: StorageOptions | None = None,
) -> str:
    """The experiment of a run: ``given`` (checked against ``recorded``), else ``recorded``
    (``run.json``), else derived from ``save_dir``."""
    if given:
        check_experiment_name(given)
        if recorded and recorded != given:
            raise ExperimentMismatchError(
                f"{save_dir} is experiment {recorded!r} (recorded in its run.json), not "
                f"{given!r}: pass experiment={recorded!r} or leave it out to resume it, or "
                "use another save_dir for a new experiment."
            )
        return given
    return recorded or derived_experiment(save_dir, storage_options)
