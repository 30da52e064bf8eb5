"""What `pip install tml-checkpointing` installs, and that every direct import is declared.

Issue 17: the wheel holds the library alone (no generic top-level names such as ``flows`` or
``training``, no Prefect, matplotlib or s3fs for someone who wants ``Snapshot``), and the
library works in a fresh virtualenv that has nothing but the wheel, its declared dependencies
and the CPU torch wheel. The application (flows, tasks, training, recipes) runs from the
repository with the ``app`` and ``torchrec`` extras; the static check below proves that every
module it imports comes from one of them.
"""

from __future__ import annotations

import ast
import importlib.metadata
import json
import os
import re
import shutil
import subprocess
import sys
import tomllib
import venv
import zipfile
from pathlib import Path

import pytest

REPOSITORY = Path(__file__).resolve().parent.parent
PYPROJECT = tomllib.loads((REPOSITORY / "pyproject.toml").read_text())
LIBRARY = "tml_checkpointing"
APPLICATION = ("flows", "tasks", "training", "recipes")
TORCH_SPEC = "torch==2.13.0"  # the CPU wheel (Makefile's TORCH_SPEC)
# Installed beside the `torchrec` extra by `make setup` (`pip install --no-deps`, see Makefile).
INSTALLED_WITHOUT_DEPS = ("torchrec",)


def _requirement_name(requirement: str) -> str:
    match = re.match(r"[A-Za-z0-9._-]+", requirement)
    assert match, requirement
    return match.group(0).lower().replace("_", "-")


def _distributions(*extras: str) -> set[str]:
    """The distributions the library's dependencies plus ``extras`` bring (self-references
    such as ``tml-checkpointing[s3]`` followed)."""
    project = PYPROJECT["project"]
    names = {_requirement_name(r) for r in project["dependencies"]}
    pending = list(extras)
    seen: set[str] = set()
    while pending:
        extra = pending.pop()
        if extra in seen:
            continue
        seen.add(extra)
        for requirement in project["optional-dependencies"][extra]:
            own = re.fullmatch(r"tml-checkpointing\[([a-z0-9_,-]+)\]", requirement)
            if own:
                pending.extend(own.group(1).split(","))
            else:
                names.add(_requirement_name(requirement))
    return names


def _imported_top_levels(folder: Path) -> dict[str, str]:
    """Every top-level module imported anywhere under ``folder`` -> one file importing it."""
    found: dict[str, str] = {}
    for path in sorted(folder.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for name in names:
                found.setdefault(name.partition(".")[0], str(path.relative_to(REPOSITORY)))
    return found


def _undeclared(folder: str, declared: set[str], own: set[str]) -> list[str]:
    providers = importlib.metadata.packages_distributions()
    problems = []
    for module, where in sorted(_imported_top_levels(REPOSITORY / folder).items()):
        if module in sys.stdlib_module_names or module in own:
            continue
        dists = {d.lower().replace("_", "-") for d in providers.get(module, [])}
        if not dists:
            problems.append(f"{where}: imports {module!r}, which no installed distribution has")
        elif not dists & declared:
            problems.append(f"{where}: imports {module!r} from {sorted(dists)}, not declared")
    return problems


def test_every_library_import_is_a_declared_dependency() -> None:
    assert _undeclared(LIBRARY, _distributions(), {LIBRARY}) == []


def test_every_application_import_is_declared_by_its_extras() -> None:
    declared = _distributions("app", "torchrec") | set(INSTALLED_WITHOUT_DEPS)
    own = {LIBRARY, *APPLICATION}
    problems = [p for folder in APPLICATION for p in _undeclared(folder, declared, own)]
    assert problems == []


def test_the_application_is_not_a_library_dependency() -> None:
    """Someone who wants ``Snapshot`` gets neither Prefect nor plotting nor s3fs."""
    library = _distributions()
    assert not library & {"prefect", "matplotlib", "s3fs", "httpx", "uvicorn", "torchrec"}
    assert "s3fs" in _distributions("s3")
    assert {"prefect", "matplotlib", "s3fs"} <= _distributions("app")


# What the fresh virtualenv runs: the library in use, with the application nowhere in sight.
FRESH_CHECK = """
import importlib, importlib.util, json, pkgutil, sys, tempfile
import torch
import tml_checkpointing
from tml_checkpointing import Snapshot, get_checkpoints, get_latest_valid_checkpoint

modules = [m.name for m in pkgutil.walk_packages(tml_checkpointing.__path__, "tml_checkpointing.")]
for name in modules:
    importlib.import_module(name)
absent = ("prefect", "s3fs", "matplotlib", "flows", "tasks", "training", "recipes")
save_dir = sys.argv[1]
model = torch.nn.Linear(8, 4)
Snapshot(save_dir, {"model": model}).save(3).wait()
restored = torch.nn.Linear(8, 4)
Snapshot(save_dir, {"model": restored}).restore(get_latest_valid_checkpoint(save_dir))
print(json.dumps({
    "modules": len(modules),
    "present": [n for n in absent if importlib.util.find_spec(n) is not None],
    "checkpoints": get_checkpoints(save_dir),
    "equal": torch.equal(model.weight, restored.weight),
    "memory": Snapshot("memory://fresh", {"model": model}).save(1).wait(),
}))
"""


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Built from a copy of what the distribution is made of: setuptools reuses a checkout's
    # build/ folder, where a module deleted since an earlier build would still be picked up.
    source = tmp_path_factory.mktemp("source")
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy2(REPOSITORY / name, source / name)
    shutil.copytree(
        REPOSITORY / LIBRARY, source / LIBRARY, ignore=shutil.ignore_patterns("__pycache__")
    )
    out = tmp_path_factory.mktemp("wheel")
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
         "-w", str(out), str(source)],
        check=True, cwd=out,
    )  # fmt: skip
    (built,) = out.glob("tml_checkpointing-*.whl")
    return built


def test_wheel_holds_the_library_alone(wheel: Path) -> None:
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        (metadata,) = (n for n in names if n.endswith(".dist-info/METADATA"))
        requires = [
            line.removeprefix("Requires-Dist: ")
            for line in archive.read(metadata).decode().splitlines()
            if line.startswith("Requires-Dist: ")
        ]
        (entry_points,) = (n for n in names if n.endswith(".dist-info/entry_points.txt"))
        scripts = archive.read(entry_points).decode()
    top_levels = {name.split("/")[0] for name in names}
    assert {t for t in top_levels if not t.endswith(".dist-info")} == {LIBRARY}
    assert f"{LIBRARY}/py.typed" in names
    unconditional = {_requirement_name(r) for r in requires if "extra ==" not in r}
    assert unconditional == _distributions()
    assert any(r.startswith("s3fs") and 'extra == "s3"' in r for r in requires)
    assert any(r.startswith("prefect") and 'extra == "app"' in r for r in requires)
    assert "tml = tml_checkpointing.cli:main" in scripts
    assert "tml-fsspec = tml_checkpointing." in scripts  # torchsnapshot's storage_plugins group


@pytest.mark.slow  # a virtualenv with torch: about a minute
def test_wheel_works_in_a_fresh_virtualenv(wheel: Path, tmp_path: Path) -> None:
    """Nothing but the wheel, its declared dependencies and the CPU torch wheel: every library
    module imports, a save and a restore round-trip, and ``tml checkpoints`` reads the result;
    Prefect, s3fs, matplotlib and the application's packages are absent."""
    env_dir = tmp_path / "venv"
    venv.EnvBuilder(with_pip=True).create(env_dir)
    python, tml = env_dir / "bin" / "python", env_dir / "bin" / "tml"
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    subprocess.run(
        [python, "-m", "pip", "install", "-q", TORCH_SPEC, str(wheel)],
        check=True, cwd=tmp_path, env=env,
    )  # fmt: skip
    save_dir = tmp_path / "run"
    checked = subprocess.run(
        [python, "-c", FRESH_CHECK, str(save_dir)],
        check=True, cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    report = json.loads(checked.stdout.splitlines()[-1])
    assert report["present"] == []
    assert report["modules"] > 10
    assert report["checkpoints"] == [str(save_dir / "3")]
    assert report["equal"] is True
    assert report["memory"] == "memory://fresh/1"

    listed = subprocess.run(
        [tml, "checkpoints", "list", "--json", str(save_dir)],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert listed.returncode == 0, listed.stderr
    assert [(row["step"], row["state"]) for row in json.loads(listed.stdout)] == [(3, "valid")]
    verified = subprocess.run(
        [tml, "checkpoints", "verify", str(save_dir / "3")],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stderr

    training = subprocess.run(
        [tml, "train", "--save-dir", str(tmp_path / "x")],
        cwd=tmp_path, env=env, capture_output=True, text=True,
    )  # fmt: skip
    assert training.returncode == 2
    assert "training application" in training.stderr, training.stderr


def test_the_library_names_the_application_commands_the_application_adds() -> None:
    """The library's own ``tml`` points ``train``/``evaluate``/``retrain`` at the repository;
    those are exactly the groups ``flows/cli.py`` adds."""
    from flows.cli import FLOW_COMMANDS
    from tml_checkpointing.cli.app import APPLICATION_COMMANDS

    assert FLOW_COMMANDS == APPLICATION_COMMANDS
