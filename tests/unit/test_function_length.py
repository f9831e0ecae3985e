"""No function in the service, the client, the stack or the benchmarks runs over 60 lines
(the OpenAPI document, one literal, excepted): past that a function does several things."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("api", "worker", "shared", "client", "stack", "bench")
LIMIT = 60
EXEMPT = {Path("api/openapi.py")}


def long_functions(limit: int = LIMIT) -> list[str]:
    """``path:line name (N lines)`` for each function longer than ``limit`` lines."""
    found = []
    for package in PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            relative = path.relative_to(ROOT)
            if relative in EXEMPT:
                continue
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                    length = node.end_lineno - node.lineno + 1
                    if length > limit:
                        found.append(f"{relative}:{node.lineno} {node.name} ({length} lines)")
    return found


def test_no_function_is_longer_than_the_limit():
    assert long_functions() == []


def test_the_check_sees_a_long_function():
    assert long_functions(limit=5)
