"""The public documents of jobs and batches with their result links presigned: what
``GET /jobs/<id>`` and ``GET /batches/<id>`` answer (the API adds ``links``) and what a
webhook delivers (shared/webhooks.py). Built here so the API and the workers send the same."""

from __future__ import annotations

from shared.batches import Batch
from shared.jobs import Job
from shared.storage import ObjectStore


def job_document(store: ObjectStore, job: Job, expiry_s: int) -> dict:
    doc = job.to_dict()
    result = job.result
    if result:
        public = {k: v for k, v in result.items() if not k.endswith("_key")}
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
        doc["result"] = {
            "manifest_url": store.presigned_get(batch.result["manifest_key"], expiry_s),
            "archive_url": store.presigned_get(batch.result["archive_key"], expiry_s),
        }
    return doc
