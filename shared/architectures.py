"""What the API knows of each supported architecture without importing torch: its
``state_dict`` (tensor names and shapes, ``shared/architectures.json``, written by
``python -m worker.compute.architecture_table``), hence its Conv2d layers and its conv
chain; and how the ``layers`` option chooses tiles among them, the one implementation the
worker uses too (docs/design.md "Models")."""

from __future__ import annotations

import json
import re
from collections.abc import Collection, Sequence
from fnmatch import fnmatchcase
from functools import cache
from pathlib import Path

from shared.errors import InvalidOption
from shared.options import CHAIN_ARCHITECTURES, CHAIN_NOT_DEFINED, layer_patterns

# The default choice of tiles when a network has more layers than a figure shows readably.
MAX_DEFAULT_TILES = 32
# The article's walk of a torchvision ResNet: the stem conv, then each block's main-path convs.
_CHAIN_NAME = re.compile(r"conv1|layer\d+\.\d+\.conv\d+")


@cache
def _table() -> dict[str, dict[str, tuple[int, ...]]]:
    raw = json.loads((Path(__file__).with_name("architectures.json")).read_text())
    return {arch: {name: tuple(shape) for name, shape in entries} for arch, entries in raw.items()}


def expected_shapes(architecture: str) -> dict[str, tuple[int, ...]]:
    """``architecture``'s state_dict as torchvision builds it: tensor name -> shape."""
    return _table()[architecture]


def layer_names(architecture: str, mode: str) -> list[str]:
    """The layers ``mode`` yields for ``architecture``, in model order: every Conv2d (the
    4-D ``.weight`` tensors of its state_dict) for ``forward``, the ResNet main path for
    ``chain`` (refused elsewhere). tests/unit/test_architectures.py checks these against
    the worker's own walk of the built networks."""
    if mode == "chain" and architecture not in CHAIN_ARCHITECTURES:
        raise InvalidOption(CHAIN_NOT_DEFINED)
    convs = [
        name.removesuffix(".weight")
        for name, shape in expected_shapes(architecture).items()
        if name.endswith(".weight") and len(shape) == 4
    ]
    if mode == "chain":
        return [name for name in convs if _CHAIN_NAME.fullmatch(name)]
    return convs


def select_layers(
    names: Sequence[str], layers: str, *, left_out: Collection[str] = ()
) -> list[str]:
    """The layers that become tiles, in model order. ``layers`` is the option: a comma list
    of names or fnmatch patterns, each of which must match a layer; empty, the layers not
    ``left_out``, all of them when there are at most ``MAX_DEFAULT_TILES``, else that many
    evenly spaced ones, the first and the last included (docs/design.md "Models")."""
    patterns = layer_patterns(layers)
    if not patterns:
        shown = [name for name in names if name not in left_out]
        if len(shown) <= MAX_DEFAULT_TILES:
            return shown
        last = len(shown) - 1
        picks = sorted(
            {round(i * last / (MAX_DEFAULT_TILES - 1)) for i in range(MAX_DEFAULT_TILES)}
        )
        return [shown[i] for i in picks]
    missing = [p for p in patterns if not any(fnmatchcase(n, p) for n in names)]
    if missing:
        raise InvalidOption(
            f"option layers: {', '.join(missing)} matches no layer of this model; its layers "
            f"are {', '.join(names[:8])}{', …' if len(names) > 8 else ''} ({len(names)} in all)"
        )
    return [n for n in names if any(fnmatchcase(n, p) for p in patterns)]
