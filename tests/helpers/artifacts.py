"""Reading back what flows published on the session's Prefect server: an artifact's newest
version, a table artifact's rows."""

from __future__ import annotations

import json
from typing import Any

from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey


def latest_artifact(key: str) -> Any:
    """The newest version of the artifact ``key`` (the test fails when there is none)."""
    with get_client(sync_client=True) as client:
        found = client.read_latest_artifacts(
            artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=[key]))
        )
    assert found, f"no artifact {key}"
    return found[0]


def table_rows(key: str) -> list[dict[str, Any]]:
    """The rows of the newest version of the table artifact ``key``."""
    data = latest_artifact(key).data
    rows: list[dict[str, Any]] = json.loads(data) if isinstance(data, str) else data
    return rows
