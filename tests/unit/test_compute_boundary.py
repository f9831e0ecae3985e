"""worker/compute/ stays the computation: its modules, and the first-party modules they pull
in, import no Redis, S3 or Celery, and nothing from the worker outside worker.compute."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
COMPUTE = ROOT / "worker" / "compute"
FORBIDDEN = ("redis", "celery", "kombu", "minio", "shared.storage")
FIRST_PARTY = ("shared", "worker")


def imported_names(source: str, package: str) -> set[str]:
    """Every module a source file imports, with relative imports resolved against package."""
    names: set[str] = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            # ``from shared import storage`` names the module in the alias.
            names.update(f"{base}.{alias.name}" for alias in node.names)
    return names


def module_path(name: str) -> Path | None:
    parts = name.split(".")
    if parts[0] not in FIRST_PARTY:
        return None
    for candidate in (
        ROOT.joinpath(*parts).with_suffix(".py"),
        ROOT.joinpath(*parts, "__init__.py"),
    ):
        if candidate.is_file():
            return candidate
    return None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def violations(name: str) -> list[str]:
    return [f"imports {name}" for bad in FORBIDDEN if name == bad or name.startswith(f"{bad}.")] + (
        [f"imports {name} (worker code outside worker.compute)"]
        if name.split(".")[0] == "worker" and not name.startswith("worker.compute")
        else []
    )


def boundary_report(start: list[Path]) -> list[str]:
    """Follow first-party imports from start; report each forbidden import and who made it."""
    seen: set[Path] = set()
    todo = list(start)
    problems: list[str] = []
    while todo:
        path = todo.pop()
        if path in seen:
            continue
        seen.add(path)
        name = module_name(path)
        package = name if path.name == "__init__.py" else name.rpartition(".")[0]
        for imported in sorted(imported_names(path.read_text(), package)):
            problems += [f"{name} {problem}" for problem in violations(imported)]
            target = module_path(imported)
            if target is not None:
                todo.append(target)
    return problems


def compute_modules() -> list[Path]:
    return sorted(COMPUTE.glob("*.py"))


def test_compute_has_its_modules():
    names = {path.stem for path in compute_modules()}
    assert {"model", "features", "pipeline", "render", "render_tensor"} <= names


def test_compute_imports_no_redis_s3_celery_or_other_worker_code():
    assert boundary_report(compute_modules()) == []


@pytest.mark.parametrize(
    "line",
    [
        "import redis",
        "from celery import shared_task",
        "import kombu.exceptions",
        "from minio import Minio",
        "from shared.storage import ObjectStore",
        "from shared import storage",
        "from worker.runtime import context",
        "from .. import tasks",
    ],
)
def test_the_check_catches_an_added_import(line):
    # The real walk over a copy of a compute module with one import added.
    source = (COMPUTE / "render.py").read_text() + f"\n{line}\n"
    added = imported_names(source, "worker.compute")
    assert any(violations(name) for name in added)
