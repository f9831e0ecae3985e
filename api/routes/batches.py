"""/batches: submit an archive (streamed to storage as it arrives, ``api/archive_uploads.py``)
or an S3 prefix (``api/sources.py``), poll the batch, page through its items, cancel it."""

from __future__ import annotations

from flask import Blueprint, request, url_for

from api.archive_uploads import stream_archive_upload
from api.audit import record_submission
from api.enqueue import best_effort, enqueue
from api.idempotency import Answer, Idempotency, fingerprint, idempotency_key
from api.models import check_model
from api.services import Services, services
from api.sources import BatchRequest, read_source_request
from keeper.restore import delete_spec, save_spec
from shared import documents
from shared.batches import BLOCK_ITEMS, Batch, BatchStatus
from shared.errors import FeatureMapsError, InvalidOption, UnsupportedType
from shared.options import JobOptions
from shared.queue import BATCH_QUEUE, EXPAND_BATCH, FINALIZE_BATCH
from shared.records import new_record_id

bp = Blueprint("batches", __name__)

DEFAULT_PAGE = 100
MAX_PAGE = 1000


@bp.post("/batches")
def submit_batch():
    svc = services()
    owner = svc.caller(request)
    key = idempotency_key(request)
    batch_id = new_record_id()
    batch_request = _read_batch_request(svc, owner, batch_id)
    source = batch_request.source
    try:
        check_model(svc, batch_request.options, owner)
    except FeatureMapsError:
        _discard_upload(svc, batch_id, source)
        raise
    meaning = fingerprint(
        "POST /batches",
        source={k: source.get(k) for k in ("kind", "name", "sha256")},
        options=batch_request.options.to_dict(),
        callback_url=batch_request.callback_url,
        # Only when asked for: keys remembered before item calls existed still match.
        **({"item_callbacks": True} if batch_request.item_callback_spacing_s else {}),
        **({"archive_encoding": source["encoding"]} if source.get("encoding") else {}),
    )
    return Idempotency(svc.redis, ttl_s=svc.settings.job_ttl_s).once(
        owner,
        key,
        meaning,
        create=lambda: _submitted(svc, batch_id, batch_request, owner),
        discard=lambda: _discard_upload(svc, batch_id, source),
    )


def _read_batch_request(svc: Services, owner: str, batch_id: str) -> BatchRequest:
    """The options, source and callback URL of a batch request: an S3 prefix, or an archive
    (stored under ``batch_id`` as it arrives)."""
    if request.mimetype == "application/json":
        return read_source_request(request, svc.settings, owner)
    if request.mimetype == "multipart/form-data":
        return stream_archive_upload(request, svc.settings, svc.store, batch_id)
    raise UnsupportedType(
        "send the archive as multipart/form-data field 'archive', or JSON "
        '{"source": "s3://bucket/prefix/"}'
    )


def _submitted(svc: Services, batch_id: str, batch_request: BatchRequest, owner: str) -> Answer:
    options, source, callback_url, spacing = batch_request
    batch = enqueue_batch(
        svc,
        batch_id,
        options,
        source,
        owner,
        callback_url=callback_url,
        item_callback_spacing_s=spacing or None,
    )
    origin = source["name"] if source["kind"] == "s3" else f"archive:{source['name']}"
    record_submission("batch", batch.id, owner, source.get("size"), origin)
    body = {"id": batch.id, "status": batch.status.value, "links": _links(batch.id)}
    return Answer(body, 202, url_for("batches.get_batch", batch_id=batch.id))


def _discard_upload(svc: Services, batch_id: str, source: dict) -> None:
    """The archive a replayed request stored for nothing (the first request's batch has its
    own)."""
    if source.get("key"):
        best_effort(
            f"archive of replayed batch {batch_id}", lambda: svc.store.delete_prefix(source["key"])
        )


@bp.get("/batches/<batch_id>")
def get_batch(batch_id: str):
    svc = services()
    return batch_document(svc, svc.polled("batch", batch_id, svc.caller(request)))


@bp.get("/batches/<batch_id>/items")
def list_items(batch_id: str):
    svc = services()
    store = svc.batches
    batch = store.get(batch_id, owner=svc.caller(request))
    start = _int_arg("cursor", 0, minimum=0)
    limit = _int_arg("limit", DEFAULT_PAGE, minimum=1, maximum=MAX_PAGE)
    # The cursor is a member position: a page reads only the blocks it covers, at any size.
    items = store.items(batch_id, start=start, count=limit)
    # While a zip's shards expand in parallel, later positions may be filled before earlier
    # ones: until expansion ends, the pages go as far as the furthest block recorded.
    end = store.item_count(batch_id) if batch.expanded else store.blocks(batch_id) * BLOCK_ITEMS
    more = start + limit < end
    expiry = svc.settings.presign_expiry_s
    return {
        "items": [documents.item_document(svc.store, batch, item, expiry) for item in items],
        "next_cursor": str(start + limit) if more else None,
    }


@bp.delete("/batches/<batch_id>")
def cancel_batch(batch_id: str):
    svc = services()
    batch, finalize = svc.batches.cancel(batch_id, owner=svc.caller(request))
    if finalize:
        # Nothing was running: no worker will finish an item, so ask one to write the
        # manifest of what there is.
        svc.producer.send_task(FINALIZE_BATCH, args=[batch_id], queue=BATCH_QUEUE)
    return batch_document(svc, batch), 202


def enqueue_batch(
    svc: Services,
    batch_id: str,
    options: JobOptions,
    source: dict,
    owner: str,
    *,
    callback_url: str | None = None,
    item_callback_spacing_s: float | None = None,
) -> Batch:
    """Write the record and send the expansion task, or undo what was done and 503."""
    store = svc.batches
    batch = Batch(
        id=batch_id,
        status=BatchStatus.QUEUED,
        options=options.to_dict(),
        source=source,
        owner=owner,
        callback_url=callback_url,
        item_callback_spacing_s=item_callback_spacing_s,
    )
    save_spec(svc.store, "batch", batch)  # so that a record lost after the 202 can be restored
    undo = [lambda: store.delete(batch_id), lambda: delete_spec(svc.store, "batch", batch_id)]
    if source.get("key"):
        undo.append(lambda: svc.store.delete_prefix(source["key"]))
    enqueue(
        svc.producer,
        kind="batch",
        record_id=batch_id,
        create=lambda: store.create(batch),
        task=EXPAND_BATCH,
        queue=BATCH_QUEUE,
        undo=undo,
    )
    return batch


def _int_arg(name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    raw = request.args.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < minimum or (maximum is not None and int(raw) > maximum):
        bound = f" and {maximum}" if maximum is not None else ""
        raise InvalidOption(f"{name} must be a whole number between {minimum}{bound}")
    return int(raw)


def batch_document(svc: Services, batch: Batch) -> dict:
    doc = documents.batch_document(svc.store, batch, svc.settings.presign_expiry_s)
    doc["links"] = _links(batch.id)
    return doc


def _links(batch_id: str) -> dict:
    return {
        "self": url_for("batches.get_batch", batch_id=batch_id),
        "items": url_for("batches.list_items", batch_id=batch_id),
        "page": url_for("ui.batch_page", batch_id=batch_id),
        "examples": url_for("examples.get_examples", batch_id=batch_id),
        "examples_page": url_for("ui.examples_page", batch_id=batch_id),
    }
