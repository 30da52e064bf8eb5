"""Prefect flows: orchestration only; the work happens in plain functions and tasks/."""
