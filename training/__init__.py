"""The training and evaluation loops as plain functions: no Prefect inside, unit-testable.

Prefect tasks in ``tasks/`` are thin wrappers over these; the state (model, optimizer) lives
in a :class:`training.session.TrainingSession` in the process, never in task parameters.
"""
