"""A batch's dataset examples as the API serves them: ``examples.json`` (written by the
workers, docs/design.md "Dataset examples") read from storage per request, with its sheets'
keys turned into presigned URLs. The summary leaves out the per-channel lists, so that a page
can offer the layers before it loads one; a layer's document has them all."""

from __future__ import annotations

import json
from collections.abc import Callable

from shared.batches import Batch
from shared.errors import Conflict, NotFound
from shared.storage import ObjectStore

# Per-channel lists, served by the layer document only (tens of thousands of entries in all).
LAYER_ONLY = ("top", "channel_mean", "channel_max")


def read_examples(store: ObjectStore, batch: Batch) -> dict:
    """The batch's ``examples.json``; Conflict until the batch has ended (its result written),
    NotFound when it was run without examples."""
    if not batch.finished or not batch.result:
        raise Conflict(
            f"batch {batch.id} is {batch.status.value}; its examples exist once it has ended"
        )
    key = batch.result.get("examples_key")
    if not key:
        why = (
            "was run with examples=0"
            if batch.options.get("examples") == 0
            else f"ended {batch.status.value} without them"
        )
        raise NotFound(f"batch {batch.id} has no dataset examples: it {why}")
    return json.loads(store.get_bytes(key))


def summary_document(
    store: ObjectStore, examples: dict, expiry_s: int, layer_url: Callable[[dict], str]
) -> dict:
    """``examples`` without the per-channel lists; each layer's sheets presigned and its
    ``url`` (``layer_url(layer)``) added."""
    layers = [
        {
            **{k: v for k, v in layer.items() if k not in LAYER_ONLY},
            "sheets": _presigned(store, layer["sheets"], expiry_s),
            "url": layer_url(layer),
        }
        for layer in examples["layers"]
    ]
    return {**examples, "layers": layers}


def layer_document(store: ObjectStore, examples: dict, layer: str, expiry_s: int) -> dict:
    """One layer's entry in full, chosen by its index or its name; sheets presigned."""
    for entry in examples["layers"]:
        if (layer.isdigit() and entry["index"] == int(layer)) or entry["name"] == layer:
            return {**entry, "sheets": _presigned(store, entry["sheets"], expiry_s)}
    raise NotFound(f"the examples have no layer {layer!r} (give its index or its name)")


def _presigned(store: ObjectStore, keys: list[str], expiry_s: int) -> list[str]:
    return [store.presigned_get(key, expiry_s) for key in keys]
