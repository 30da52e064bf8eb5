"""The catalog of a save_dir: which checkpoints it holds, and what evaluators said of them.

- ``discovery``: ``CheckpointPath``, ``get_checkpoint(s)``, ``checkpoints_iterator``; the one
  "marker present and non-empty" lookup.
- ``save_dir``: the guard that a directory is a save_dir, not a checkpoint or inside one.
- ``evaluation``: done-markers, metrics files, ``wait_for_evaluators``.
- ``best``: which checkpoint is a run's best (lowest ``validation/loss``), the one rule every
  table marks.
"""
