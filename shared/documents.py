"""The public documents of jobs, batches and batch items with their result links presigned:
what ``GET /jobs/<id>``, ``GET /batches/<id>`` and its items pages answer (the API adds
``links``) and what a webhook delivers (shared/webhooks.py). Built here so the API and the
workers send the same."""

from __future__ import annotations

from shared.batches import Batch, Item, ItemStatus
from shared.jobs import Job
from shared.storage import ObjectStore


def job_document(store: ObjectStore, job: Job, expiry_s: int) -> dict:
    doc = job.to_dict()
    result = job.result
    if result:
        # Storage keys stay private: each has its presigned *_url below.
        public = {k: v for k, v in result.items() if not k.endswith(("_key", "_keys"))}
        public["figure_url"] = store.presigned_get(result["figure_key"], expiry_s)
        public["manifest_url"] = store.presigned_get(result["manifest_key"], expiry_s)
        if result.get("input_preview_key"):
            public["input_url"] = store.presigned_get(result["input_preview_key"], expiry_s)
        if result.get("thumbnail_key"):
            public["thumbnail_url"] = store.presigned_get(result["thumbnail_key"], expiry_s)
        if result.get("arrays_key"):
            public["arrays_url"] = store.presigned_get(result["arrays_key"], expiry_s)
        if result.get("layer_keys"):
            public["layer_urls"] = [store.presigned_get(k, expiry_s) for k in result["layer_keys"]]
        doc["result"] = public
    return doc


def batch_document(store: ObjectStore, batch: Batch, expiry_s: int) -> dict:
    doc = batch.to_dict()
    if batch.result:
        doc["result"] = _batch_result(store, batch, expiry_s)
    return doc


def _batch_result(store: ObjectStore, batch: Batch, expiry_s: int) -> dict:
    """Every result shard's links; ``manifest_url``/``archive_url`` as well when there is
    one shard (null for more); ``examples_url`` (null when run with examples=0). A result
    written before shards is one shard."""
    result = batch.result or {}
    shards = result.get("shards") or [
        {
            "index": 1,
            "first": 0,
            "items": batch.total,
            "manifest_key": result["manifest_key"],
            "archive_key": result["archive_key"],
        }
    ]

    def url(key: str | None) -> str | None:
        return store.presigned_get(key, expiry_s) if key else None

    return {
        "manifest_url": url(result.get("manifest_key")),
        "archive_url": url(result.get("archive_key")),
        # Dataset examples (docs/design.md): null when the batch ran without them.
        "examples_url": url(result.get("examples_key")),
        "shards": [
            {
                "index": shard["index"],
                "first": shard["first"],
                "items": shard["items"],
                "manifest_url": url(shard["manifest_key"]),
                "archive_url": url(shard["archive_key"]),
            }
            for shard in shards
        ],
    }


def item_document(store: ObjectStore, batch: Batch, item: Item, expiry_s: int) -> dict:
    figure_key, thumbnail_key = item.info.get("figure_key"), item.info.get("thumbnail_key")
    return {
        "id": item.id,
        "name": item.name,
        "status": item.status.value,
        "figure_url": store.presigned_get(figure_key, expiry_s) if figure_key else None,
        "thumbnail_url": store.presigned_get(thumbnail_key, expiry_s) if thumbnail_key else None,
        "error": item.info.get("error"),
        # A skipped member (macOS / Windows metadata) is no error: it says why here.
        "skip_reason": item.info.get("skip_reason"),
        # Outputs copied from an equal earlier result, or shared with the same bytes in its
        # chunk, without a model pass (docs/design.md "Result reuse").
        "reused": bool(item.info.get("reused")),
        "reused_from": item.info.get("reused_from"),
        "attempts": item.attempts,
        **_item_callback(batch, item),
    }


def _item_callback(batch: Batch, item: Item) -> dict:
    """How the item's own call went, for a batch with ``item_callbacks``: ``callbacks`` holds
    the first attempt and the latest ones (``callback_attempts`` counts them all)."""
    if not batch.item_callback_spacing_s:
        return {}
    ended = item.status not in (ItemStatus.QUEUED, ItemStatus.RUNNING)
    return {
        "callback_state": item.info.get("callback_state") or ("pending" if ended else None),
        "callback_attempts": item.info.get("callback_attempts", 0),
        "callbacks": item.info.get("callbacks", []),
    }
