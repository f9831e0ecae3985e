"""Celery tasks for batches: thin wrappers that pass ids and call ``worker/batches.py``.

Storage errors are retried with backoff (the same delivery token is kept across retries, so
a chunk resumes the items it started); when retries run out, or the time limit or a bug ends
a task, its items (or the expansion) end ``failed`` so the batch still completes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import Task
from celery.exceptions import Reject, SoftTimeLimitExceeded
from redis.exceptions import RedisError

from shared.errors import StorageUnavailable
from shared.queue import BATCH_QUEUE, EXPAND_BATCH, FINALIZE_BATCH, RUN_BATCH_CHUNK
from worker import runtime
from worker.batches import (
    batch_store,
    expand_batch,
    fail_chunk,
    fail_expansion,
    finalize_batch,
    run_chunk,
)
from worker.celery_app import app, settings

log = logging.getLogger(__name__)


def _dispatch(batch_id: str, item_ids: list[str]) -> None:
    app.send_task(RUN_BATCH_CHUNK, args=[batch_id, item_ids], queue=BATCH_QUEUE)


def _finalize(batch_id: str) -> None:
    # A task of its own, so that writing the manifest gets its own storage retries.
    app.send_task(FINALIZE_BATCH, args=[batch_id], queue=BATCH_QUEUE)


def _guarded(
    task: Task, what: str, work: Callable[[], object], give_up: Callable[[str, str], None]
):
    """Run ``work``; retry storage errors with backoff; otherwise end the work through
    ``give_up(code, message)`` instead of leaving the batch waiting for it."""
    ctx = runtime.context()
    try:
        return work()
    except StorageUnavailable as exc:
        retries = task.request.retries
        if retries >= ctx.settings.storage_retries:
            give_up(exc.code, f"{exc.message} (gave up after {retries} retries)")
            return "failed"
        delay = ctx.settings.storage_retry_backoff_s * 2**retries
        log.warning("%s: storage unavailable, retry %d in %.1fs", what, retries + 1, delay)
        # Celery's own limit (3 unless told) must not end the ladder before the count above.
        raise task.retry(exc=exc, countdown=delay, max_retries=retries + 1) from exc
    except RedisError as exc:
        # The batch store itself is unreachable. A plain failure would make Celery reject
        # the message without requeueing it and the batch would wait for ever; requeue it
        # (or, with Redis still down, it comes back after the visibility timeout).
        raise Reject(exc, requeue=True) from exc
    except SoftTimeLimitExceeded:
        limit = task.soft_time_limit or ctx.settings.task_soft_time_limit_s
        give_up("timeout", f"{what} ran past its time limit of {limit}s")
        return "failed"
    except Exception as exc:
        log.exception("%s failed unexpectedly", what)
        give_up("internal_error", f"{type(exc).__name__}: {exc}")
        return "failed"


@app.task(
    name=EXPAND_BATCH,
    bind=True,
    soft_time_limit=settings.expand_limits_s[0],
    time_limit=settings.expand_limits_s[1],
)
def expand_batch_task(self: Task, batch_id: str) -> object:
    ctx = runtime.context()
    return _guarded(
        self,
        f"expansion of batch {batch_id}",
        lambda: expand_batch(ctx, batch_id, _dispatch, _finalize),
        lambda code, message: fail_expansion(ctx, batch_id, code, message, _finalize),
    )


@app.task(name=RUN_BATCH_CHUNK, bind=True)
def run_chunk_task(self: Task, batch_id: str, item_ids: list[str]) -> object:
    ctx = runtime.context()
    token = self.request.id
    return _guarded(
        self,
        f"chunk of batch {batch_id}",
        lambda: run_chunk(ctx, batch_id, item_ids, token=token, finalize=_finalize),
        lambda code, message: fail_chunk(
            ctx, batch_id, item_ids, token=token, code=code, message=message, finalize=_finalize
        ),
    )


@app.task(name=FINALIZE_BATCH, bind=True)
def finalize_batch_task(self: Task, batch_id: str) -> object:
    ctx = runtime.context()
    return _guarded(
        self,
        f"finalizing batch {batch_id}",
        lambda: finalize_batch(ctx, batch_id),
        lambda code, message: batch_store(ctx).fail(
            batch_id, code=code, message=f"the batch's manifest could not be written: {message}"
        ),
    )
