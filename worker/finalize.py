"""Where a batch ends: ``manifest.jsonl`` and ``results.zip`` streamed into storage, the batch
closed, and (unless ``KEEP_INPUTS``) its uploaded archive and expanded inputs deleted.

``BatchStore`` makes exactly one caller finalize a batch: whoever records its last outcome.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shared import keys
from shared.archives import safe_name
from shared.batches import Batch, BatchStore, ItemStatus
from shared.errors import FeatureMapsError, RefusedMember
from shared.storage import MIN_PART_SIZE
from worker.batches import IO_THREADS, batch_store
from worker.runtime import WorkerContext
from worker.streams import IterReader, pages, stream_zip

log = logging.getLogger(__name__)

MANIFEST_PAGE = 256


def finalize_batch(ctx: WorkerContext, batch_id: str) -> str:
    """Write ``manifest.jsonl`` (one line per member) and ``results.zip`` (every figure),
    each streamed into storage, then close the batch; returns its final status."""
    store = batch_store(ctx)
    batch = store.get(batch_id)
    fmt = batch.options.get("format", "jpg")
    lines = _manifest_lines(store, batch_id, fmt)
    manifest_key = keys.batch_manifest_key(batch_id)
    ctx.store.put_stream(
        manifest_key,
        IterReader(line.encode() for line in lines),
        content_type="application/x-ndjson",
        part_size=MIN_PART_SIZE,
    )
    archive_key = keys.batch_results_key(batch_id)
    stream_zip(ctx.store, archive_key, _figures(ctx, store, batch_id, fmt))
    status = store.complete(batch_id, {"manifest_key": manifest_key, "archive_key": archive_key})
    log.info("batch %s finalized: %s", batch_id, status)
    if not ctx.settings.keep_inputs:
        release_batch_inputs(ctx, store, batch)
    return status


def release_batch_inputs(ctx: WorkerContext, store: BatchStore, batch: Batch) -> None:
    """Delete a finalized batch's uploaded archive and its items' inputs; if storage is down
    now, the retention sweep deletes them with the rest of the batch's objects."""
    inputs = [
        item.info["input_key"]
        for item in store.iter_items(batch.id, page=MANIFEST_PAGE)
        if item.info.get("input_key")
    ]
    if batch.source.get("key"):
        inputs.append(batch.source["key"])
    try:
        ctx.store.delete_keys(inputs)
    except FeatureMapsError as exc:
        log.warning("batch %s: inputs not deleted now (retention will): %s", batch.id, exc)


def _manifest_lines(store: BatchStore, batch_id: str, fmt: str) -> Iterator[str]:
    names = _ArcNames(fmt)
    for item in store.iter_items(batch_id, page=MANIFEST_PAGE):
        line: dict[str, Any] = {"item_id": item.id, "name": item.name, "status": item.status}
        if item.status is ItemStatus.SUCCEEDED:
            line["figure"] = names.for_item(item.id, item.name)
            line["figure_key"] = item.info["figure_key"]
            line["manifest_key"] = item.info["manifest_key"]
            if item.info.get("reused_from"):
                line["reused_from"] = item.info["reused_from"]
        if item.info.get("error"):
            line["error"] = item.info["error"]
        yield json.dumps(line) + "\n"


def _figures(
    ctx: WorkerContext, store: BatchStore, batch_id: str, fmt: str
) -> Iterator[tuple[str, bytes]]:
    """(name in results.zip, figure bytes) for every succeeded item, fetched a page at a
    time in parallel so only one page of figures is in memory."""
    names = _ArcNames(fmt)
    succeeded = (i for i in store.iter_items(batch_id) if i.status is ItemStatus.SUCCEEDED)
    with ThreadPoolExecutor(IO_THREADS) as pool:
        for page in pages(succeeded, IO_THREADS * 4):
            datas = pool.map(lambda i: ctx.store.get_bytes(i.info["figure_key"]), page)
            for item, data in zip(page, datas, strict=True):
                yield names.for_item(item.id, item.name), data


class _ArcNames:
    """The figure's name inside results.zip: the member's name plus the figure's extension,
    made unique (archives may hold one name twice) and never absolute or climbing."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.seen: set[str] = set()

    def for_item(self, item: str, name: str) -> str:
        try:
            base = safe_name(name)
        except RefusedMember:
            base = item
        arcname = f"figures/{base}.{self.fmt}"
        if arcname in self.seen:
            arcname = f"figures/{base}.{item}.{self.fmt}"
        self.seen.add(arcname)
        return arcname
