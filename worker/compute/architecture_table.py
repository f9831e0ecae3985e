"""Writes ``shared/architectures.json``: each supported architecture's ``state_dict`` (tensor
names and shapes, in torchvision's order), which the API checks uploaded weights against
without importing torch (shared/weights_files.py). Run after a torchvision upgrade:
``python -m worker.compute.architecture_table``; tests/unit/test_weights_files.py checks the
file against torchvision."""

from __future__ import annotations

import json
from pathlib import Path

from torchvision.models import get_model

from shared.options import ARCHITECTURES

TABLE = Path(__file__).parents[2] / "shared" / "architectures.json"


def table() -> dict[str, list[list]]:
    return {
        architecture: [
            [name, list(tensor.shape)]
            for name, tensor in get_model(architecture, weights=None).state_dict().items()
        ]
        for architecture in ARCHITECTURES
    }


def render(entries: dict[str, list[list]]) -> str:
    """One line per architecture: a reviewable diff when one of them changes."""
    lines = [
        f"{json.dumps(arch)}: {json.dumps(rows, separators=(',', ':'))}"
        for arch, rows in entries.items()
    ]
    return "{\n" + ",\n".join(lines) + "\n}\n"


if __name__ == "__main__":
    TABLE.write_text(render(table()))
    print(f"wrote {TABLE}")
