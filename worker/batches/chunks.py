"""Where a chunk of a batch's items runs: inputs in, model pass, outputs stored, outcomes
recorded.

A chunk requests all its inputs in parallel, runs them through the model in tensor batches
(:func:`worker.compute.pipeline.process_images`; on the CPU in slices of ``CPU_MODEL_BATCH``, each
starting as soon as its inputs are in, while the previous slice's outputs upload), and records
all outcomes in one atomic step; whoever records the batch's last outcome has it finalized.
Before a slice's model pass, :class:`worker.reuse.ChunkReuse` takes out the items whose result
can be copied from an earlier one or shared with the same bytes earlier in the chunk.
Storage errors propagate for the task to retry; the delivery token lets a retry resume the
items it started, and the delivery's fence drops its outcomes once it was handed over.

A chunk delivered again after its worker was lost (a crash, a SIGKILL, the hard time limit,
a lost node: more starts than storage retries explain) runs *one item at a time*, recording
each outcome as soon as it has it, so the item that was running when a worker died is the
first one left the next time. That item is failed ``worker_lost`` without running once it
has been first in line when its chunk's worker was lost ``MAX_ATTEMPTS`` times: an input that
kills its worker every time ends, and the rest of its chunk goes on.
"""

from __future__ import annotations

import logging
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

from shared.batches import ItemStatus, batch_key
from shared.errors import (
    INTERNAL_ERROR,
    LOST,
    WORKER_LOST,
    FeatureMapsError,
    NotFound,
    StorageUnavailable,
)
from shared.leases import UNFENCED, Fence, LeaseLost
from shared.options import JobOptions
from worker import metrics
from worker.batches import IO_THREADS, Finalize
from worker.execute import attempt_of, drop_attempt, drop_other_attempts, upload_outputs
from worker.reuse import ChunkReuse, Reused
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Delivery:
    """A chunk as one delivery runs it: the token its items are started with (the task id,
    kept by redeliveries and handovers of the same message), how it has the batch finalized,
    and its lease's fence."""

    token: str
    finalize: Finalize
    fence: Fence = UNFENCED
    # how many times this message was retried for storage (Celery's request.retries): starts
    # beyond these and the first are deliveries whose worker was lost
    retries: int = 0


def run_chunk(ctx: WorkerContext, batch_id: str, ids: list[str], delivery: Delivery) -> int:
    """Process the chunk's items that are still queued (or were started by this same
    delivery); returns how many were processed. Storage errors propagate for a retry.
    Outputs go to the folder of this delivery's attempt (shared/keys.py); once its work was
    handed over (:class:`LeaseLost`, whichever step finds it), what it uploaded is deleted."""
    attempt = attempt_of(delivery.fence)
    try:
        return _run_chunk(ctx, batch_id, ids, delivery, attempt)
    except LeaseLost:
        drop_attempt(ctx.store, ids, attempt)
        raise


def _run_chunk(
    ctx: WorkerContext, batch_id: str, ids: list[str], delivery: Delivery, attempt: str
) -> int:
    store = ctx.batches
    started = store.start_items(batch_id, ids, token=delivery.token, fence=delivery.fence)
    if len(started) < len(ids) and store.settle_canceled(batch_id, ids):
        delivery.finalize(batch_id)  # a canceled batch whose last queued items were these
    if not started:
        _finalize_if_lost(ctx, batch_id, delivery)
        return 0
    batch = store.get(batch_id)
    options = JobOptions.from_mapping(batch.options)
    try:
        loaded = ctx.model_for(options, batch.owner)
    except StorageUnavailable:
        raise
    except FeatureMapsError as exc:
        # The model is not to be had (a deleted upload, weights not available): every item
        # fails with that code.
        _fail_started(ctx, batch_id, started, delivery, exc.code, exc.message)
        return len(started)
    items = store.get_items(batch_id, started)
    reuse = ChunkReuse(ctx, options, batch.owner, loaded, attempt=attempt)
    lost = items[started[0]].attempts - 1 - delivery.retries if started[0] in items else 0
    if lost > 0:
        return _one_at_a_time(ctx, batch_id, started, items, options, reuse, delivery, lost, loaded)
    step = _model_slice(ctx, len(started))
    with ThreadPoolExecutor(IO_THREADS) as pool:
        # Every input is requested at once; a slice goes through the model as soon as its
        # own inputs are in, and its outputs upload while the next slice computes.
        downloads = [pool.submit(_download, ctx, items[i].info) for i in started]
        uploads, results = [], []
        for start in range(0, len(started), step):
            part = started[start : start + step]
            inputs = [download.result() for download in downloads[start : start + step]]
            part_results = reuse.results(
                part, inputs, lambda todo: _process(ctx, loaded, todo, options)
            )
            ctx.leases.check(delivery.fence, f"chunk of batch {batch_id}")
            results += part_results
            uploads += [
                pool.submit(_store_outcome, ctx, reuse, i, items[i].info, result)
                for i, result in zip(part, part_results, strict=True)
            ]
        outcomes = [upload.result() for upload in uploads]
    metrics.chunk_done(results)
    finished = _record(ctx, batch_id, outcomes, delivery, reuse, items)
    reuse.remember([i for i, status, _ in outcomes if status == ItemStatus.SUCCEEDED])
    if finished:
        delivery.finalize(batch_id)
    ctx.jobs_done += len(started)
    return len(started)


# At most one finalize re-sent per batch per this many seconds by chunks that find their
# items final (a canceled batch's queued chunks all do).
REFINALIZE_EVERY_S = 60


def _finalize_if_lost(ctx: WorkerContext, batch_id: str, delivery: Delivery) -> None:
    """None of the chunk's items could start: they are final. If the batch was to be
    finalized (``finalizing`` is set by the step that recorded its last outcome) and is not
    closed, the delivery that recorded it may have died, or failed to publish, before
    sending the finalize: send it again. Finalizing twice writes the same objects and closes
    the batch once; the Redis key bounds it to one re-send per ``REFINALIZE_EVERY_S``."""
    # Two fields, not the whole record: a canceled batch's queued chunks all come here.
    finalizing, result = ctx.redis.hmget(batch_key(batch_id), "finalizing", "result")
    if finalizing not in (b"1", "1") or result is not None:
        return
    key = f"{batch_key(batch_id)}:refinalize"
    if ctx.redis.set(key, "1", nx=True, ex=REFINALIZE_EVERY_S):
        log.warning("batch %s: finalizing but not closed; finalize sent again", batch_id)
        metrics.repaired("finalize")
        delivery.finalize(batch_id)


def _one_at_a_time(
    ctx: WorkerContext,
    batch_id: str,
    started: list[str],
    items: dict,
    options: JobOptions,
    reuse: ChunkReuse,
    delivery: Delivery,
    lost: int,
    loaded: Any,
) -> int:
    """A chunk whose worker was lost ``lost`` times before: each item is computed, stored and
    recorded before the next starts; the first is failed ``worker_lost`` instead once it
    was in line when the worker was lost ``MAX_ATTEMPTS`` times."""
    results = []
    log.warning(
        "chunk of batch %s: its worker was lost %d time(s); running its %d item(s) one at a time",
        batch_id,
        lost,
        len(started),
    )
    for position, item in enumerate(started):
        info = items[item].info
        if position == 0 and lost >= ctx.settings.max_attempts:
            message = (
                f"its worker was lost {lost} times while this item was being processed "
                "(an input that crashes the worker, or a node lost each time)"
            )
            error = {"code": WORKER_LOST, "message": message}
            outcome = (item, ItemStatus.FAILED, {**info, "error": error})
            metrics.images_failed("batch", WORKER_LOST, 1)
        else:
            inputs = [_download(ctx, info)]
            (result,) = reuse.results(
                [item], inputs, lambda todo: _process(ctx, loaded, todo, options)
            )
            ctx.leases.check(delivery.fence, f"chunk of batch {batch_id}")
            results.append(result)
            outcome = _store_outcome(ctx, reuse, item, info, result)
        if _record(ctx, batch_id, [outcome], delivery, reuse, items):
            delivery.finalize(batch_id)
        if outcome[1] == ItemStatus.SUCCEEDED:
            reuse.remember([item])
    metrics.chunk_done(results)
    ctx.jobs_done += len(started)
    return len(started)


def fail_chunk(
    ctx: WorkerContext, batch_id: str, ids: list[str], delivery: Delivery, code: str, message: str
) -> None:
    """End the chunk's items that this delivery holds as failed (retries exhausted, time
    limit, a bug): one broken chunk must not leave its batch running for ever."""
    started = ctx.batches.start_items(batch_id, ids, token=delivery.token, fence=delivery.fence)
    _fail_started(ctx, batch_id, started, delivery, code, message)


def _fail_started(
    ctx: WorkerContext,
    batch_id: str,
    started: list[str],
    delivery: Delivery,
    code: str,
    message: str,
) -> None:
    store = ctx.batches
    items = store.get_items(batch_id, started)
    error = {"code": code, "message": message}
    outcomes = [(i, ItemStatus.FAILED, {**items[i].info, "error": error}) for i in started]
    if outcomes and store.finish_items(batch_id, outcomes, fence=delivery.fence):
        delivery.finalize(batch_id)
    metrics.images_failed("batch", code, len(outcomes))


def _model_slice(ctx: WorkerContext, count: int) -> int:
    """Images per model pass: the pipeline's CPU slice, or the whole chunk on a GPU."""
    from worker.compute.pipeline import CPU_MODEL_BATCH

    return count if ctx.loaded.device.type == "cuda" else CPU_MODEL_BATCH


def _download(ctx: WorkerContext, info: dict[str, Any]) -> bytes | FeatureMapsError:
    """The item's input: its range of its block's pack (one ranged GET)."""
    offset, length = info["input_range"]
    try:
        with metrics.timed("fetch"):
            return ctx.store.get_range(info["input_key"], offset, length)
    except NotFound as exc:
        return FeatureMapsError(f"the input is gone from storage: {exc.message}", code=LOST)


def _process(
    ctx: WorkerContext, loaded: Any, inputs: list[bytes | FeatureMapsError], options: JobOptions
) -> list[Any]:
    from worker.compute.pipeline import process_images

    max_pixels = ctx.settings.max_image_pixels
    present = [i for i, data in enumerate(inputs) if isinstance(data, bytes)]
    results: list[Any] = list(inputs)
    try:
        batch_results = process_images(
            loaded, [inputs[i] for i in present], options, max_pixels=max_pixels
        )
    except (StorageUnavailable, MemoryError):
        raise
    except FeatureMapsError as exc:
        # Options this model cannot do: every image fails with that code.
        batch_results = [exc for _ in present]
    except Exception:
        # One image that breaks the batched pass must not fail the others: run them one by
        # one so only the culprit fails.
        log.exception("batched pass failed; running the chunk's images one at a time")
        batch_results = [_process_one(ctx, loaded, inputs[i], options) for i in present]
    metrics.model_pass(batch_results)
    for position, result in zip(present, batch_results, strict=True):
        results[position] = result
    return results


def _process_one(ctx: WorkerContext, loaded: Any, data: Any, options: JobOptions) -> Any:
    from worker.compute.pipeline import process_images

    try:
        (result,) = process_images(
            loaded, [data], options, max_pixels=ctx.settings.max_image_pixels
        )
    except Exception as exc:
        log.exception("image failed on its own")
        return FeatureMapsError(f"{type(exc).__name__}: {exc}", code=INTERNAL_ERROR)
    return result


# What an item's record keeps of its stored outputs (the items page presigns these).
_ITEM_KEYS = ("figure_key", "thumbnail_key", "manifest_key", "scores_key")


def _record(
    ctx: WorkerContext,
    batch_id: str,
    outcomes: list[tuple[str, ItemStatus, dict]],
    delivery: Delivery,
    reuse: ChunkReuse,
    items: dict,
) -> bool:
    """Record outcomes under the delivery's fence; True when they were the batch's last.
    Only recorded keys count (shared/keys.py): once recorded, what earlier attempts of its
    redelivered items (started more than once) left is deleted."""
    finished = ctx.batches.finish_items(batch_id, outcomes, fence=delivery.fence)
    for item, _, _ in outcomes:
        if item in items and items[item].attempts > 1:
            drop_other_attempts(ctx.store, item, reuse.attempt)
    return finished


def _store_outcome(
    ctx: WorkerContext, reuse: ChunkReuse, item: str, info: dict, result: Any
) -> tuple[str, ItemStatus, dict]:
    if isinstance(result, FeatureMapsError):
        return item, ItemStatus.FAILED, {**info, "error": result.to_dict()}
    if isinstance(result, Reused):
        stored = result.stored
    else:
        stored = upload_outputs(ctx, item, result, attempt=reuse.attempt, with_input_preview=False)
    reuse.stored[item] = stored
    # The folder of its keys (shared/item_codec.py derives them from it).
    kept = {k: stored[k] for k in _ITEM_KEYS if k in stored} | {"attempt": reuse.attempt}
    if result.reused_from:
        kept.update(reused=True, reused_from=result.reused_from)
    return item, ItemStatus.SUCCEEDED, {**info, **kept}
