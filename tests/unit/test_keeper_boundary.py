"""The API image carries api/, shared/ and keeper/ but no worker code (docker/api.Dockerfile):
the keeper, which the API runs, and the API itself import nothing from worker/ and no torch,
so that recovery, the reconciler and webhook delivery can run where no worker does."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
FORBIDDEN = ("worker", "torch", "torchvision")


def imports(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and not node.level:
            names.add(node.module or "")
    return names


@pytest.mark.parametrize(
    "path",
    sorted([*ROOT.joinpath("keeper").rglob("*.py"), *ROOT.joinpath("api").rglob("*.py")]),
    ids=lambda p: str(p.relative_to(ROOT)),
)
def test_the_keeper_and_the_api_import_no_worker_code(path: Path) -> None:
    bad = {n for n in imports(path) if n.split(".")[0] in FORBIDDEN}
    assert not bad, f"{path.relative_to(ROOT)} imports {sorted(bad)}"


def test_the_api_image_carries_the_keeper() -> None:
    dockerfile = ROOT.joinpath("docker", "api.Dockerfile").read_text()
    assert "COPY keeper keeper" in dockerfile
    assert "COPY worker worker" not in dockerfile
    assert "api.gunicorn_conf" in dockerfile  # whose post_worker_init starts the keeper
