"""Prefect tasks: thin wrappers over plain functions (see flows/)."""
