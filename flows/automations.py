"""Create or replace the project's automations (``automations.yaml``), matched by name.

Why a file of its own: a ``prefect.yaml`` deployment trigger can only run its own deployment.
What makes deployed training runs come back by themselves needs two other actions: marking a
run whose heartbeats stopped Crashed (``change-flow-run-state``), and running *the deployment
a crashed run came from* again (``run-deployment`` with an inferred deployment, for every
deployment of the ``train`` flow). Both are plain Prefect automations; ``prefect deploy``
applies them through the build step in ``prefect.yaml`` (``flows.automations.apply``), and
``python -m flows.automations [FILE]`` applies them by hand. An automation of the same name is
updated in place, so deploying again never leaves two copies firing twice
(``prefect automation create`` would add one each time).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

import yaml
from prefect.client.orchestration import get_client
from prefect.events.schemas.automations import AutomationCore

AUTOMATIONS_FILE = Path(__file__).resolve().parent.parent / "automations.yaml"


def load(path: Path = AUTOMATIONS_FILE) -> list[AutomationCore]:
    """The automations of ``path`` (a YAML file with an ``automations:`` list), validated."""
    document = yaml.safe_load(path.read_text())
    specs = document.get("automations") if isinstance(document, dict) else None
    if not isinstance(specs, list):
        raise ValueError(f"{path}: expected a top-level `automations:` list")
    return [AutomationCore.model_validate(spec) for spec in specs]


def apply(path: str | Path = AUTOMATIONS_FILE) -> dict[str, Any]:
    """Create each automation of ``path``, or update the one of the same name (and delete
    any further copies). A ``prefect.yaml`` step: returns ``{"automations": [ids]}``."""
    applied: list[str] = []
    with get_client(sync_client=True) as client:
        for automation in load(Path(path)):
            existing = client.read_automations_by_name(automation.name)
            if existing:
                keep, *copies = existing
                client.update_automation(keep.id, automation)
                for copy in copies:
                    client.delete_automation(copy.id)
                applied.append(str(keep.id))
            else:
                applied.append(str(client.create_automation(automation)))
    return {"automations": applied}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("file", nargs="?", type=Path, default=AUTOMATIONS_FILE)
    args = parser.parse_args(argv)
    for automation, automation_id in zip(
        load(args.file), apply(args.file)["automations"], strict=True
    ):
        print(f"{automation.name}: {automation_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
