"""Where a batch ends: its results written in shards (a manifest and a zip of figures per
``RESULT_SHARD_ITEMS`` members, each streamed into storage by a task of its own), the batch
closed by whoever writes the last shard, and (unless ``KEEP_INPUTS``) its uploaded archive and
expanded inputs deleted.

``BatchStore`` makes exactly one caller finalize a batch: whoever records its last outcome.
Finalizing plans the shards (worker/batches/result_shards.py) and hands each to ``write_shard``;
every shard's objects have keys fixed by the plan, so a shard written twice leaves the same
objects, and closing an already closed batch changes nothing.

A canceled batch costs the others nothing (docs/design.md "Fair share"): its shards are
written one after another, each sent *behind* the chunk turns waiting (``queued_behind``) by
the shard before it, so at most one of its shard tasks is queued at any time, and the next
batch's expansion and chunks are not held up by the manifests of a canceled million.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

from keeper.restore import delete_spec
from shared import keys
from shared.archives import safe_name
from shared.batches import Batch, BatchStatus, BatchStore, Item, ItemStatus
from shared.errors import FeatureMapsError, RefusedMember
from shared.storage import MIN_PART_SIZE
from worker.batches import IO_THREADS
from worker.batches.examples import (
    DispatchSlice,
    plan_examples,
    record_slice,
    render_slice,
    write_partial,
)
from worker.batches.result_shards import ResultShards
from worker.batches.streams import IterReader, pages, stream_zip
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)

MANIFEST_PAGE = 256

# How a shard is handed on: in a worker, a task sent by name; in tests, a plain call. The
# flag: send it behind the chunk turns waiting (a canceled batch's shards) rather than ahead.
DispatchShard = Callable[..., None]


def result_shards(ctx: WorkerContext) -> ResultShards:
    return ResultShards(ctx.redis, ttl_s=ctx.settings.job_ttl_s)


def finalize_batch(
    ctx: WorkerContext,
    batch_id: str,
    dispatch_shard: DispatchShard,
    dispatch_slice: DispatchSlice = None,
) -> int:
    """Plan the batch's result shards and dispatch each one not written yet; returns how
    many shards the batch has. When all are written already (the task closing the batch
    died), go on from there (dataset examples, then close)."""
    shards = result_shards(ctx)
    plan = shards.plan(
        batch_id,
        total=ctx.batches.item_count(batch_id),
        size=ctx.settings.result_shard_items,
    )
    missing = _unwritten(shards, batch_id, plan.count)
    log.info("batch %s: %d result shards, %d to write", batch_id, plan.count, len(missing))
    if missing and ctx.batches.get(batch_id).status == BatchStatus.CANCELED:
        dispatch_shard(batch_id, missing[0], queued_behind=True)  # one at a time
    else:
        for shard in missing:
            dispatch_shard(batch_id, shard)
    if not missing:
        results_written(ctx, batch_id, plan.count, dispatch_slice)
    return plan.count


def write_shard(
    ctx: WorkerContext,
    batch_id: str,
    shard: int,
    dispatch_slice: DispatchSlice = None,
    dispatch_shard: DispatchShard | None = None,
) -> str:
    """Write shard ``shard``'s manifest lines, zip of figures and (with dataset examples)
    partial top lists; the writer of the last shard goes on to the examples or closes the
    batch. Returns the batch's status, ``written``, or ``examples`` while those run."""
    store, shards = ctx.batches, result_shards(ctx)
    plan = shards.planned(batch_id)
    first, count = plan.span(shard)
    batch = store.get(batch_id)
    fmt = batch.options.get("format", "jpg")
    manifest_key, archive_key = keys.batch_result_keys(batch_id, shard, plan.count)
    lines = _manifest_lines(_shard_items(store, batch_id, first, count), fmt)
    ctx.store.put_stream(
        manifest_key,
        IterReader(line.encode() for line in lines),
        content_type="application/x-ndjson",
        part_size=MIN_PART_SIZE,
    )
    figures = _figures(ctx, _shard_items(store, batch_id, first, count), fmt)
    # Entries dated by the batch's submission: a shard written again is the same bytes.
    submitted = datetime.fromisoformat(batch.created_at).timetuple()[:6]
    stream_zip(ctx.store, archive_key, figures, date_time=submitted)
    if batch.options.get("examples"):
        write_partial(ctx, batch, shard, _shard_items(store, batch_id, first, count))
    summary = {
        "index": shard,
        "first": first,
        "items": count,
        "manifest_key": manifest_key,
        "archive_key": archive_key,
    }
    if shards.record(batch_id, shard, summary) < plan.count:
        if batch.status == BatchStatus.CANCELED and dispatch_shard is not None:
            _next_canceled_shard(shards, batch_id, shard, plan.count, dispatch_shard)
        return "written"
    return results_written(ctx, batch_id, plan.count, dispatch_slice)


def _next_canceled_shard(
    shards: ResultShards, batch_id: str, shard: int, count: int, dispatch_shard: DispatchShard
) -> None:
    """A canceled batch's shards run one at a time: send the next one not written (after this
    one, else the first), behind the turns waiting."""
    missing = _unwritten(shards, batch_id, count)
    later = [n for n in missing if n > shard]
    if missing:
        dispatch_shard(batch_id, (later or missing)[0], queued_behind=True)


def _unwritten(shards: ResultShards, batch_id: str, count: int) -> list[int]:
    """The batch's shards (1 to ``count``) not written yet, in order."""
    written = {s["index"] for s in shards.written(batch_id)}
    return [n for n in range(1, count + 1) if n not in written]


def results_written(
    ctx: WorkerContext, batch_id: str, shards: int, dispatch_slice: DispatchSlice
) -> str:
    """Every result shard is written: gather the dataset examples (when the batch has them
    and is not closed yet), or close the batch."""
    batch = ctx.batches.get(batch_id)
    if batch.result is not None or not batch.options.get("examples"):
        return close_batch(ctx, batch_id)
    examples_key = plan_examples(ctx, batch_id, shards, dispatch_slice)
    if examples_key is None:
        return "examples"
    return close_batch(ctx, batch_id, examples_key=examples_key)


def render_examples(ctx: WorkerContext, batch_id: str, n: int) -> str:
    """Example slice ``n`` of the batch; whoever records the last one closes the batch.
    Returns the batch's status, or ``rendered``."""
    examples_key = render_slice(ctx, batch_id, n)
    if examples_key is None:
        return "rendered"
    return close_batch(ctx, batch_id, examples_key=examples_key)


def fail_examples(ctx: WorkerContext, batch_id: str, n: int, code: str, message: str) -> None:
    """Slice ``n`` gave up: its tiles stay blank (``missing``), and the batch still closes."""
    log.warning("batch %s: example slice %d gave up (%s): %s", batch_id, n, code, message)
    summary = {"index": n, "missing": True, "error": {"code": code, "message": message}}
    examples_key = record_slice(ctx, batch_id, n, summary)
    if examples_key is not None:
        close_batch(ctx, batch_id, examples_key=examples_key)


def close_batch(ctx: WorkerContext, batch_id: str, *, examples_key: str | None = None) -> str:
    """Complete the batch with every shard's keys (and its examples'), once: a batch with a
    result is closed already. Returns its final status."""
    store = ctx.batches
    batch = store.get(batch_id)
    if batch.result is not None:
        return batch.status.value
    result = batch_result(result_shards(ctx).written(batch_id))
    if examples_key:
        result["examples_key"] = examples_key
    status = store.complete(batch_id, result)
    log.info("batch %s finalized: %s", batch_id, status)
    release_batch_inputs(ctx, batch)
    return status


def batch_result(shards: list[dict[str, Any]]) -> dict[str, Any]:
    """The batch's ``result``: its shards, and for a single one its keys as before shards."""
    single = shards[0] if len(shards) == 1 else {}
    return {
        "manifest_key": single.get("manifest_key"),
        "archive_key": single.get("archive_key"),
        "shards": shards,
    }


def release_batch_inputs(ctx: WorkerContext, batch: Batch) -> None:
    """Delete a finalized batch's spec (keeper/restore.py) and, unless
    FEATUREMAPS_KEEP_INPUTS, its uploaded archive and its expanded inputs, by listing their
    prefixes; if storage is down now, the retention sweep deletes them with the rest of the
    batch's objects."""
    try:
        delete_spec(ctx.store, "batch", batch.id)
        if ctx.settings.keep_inputs:
            return
        for prefix in keys.batch_inputs_prefixes(batch.id):
            ctx.store.delete_prefix(prefix)
        if batch.source.get("key"):
            ctx.store.delete_keys([batch.source["key"]])
    except FeatureMapsError as exc:
        log.warning("batch %s: inputs not deleted now (retention will): %s", batch.id, exc)


def _shard_items(store: BatchStore, batch_id: str, first: int, count: int) -> Iterator[Item]:
    """The items at positions ``first`` .. ``first + count - 1``, a page at a time."""
    end = first + count
    for start in range(first, end, MANIFEST_PAGE):
        yield from store.items(batch_id, start=start, count=min(MANIFEST_PAGE, end - start))


def _manifest_lines(items: Iterator[Item], fmt: str) -> Iterator[str]:
    names = _ArcNames(fmt)
    for item in items:
        line: dict[str, Any] = {"item_id": item.id, "name": item.name, "status": item.status}
        if item.status is ItemStatus.SUCCEEDED:
            line["figure"] = names.for_item(item.id, item.name)
            line["figure_key"] = item.info["figure_key"]
            line["manifest_key"] = item.info["manifest_key"]
            if item.info.get("reused_from"):
                line["reused_from"] = item.info["reused_from"]
        if item.info.get("error"):
            line["error"] = item.info["error"]
        if item.info.get("skip_reason"):
            line["skip_reason"] = item.info["skip_reason"]
        yield json.dumps(line) + "\n"


def _figures(ctx: WorkerContext, items: Iterator[Item], fmt: str) -> Iterator[tuple[str, bytes]]:
    """(name in the shard's zip, figure bytes) for every succeeded item, fetched a page at a
    time in parallel so only one page of figures is in memory."""
    names = _ArcNames(fmt)
    succeeded = (i for i in items if i.status is ItemStatus.SUCCEEDED)
    with ThreadPoolExecutor(IO_THREADS) as pool:
        for page in pages(succeeded, IO_THREADS * 4):
            datas = pool.map(lambda i: ctx.store.get_bytes(i.info["figure_key"]), page)
            for item, data in zip(page, datas, strict=True):
                yield names.for_item(item.id, item.name), data


class _ArcNames:
    """The figure's name inside a shard's zip: the member's name plus the figure's extension,
    never absolute or climbing, and unique within the shard (archives may hold one name
    twice: a name seen earlier in the shard gets the item id before its extension). Across
    shards the same name can recur; the client applies the same rule when it extracts."""

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
