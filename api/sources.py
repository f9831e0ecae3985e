"""Batch sources already in a bucket (``{"source": "s3://bucket/prefix/"}``): the URL parsed,
and the policy on what the service reads on a caller's behalf. The allow-list itself
(``FEATUREMAPS_SOURCE_ALLOW``) is parsed and matched in ``shared/access.py``;
docs/security.md says why."""

from __future__ import annotations

from typing import NamedTuple

from flask import Request

from shared import keys
from shared.access import source_allowed, split_s3_url
from shared.errors import BadRequest, ForbiddenSource, InvalidOption, MissingField
from shared.options import ARCHIVE_ENCODING_FIELD, JobOptions
from shared.settings import Settings
from shared.webhooks import (
    CALLBACK_FIELD,
    ITEM_CALLBACKS_FIELD,
    accepted_callback_url,
    accepted_item_callbacks,
)

# Parts of the service's own bucket that a source prefix may never read: other users' data.
PRIVATE_PREFIXES = keys.SERVICE_PREFIXES


class BatchRequest(NamedTuple):
    """A batch request as read: its options, its source, its checked callback URL, and the
    spacing of its item calls (0 without ``item_callbacks``)."""

    options: JobOptions
    source: dict
    callback_url: str | None
    item_callback_spacing_s: float = 0.0


def read_source_request(req: Request, settings: Settings, owner: str) -> BatchRequest:
    """The options, the source and the callback URL of a JSON batch request, once ``owner``
    may read the source."""
    body = req.get_json(silent=True)
    if not isinstance(body, dict):
        raise BadRequest('the JSON body must be an object like {"source": "s3://bucket/prefix/"}')
    body = dict(body)
    url = body.pop("source", None)
    if not isinstance(url, str) or not url:
        raise MissingField('JSON field "source" (s3://bucket/prefix/) is required')
    bucket, prefix = parse_source_url(url, service_bucket=settings.s3_bucket)
    if not source_allowed(settings.source_rules, bucket, prefix, owner):
        # The service's credentials may reach buckets the caller has no business reading:
        # only what the operator listed is read on a caller's behalf (a confused deputy).
        raise ForbiddenSource(
            f"source {url!r} is not in FEATUREMAPS_SOURCE_ALLOW for this caller; the operator "
            "lists the s3://bucket/prefix/ entries batches may read"
        )
    if body.pop(ARCHIVE_ENCODING_FIELD, None) not in (None, ""):
        raise InvalidOption(
            f"{ARCHIVE_ENCODING_FIELD} applies to an uploaded archive; the keys of an s3:// "
            "source are UTF-8 already"
        )
    callback_url = accepted_callback_url(body.pop(CALLBACK_FIELD, None), settings)
    spacing = accepted_item_callbacks(body.pop(ITEM_CALLBACKS_FIELD, None), callback_url, settings)
    options = JobOptions.for_batch(body)
    source = {"kind": "s3", "bucket": bucket, "prefix": prefix, "name": url}
    return BatchRequest(options, source, callback_url, spacing)


def parse_source_url(url: str, *, service_bucket: str) -> tuple[str, str]:
    """``(bucket, prefix)`` of an ``s3://`` URL; :class:`InvalidOption` for anything else, a
    ``..`` segment, or the service's own data."""
    try:
        bucket, prefix = split_s3_url(url)
    except ValueError as exc:
        raise InvalidOption(f"source {url!r} is not an s3://bucket/prefix/ URL") from exc
    if ".." in prefix.split("/"):
        raise InvalidOption(f"source prefix {prefix!r} may not contain '..'")
    # A listing by prefix reaches every key that starts with it: "inputs" or "in" reach
    # "inputs/…" as surely as "inputs/" does, so a prefix is refused when it starts with a
    # private prefix or a private prefix starts with it ("" included).
    private = any(prefix.startswith(p) or p.startswith(prefix) for p in PRIVATE_PREFIXES)
    if bucket == service_bucket and private:
        raise InvalidOption(
            f"source {url!r} points into the service's own data; use a prefix of your own"
        )
    return bucket, prefix
