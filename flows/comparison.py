"""The runs under one root compared, as Prefect artifacts: a table and a chart.

Why: Prefect's UI shows one run at a time; a person choosing between learning rates, or
checking whether the nightly retrain got better, needs every run of a root on one page. The
comparison itself is plain code (:mod:`training.run_comparison`); this module only publishes
it, under keys named by the caller's experiment (``compare-<key_name>``, the table, and
``compare-curves-<key_name>``, the chart), so each new version replaces nothing of another
root's. A failure to publish is logged, never raised: artifacts must not fail a run.
"""

from __future__ import annotations

from typing import Any

from prefect import get_run_logger
from prefect.artifacts import create_table_artifact

from flows.reporting import publish_png
from tasks.naming import artifact_key
from tml_checkpointing import CheckpointError
from tml_checkpointing.storage.filesystem import parent_url
from training.experiment import derived_experiment
from training.run_comparison import compare_runs, comparison_png


def publish_comparison(
    runs_root: str, storage_options: dict[str, Any] | None, *, key_name: str, moment: str
) -> None:
    """New versions of ``compare-<key_name>`` (a row per run under ``runs_root``: parameters,
    final and best evaluation loss, best checkpoint) and ``compare-curves-<key_name>`` (every
    run's losses by step, one colour per run). ``moment`` ("after the retrain of
    20261207T020000Z") starts both descriptions, so the versions on a run's Artifacts tab can
    be told apart. Call it from inside a flow or task run."""
    logger = get_run_logger()
    try:
        runs = compare_runs(runs_root, storage_options)
        if not runs:
            logger.info(
                "No run under %s to compare (a run is a directory with run.json).", runs_root
            )
            return
        names = ", ".join(run.run for run in runs)
        create_table_artifact(
            key=artifact_key("compare", key_name),
            table=[run.as_table_row() for run in runs],
            description=f"{moment.capitalize()}: {_runs(len(runs))} under {runs_root} "
            f"({names}): parameters, final and best evaluation loss, best checkpoint",
        )
        publish_png(
            artifact_key("compare-curves", key_name),
            comparison_png(runs, title=f"{key_name}: loss by step, one colour per run"),
            alt=f"losses of the runs under {runs_root}",
            description=f"{moment.capitalize()}: train loss by step (lines) and evaluation losses "
            f"at checkpoints (points) of the runs under {runs_root}: {names}",
        )
    except Exception as error:  # storage, a bad record, the API: never a reason to fail a run
        logger.warning("Comparison of the runs under %s not published: %s", runs_root, error)


def publish_comparison_around(
    save_dir: str, storage_options: dict[str, Any] | None, *, moment: str
) -> None:
    """The comparison of ``save_dir`` with its siblings: the runs under its parent directory
    (``runs/lr-0.1`` beside ``runs/lr-0.3``; ``retrain``'s dated runs under its runs_dir), keyed
    by the parent's derived name (:func:`training.experiment.derived_experiment`)."""
    try:
        root = parent_url(save_dir.rstrip("/"))
        key_name = derived_experiment(root, storage_options)
    except CheckpointError as error:
        get_run_logger().warning("No comparison around %s: %s", save_dir, error)
        return
    publish_comparison(root, storage_options, key_name=key_name, moment=moment)


def _runs(count: int) -> str:
    return "the one run" if count == 1 else f"the {count} runs"
