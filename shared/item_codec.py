"""Where a batch item's info dict is packed into the few bytes its block entry keeps, and
unpacked to exactly the dict that was written (shared/batches.py stores the result).

The info is compact JSON with short names for the fields every item has, and the values a
field can be derived from the item's id, batch or block left out:

    name n   input_key i   input_range r   figure_key f   thumbnail_key t   manifest_key m
    scores_key s   reused u   reused_from o   error e   skip_reason k   attempt a

(any other field keeps its name; a name that collides with a short one is prefixed "~").

A derived value is stored as an integer: ``input_key`` 0 when it is the block's input pack
(``keys.batch_input_pack_key``), ``thumbnail_key`` / ``manifest_key`` / ``scores_key`` 0
when they are the item's own in the folder of the info's ``attempt``
(``keys.thumbnail_key(item_id, attempt=…)``…; no ``attempt``: the layout before attempts),
``figure_key`` the index of its format in ``FORMATS`` when it is
``keys.figure_key(item_id, fmt, attempt=…)``, ``reused_from`` the member index when it
names an item of the same batch. A value that is not derived stays a string; one of another
type (never written today) is wrapped in a one-element list, so no value can be mistaken for
a derived one.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from shared import keys
from shared.options import FORMATS

SHORT = {
    "name": "n",
    "input_key": "i",
    "input_range": "r",
    "figure_key": "f",
    "thumbnail_key": "t",
    "manifest_key": "m",
    "scores_key": "s",
    "reused": "u",
    "reused_from": "o",
    "error": "e",
    "skip_reason": "k",
    "attempt": "a",
}
LONG = {short: name for name, short in SHORT.items()}
ESCAPE = "~"


def item_id(batch_id: str, index: int) -> str:
    """Server-generated, deterministic in the member's position: a redelivered expansion
    finds the items it already created. Item keys in storage are prefixed by it."""
    return f"{batch_id}-{index:06d}"


def member_index(batch_id: str, item: str) -> int | None:
    """The member index of item id ``item`` of this batch; None for any other string."""
    head, dash, index = item.rpartition("-")
    same = dash and head == batch_id and index.isdigit()
    return int(index) if same and item_id(batch_id, int(index)) == item else None


class ItemPlace:
    """Where an item sits: its batch, member index and block; what its derived values are."""

    def __init__(self, batch_id: str, index: int, block: int) -> None:
        self.batch_id = batch_id
        self.index = index
        self.block = block
        self.item_id = item_id(batch_id, index)

    def derived(self, name: str, attempt: str) -> list[str]:
        """The values of field ``name`` that can be stored as their position in this list,
        for an item whose outputs are in the folder of ``attempt``."""
        item, a = self.item_id, attempt
        derive: dict[str, Callable[[], list[str]]] = {
            "input_key": lambda: [keys.batch_input_pack_key(self.batch_id, self.block)],
            "thumbnail_key": lambda: [keys.thumbnail_key(item, attempt=a)],
            "manifest_key": lambda: [keys.manifest_key(item, attempt=a)],
            "scores_key": lambda: [keys.scores_key(item, attempt=a)],
            "figure_key": lambda: [keys.figure_key(item, fmt, attempt=a) for fmt in FORMATS],
        }
        return derive[name]() if name in derive else []


def pack_info(place: ItemPlace, info: dict[str, Any]) -> str:
    """The stored form of ``info`` (see the module docstring)."""
    packed: dict[str, Any] = {}
    attempt = info.get("attempt", "")
    for name, value in info.items():
        packed[_short_name(name)] = _pack_value(place, name, value, attempt)
    return json.dumps(packed, separators=(",", ":"))


def unpack_info(place: ItemPlace, stored: str) -> dict[str, Any]:
    """The info dict that :func:`pack_info` was given."""
    info: dict[str, Any] = {}
    packed = json.loads(stored)
    attempt = packed.get(SHORT["attempt"], "")
    for short, value in packed.items():
        name = _long_name(short)
        info[name] = _unpack_value(place, name, value, attempt)
    return info


def _short_name(name: str) -> str:
    if name in SHORT:
        return SHORT[name]
    if name in LONG or name.startswith(ESCAPE):
        return ESCAPE + name
    return name


def _long_name(short: str) -> str:
    if short in LONG:
        return LONG[short]
    return short.removeprefix(ESCAPE) if short.startswith(ESCAPE) else short


def _derivable(name: str) -> bool:
    return name in (
        "input_key",
        "thumbnail_key",
        "manifest_key",
        "scores_key",
        "figure_key",
        "reused_from",
    )


def _pack_value(place: ItemPlace, name: str, value: Any, attempt: str) -> Any:
    if not _derivable(name):
        return value
    if not isinstance(value, str):
        return [value]
    if name == "reused_from":
        index = member_index(place.batch_id, value)
        return value if index is None else index
    derived = place.derived(name, attempt)
    return derived.index(value) if value in derived else value


def _unpack_value(place: ItemPlace, name: str, value: Any, attempt: str) -> Any:
    if not _derivable(name) or isinstance(value, str):
        return value
    if isinstance(value, list):
        return value[0]
    if name == "reused_from":
        return item_id(place.batch_id, value)
    return place.derived(name, attempt)[value]
