"""/batches: submit an archive (streamed to storage as it arrives) or an S3 prefix, poll the
batch, page through its items, cancel it.

The archive never sits in the API's memory: the multipart body is decoded from
``request.stream`` with Werkzeug's incremental decoder, and the archive part is piped into
``ObjectStore.put_stream`` one multipart-upload part (5 MiB) at a time. Its first bytes are
sniffed before anything is stored, so a non-archive is a 415 with nothing left behind.
"""

from __future__ import annotations

import io
from collections.abc import Iterator
from typing import Any

from flask import Blueprint, Request, request, url_for
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import NEED_DATA, Data, Epilogue, Field, File, MultipartDecoder

from api.audit import record_submission
from api.auth import caller
from api.enqueue import enqueue
from api.services import Services, services
from shared import keys
from shared.access import source_allowed, split_s3_url
from shared.archives import SNIFF_BYTES, SOURCE_EXTENSIONS, sniff_archive
from shared.batches import Batch, BatchStatus, BatchStore
from shared.errors import (
    BadRequest,
    ForbiddenSource,
    InvalidOption,
    MissingField,
    PayloadTooLarge,
    UnsupportedType,
)
from shared.options import JobOptions
from shared.queue import BATCH_QUEUE, EXPAND_BATCH, FINALIZE_BATCH
from shared.records import new_record_id
from shared.storage import MIN_PART_SIZE

bp = Blueprint("batches", __name__)

ARCHIVE_FIELD = "archive"
READ_SIZE = 64 * 1024
# Option fields are tiny; anything bigger is not an option.
MAX_FIELD_BYTES = 4096
DEFAULT_PAGE = 100
MAX_PAGE = 1000
# Parts of the service's own bucket that a source prefix may never read: other users' data.
_PRIVATE_PREFIXES = ("inputs/", "results/", "batches/")


def _batches(svc: Services) -> BatchStore:
    # Built per request from the app's Redis client: the store is two dicts and a few
    # registered script objects, and Services belongs to the jobs code.
    return BatchStore(svc.redis, ttl_s=svc.settings.job_ttl_s)


def _caller(svc: Services) -> str:
    return caller(request, svc.settings, svc.redis)


@bp.post("/batches")
def submit_batch():
    svc = services()
    owner = _caller(svc)
    batch_id = new_record_id()
    if request.mimetype == "application/json":
        options, source = read_source_request(request, svc, owner)
    elif request.mimetype == "multipart/form-data":
        try:
            options, source = stream_archive_upload(request, svc, batch_id)
        except RequestEntityTooLarge as exc:
            raise PayloadTooLarge(
                f"the archive is over the limit of {svc.settings.max_archive_bytes} bytes "
                f"(MAX_ARCHIVE_BYTES) or has more than {svc.settings.max_form_parts} form parts"
            ) from exc
    else:
        raise UnsupportedType(
            "send the archive as multipart/form-data field 'archive', or JSON "
            '{"source": "s3://bucket/prefix/"}'
        )
    batch = enqueue_batch(svc, batch_id, options, source, owner)
    origin = source["name"] if source["kind"] == "s3" else f"archive:{source['name']}"
    record_submission("batch", batch.id, owner, source.get("size"), origin)
    body = {"id": batch.id, "status": batch.status.value, "links": _links(batch.id)}
    return body, 202, {"Location": url_for("batches.get_batch", batch_id=batch.id)}


@bp.get("/batches/<batch_id>")
def get_batch(batch_id: str):
    svc = services()
    batch = _batches(svc).get(batch_id, owner=_caller(svc))
    return batch_document(svc, batch)


@bp.get("/batches/<batch_id>/items")
def list_items(batch_id: str):
    svc = services()
    store = _batches(svc)
    store.get(batch_id, owner=_caller(svc))
    start = _int_arg("cursor", 0, minimum=0)
    limit = _int_arg("limit", DEFAULT_PAGE, minimum=1, maximum=MAX_PAGE)
    items = store.items(batch_id, start=start, count=limit)
    expiry = svc.settings.presign_expiry_s
    page = []
    for item in items:
        figure_key, thumbnail_key = item.info.get("figure_key"), item.info.get("thumbnail_key")
        page.append(
            {
                "id": item.id,
                "name": item.name,
                "status": item.status.value,
                "figure_url": svc.store.presigned_get(figure_key, expiry) if figure_key else None,
                "thumbnail_url": (
                    svc.store.presigned_get(thumbnail_key, expiry) if thumbnail_key else None
                ),
                "error": item.info.get("error"),
            }
        )
    more = start + len(items) < store.item_count(batch_id)
    return {"items": page, "next_cursor": str(start + len(items)) if more else None}


@bp.delete("/batches/<batch_id>")
def cancel_batch(batch_id: str):
    svc = services()
    batch, finalize = _batches(svc).cancel(batch_id, owner=_caller(svc))
    if finalize:
        # Nothing was running: no worker will finish an item, so ask one to write the
        # manifest of what there is.
        svc.producer.send_task(FINALIZE_BATCH, args=[batch_id], queue=BATCH_QUEUE)
    return batch_document(svc, batch), 202


def enqueue_batch(
    svc: Services, batch_id: str, options: JobOptions, source: dict, owner: str
) -> Batch:
    """Write the record and send the expansion task, or undo what was done and 503."""
    store = _batches(svc)
    batch = Batch(
        id=batch_id,
        status=BatchStatus.QUEUED,
        options=options.to_dict(),
        source=source,
        owner=owner,
    )
    undo = [lambda: store.delete(batch_id)]
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


def read_source_request(req: Request, svc: Services, owner: str) -> tuple[JobOptions, dict]:
    body = req.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest('the JSON body must be an object like {"source": "s3://bucket/prefix/"}')
    body = dict(body)
    url = body.pop("source", None)
    if not isinstance(url, str) or not url:
        raise MissingField('JSON field "source" (s3://bucket/prefix/) is required')
    bucket, prefix = parse_source_url(url, service_bucket=svc.settings.s3_bucket)
    if not source_allowed(svc.settings.source_rules, bucket, prefix, owner):
        # The service's credentials may reach buckets the caller has no business reading:
        # only what the operator listed is read on a caller's behalf (a confused deputy).
        raise ForbiddenSource(
            f"source {url!r} is not in FEATUREMAPS_SOURCE_ALLOW for this caller; the operator "
            "lists the s3://bucket/prefix/ entries batches may read"
        )
    options = JobOptions.from_mapping(body)
    return options, {"kind": "s3", "bucket": bucket, "prefix": prefix, "name": url}


def parse_source_url(url: str, *, service_bucket: str) -> tuple[str, str]:
    try:
        bucket, prefix = split_s3_url(url)
    except ValueError as exc:
        raise InvalidOption(f"source {url!r} is not an s3://bucket/prefix/ URL") from exc
    if ".." in prefix.split("/"):
        raise InvalidOption(f"source prefix {prefix!r} may not contain '..'")
    if bucket == service_bucket and (not prefix or prefix.startswith(_PRIVATE_PREFIXES)):
        raise InvalidOption(
            f"source {url!r} points into the service's own data; use a prefix of your own"
        )
    return bucket, prefix


def stream_archive_upload(req: Request, svc: Services, batch_id: str) -> tuple[JobOptions, dict]:
    """Decode the multipart body as it arrives and pipe the archive part into storage."""
    boundary = req.mimetype_params.get("boundary", "")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
    settings = svc.settings
    # The archive is bounded by the archive limit, not by the single-image upload limit.
    req.max_content_length = settings.max_archive_bytes + MAX_FIELD_BYTES * settings.max_form_parts
    events = _events(req.stream, boundary.encode(), settings.max_form_parts)
    fields: dict[str, str] = {}
    source: dict[str, Any] | None = None
    for event in events:
        if isinstance(event, Epilogue):
            break
        if isinstance(event, File) and event.name == ARCHIVE_FIELD and source is None:
            # Refuse bad options before storing anything.
            JobOptions.from_mapping(fields)
            source = _store_archive(svc, batch_id, event.filename, events)
        elif isinstance(event, Field | File):
            fields[event.name] = _read_field(event.name, events)
    if source is None:
        raise MissingField(
            f"send the archive as multipart/form-data field {ARCHIVE_FIELD!r} "
            f"(e.g. curl -F {ARCHIVE_FIELD}=@photos.zip)"
        )
    try:
        options = JobOptions.from_mapping(fields)
    except InvalidOption:
        svc.store.delete_prefix(source["key"])
        raise
    return options, source


def _store_archive(svc: Services, batch_id: str, filename: str, events: Iterator) -> dict:
    part = _PartReader(events)
    head = part.peek(SNIFF_BYTES)
    if not head:
        raise BadRequest(f"the uploaded archive in field {ARCHIVE_FIELD!r} is empty")
    kind = sniff_archive(head, filename)
    key = keys.batch_source_key(batch_id, SOURCE_EXTENSIONS[kind])
    svc.store.put_stream(
        key,
        io.BufferedReader(part),
        content_type="application/octet-stream",
        part_size=MIN_PART_SIZE,
    )
    return {"kind": "archive", "archive": kind, "key": key, "name": filename, "size": part.size}


def _events(stream, boundary: bytes, max_parts: int) -> Iterator:
    """Multipart events, reading the body ``READ_SIZE`` bytes at a time."""
    # No memory limit inside the decoder: file data leaves it as soon as it is decoded, and
    # option fields are bounded by _read_field.
    decoder = MultipartDecoder(boundary, max_parts=max_parts)
    while True:
        try:
            event = decoder.next_event()
        except ValueError as exc:  # the decoder's word for a malformed or cut-short body
            raise BadRequest(f"malformed multipart body: {exc}") from exc
        if event is NEED_DATA:
            decoder.receive_data(stream.read(READ_SIZE) or None)
            continue
        yield event
        if isinstance(event, Epilogue):
            return


def _read_field(name: str, events: Iterator) -> str:
    value = bytearray()
    for event in events:
        if not isinstance(event, Data):
            raise BadRequest("malformed multipart body")
        value += event.data
        if len(value) > MAX_FIELD_BYTES:
            raise PayloadTooLarge(f"form field {name!r} is over {MAX_FIELD_BYTES} bytes")
        if not event.more_data:
            break
    try:
        return value.decode()
    except UnicodeDecodeError as exc:
        raise BadRequest(f"form field {name!r} is not UTF-8 text") from exc


class _PartReader(io.RawIOBase):
    """A readable stream over one multipart part's data events."""

    def __init__(self, events: Iterator) -> None:
        super().__init__()
        self._events = events
        self._buffer = bytearray()
        self._done = False
        self.size = 0  # bytes handed out so far

    def readable(self) -> bool:
        return True

    def peek(self, size: int) -> bytes:
        while len(self._buffer) < size and self._pull():
            pass
        return bytes(self._buffer[:size])

    def readinto(self, target: Any) -> int:
        while not self._buffer and self._pull():
            pass
        count = min(len(target), len(self._buffer))
        target[:count] = self._buffer[:count]
        del self._buffer[:count]
        self.size += count
        return count

    def _pull(self) -> bool:
        if self._done:
            return False
        event = next(self._events, None)
        if not isinstance(event, Data):
            raise BadRequest("malformed multipart body: the archive part ends early")
        self._buffer += event.data
        self._done = not event.more_data
        return True


def _int_arg(name: str, default: int, *, minimum: int, maximum: int | None = None) -> int:
    raw = request.args.get(name, "")
    if not raw:
        return default
    if not raw.isdigit() or int(raw) < minimum or (maximum is not None and int(raw) > maximum):
        bound = f" and {maximum}" if maximum is not None else ""
        raise InvalidOption(f"{name} must be a whole number between {minimum}{bound}")
    return int(raw)


def batch_document(svc: Services, batch: Batch) -> dict:
    doc = batch.to_dict()
    doc["links"] = _links(batch.id)
    if batch.result:
        expiry = svc.settings.presign_expiry_s
        doc["result"] = {
            "manifest_url": svc.store.presigned_get(batch.result["manifest_key"], expiry),
            "archive_url": svc.store.presigned_get(batch.result["archive_key"], expiry),
        }
    return doc


def _links(batch_id: str) -> dict:
    return {
        "self": url_for("batches.get_batch", batch_id=batch_id),
        "items": url_for("batches.list_items", batch_id=batch_id),
        "page": url_for("ui.batch_page", batch_id=batch_id),
    }
