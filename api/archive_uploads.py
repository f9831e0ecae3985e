"""Reading a batch's archive upload without holding it: the multipart body is decoded from
``request.stream`` with Werkzeug's incremental decoder, and the archive part is piped into
``ObjectStore.put_stream`` one multipart-upload part (5 MiB) at a time. Its first bytes are
sniffed before anything is stored, so a non-archive is a 415 with nothing left behind.
(A single image is small enough for Werkzeug's own parser: ``api/uploads.py``.)
"""

from __future__ import annotations

import hashlib
import io
from collections.abc import Iterator
from typing import Any

from flask import Request
from werkzeug.exceptions import RequestEntityTooLarge
from werkzeug.sansio.multipart import NEED_DATA, Data, Epilogue, Field, File, MultipartDecoder

from api.sources import BatchRequest
from shared import keys
from shared.archives import SNIFF_BYTES, SOURCE_EXTENSIONS, sniff_archive
from shared.errors import BadRequest, MissingField, PayloadTooLarge
from shared.options import ARCHIVE_ENCODING_FIELD, JobOptions, parse_archive_encoding
from shared.settings import Settings
from shared.storage import MIN_PART_SIZE, ObjectStore
from shared.webhooks import (
    CALLBACK_FIELD,
    ITEM_CALLBACKS_FIELD,
    accepted_callback_url,
    accepted_item_callbacks,
)

ARCHIVE_FIELD = "archive"
READ_SIZE = 64 * 1024
# Option fields are tiny; anything bigger is not an option.
MAX_FIELD_BYTES = 4096


def stream_archive_upload(
    req: Request, settings: Settings, store: ObjectStore, batch_id: str
) -> BatchRequest:
    """The options, the stored source and the callbacks of a multipart batch request;
    the archive goes to storage as it arrives. 413 over the archive or form-part limit."""
    try:
        return _stream_archive_upload(req, settings, store, batch_id)
    except RequestEntityTooLarge as exc:
        raise PayloadTooLarge(
            f"the archive is over the limit of {settings.max_archive_bytes} bytes "
            f"(MAX_ARCHIVE_BYTES) or has more than {settings.max_form_parts} form parts"
        ) from exc


def _stream_archive_upload(
    req: Request, settings: Settings, store: ObjectStore, batch_id: str
) -> BatchRequest:
    """Decode the multipart body as it arrives and pipe the archive part into storage."""
    boundary = req.mimetype_params.get("boundary", "")
    if not boundary:
        raise BadRequest("multipart/form-data without a boundary")
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
            JobOptions.for_batch(_job_options(fields))
            parse_archive_encoding(fields.get(ARCHIVE_ENCODING_FIELD))
            source = _store_archive(store, batch_id, event.filename, events)
        elif isinstance(event, Field | File):
            fields[event.name] = _read_field(event.name, events)
    if source is None:
        raise MissingField(
            f"send the archive as multipart/form-data field {ARCHIVE_FIELD!r} "
            f"(e.g. curl -F {ARCHIVE_FIELD}=@photos.zip)"
        )
    try:
        callback_url = accepted_callback_url(fields.get(CALLBACK_FIELD), settings)
        spacing = accepted_item_callbacks(fields.get(ITEM_CALLBACKS_FIELD), callback_url, settings)
        options = JobOptions.for_batch(_job_options(fields))
        encoding = parse_archive_encoding(fields.get(ARCHIVE_ENCODING_FIELD))
    except BadRequest:
        store.delete_prefix(source["key"])
        raise
    if encoding:
        # How the archive's names are read; not an option: the figures do not change.
        source["encoding"] = encoding
    return BatchRequest(options, source, callback_url, spacing)


def _job_options(fields: dict[str, str]) -> dict[str, str]:
    """The fields that are job options: not the callbacks, not the archive's encoding."""
    batch_only = (CALLBACK_FIELD, ITEM_CALLBACKS_FIELD, ARCHIVE_ENCODING_FIELD)
    return {k: v for k, v in fields.items() if k not in batch_only}


def _store_archive(store: ObjectStore, batch_id: str, filename: str, events: Iterator) -> dict:
    part = _PartReader(events)
    head = part.peek(SNIFF_BYTES)
    if not head:
        raise BadRequest(f"the uploaded archive in field {ARCHIVE_FIELD!r} is empty")
    kind = sniff_archive(head, filename)
    key = keys.batch_source_key(batch_id, SOURCE_EXTENSIONS[kind])
    store.put_stream(
        key,
        io.BufferedReader(part),
        content_type="application/octet-stream",
        part_size=MIN_PART_SIZE,
    )
    return {
        "kind": "archive",
        "archive": kind,
        "key": key,
        "name": filename,
        "size": part.size,
        "sha256": part.digest.hexdigest(),
    }


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
        self.digest = hashlib.sha256()  # of those bytes (Idempotency-Key compares it)

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
        self.digest.update(self._buffer[:count])
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
