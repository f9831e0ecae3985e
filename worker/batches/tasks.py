"""Celery tasks for batches: thin wrappers that pass ids and call the stages of a batch
(``expand``, ``chunks``, ``finalize`` in this package: finalizing plans the result shards, and
each shard is a task of its own).

Every task holds its lease while it runs (:func:`worker.leasing.lease_held`; a chunk's item
changes are fenced by it) and ends through :func:`worker.guard.guarded`, as jobs do: storage
errors are retried with backoff (the same delivery token is kept across retries, so a chunk
resumes the items it started); when retries run out, or the time limit or a bug ends a task,
its items (or the expansion) end ``failed`` so the batch still completes.
"""

from __future__ import annotations

from celery import Task

from shared.queue import (
    BATCH_QUEUE,
    CHUNK_PRIORITY,
    EXPAND_BATCH,
    EXPAND_BATCH_SHARD,
    FINALIZE_BATCH,
    FINALIZE_BATCH_SHARD,
    RENDER_EXAMPLES,
    RUN_BATCH_CHUNK,
)
from worker import runtime
from worker.batches import batch_store
from worker.batches.chunks import Delivery, fail_chunk, run_chunk
from worker.batches.expand import expand_batch, expand_shard, fail_expansion, fail_shard
from worker.batches.finalize import fail_examples, finalize_batch, render_examples, write_shard
from worker.celery_app import app, settings
from worker.guard import guarded
from worker.leasing import lease_held


def _dispatch(batch_id: str, item_ids: list[str]) -> None:
    app.send_task(
        RUN_BATCH_CHUNK, args=[batch_id, item_ids], queue=BATCH_QUEUE, priority=CHUNK_PRIORITY
    )


def _expand_shard(batch_id: str, shard: int, gen: int) -> None:
    app.send_task(EXPAND_BATCH_SHARD, args=[batch_id, shard, gen], queue=BATCH_QUEUE)


def _finalize(batch_id: str) -> None:
    # A task of its own, so that writing the manifest gets its own storage retries.
    app.send_task(FINALIZE_BATCH, args=[batch_id], queue=BATCH_QUEUE)


def _write_shard(batch_id: str, shard: int) -> None:
    app.send_task(FINALIZE_BATCH_SHARD, args=[batch_id, shard], queue=BATCH_QUEUE)


def _render_examples(batch_id: str, n: int) -> None:
    app.send_task(RENDER_EXAMPLES, args=[batch_id, n], queue=BATCH_QUEUE)


@app.task(
    name=EXPAND_BATCH,
    bind=True,
    soft_time_limit=settings.expand_limits_s[0],
    time_limit=settings.expand_limits_s[1],
)
def expand_batch_task(self: Task, batch_id: str) -> object:
    ctx = runtime.context()
    with lease_held(self, ctx):
        return guarded(
            self,
            ctx.settings,
            lambda: expand_batch(ctx, batch_id, _expand_shard, _finalize),
            what=f"expansion of batch {batch_id}",
            give_up=lambda code, message: fail_expansion(ctx, batch_id, code, message, _finalize),
        )


@app.task(
    name=EXPAND_BATCH_SHARD,
    bind=True,
    soft_time_limit=settings.expand_limits_s[0],
    time_limit=settings.expand_limits_s[1],
)
def expand_shard_task(self: Task, batch_id: str, shard: int, gen: int) -> object:
    ctx = runtime.context()
    with lease_held(self, ctx):
        return guarded(
            self,
            ctx.settings,
            lambda: expand_shard(ctx, batch_id, shard, gen, (_dispatch, _expand_shard, _finalize)),
            what=f"expansion of batch {batch_id}, shard {shard}",
            give_up=lambda code, message: fail_shard(
                ctx, batch_id, shard, code, message, _finalize
            ),
        )


@app.task(name=RUN_BATCH_CHUNK, bind=True)
def run_chunk_task(self: Task, batch_id: str, item_ids: list[str]) -> object:
    ctx = runtime.context()
    # The task id: a redelivery, or the same message handed over, resumes the items it started.
    token = self.request.id
    with lease_held(self, ctx) as fence:
        delivery = Delivery(token=token, finalize=_finalize, fence=fence)
        return guarded(
            self,
            ctx.settings,
            lambda: run_chunk(ctx, batch_id, item_ids, delivery),
            what=f"chunk of batch {batch_id}",
            give_up=lambda code, message: fail_chunk(
                ctx, batch_id, item_ids, delivery, code, message
            ),
        )


@app.task(name=FINALIZE_BATCH, bind=True)
def finalize_batch_task(self: Task, batch_id: str) -> object:
    ctx = runtime.context()
    with lease_held(self, ctx):
        return guarded(
            self,
            ctx.settings,
            lambda: finalize_batch(ctx, batch_id, _write_shard, _render_examples),
            what=f"finalizing batch {batch_id}",
            give_up=lambda code, message: batch_store(ctx).fail(
                batch_id,
                code=code,
                message=f"the batch's results could not be planned: {message}",
            ),
        )


# A shard copies up to RESULT_SHARD_ITEMS figures: it gets the long limits expansion has.
@app.task(
    name=FINALIZE_BATCH_SHARD,
    bind=True,
    soft_time_limit=settings.expand_limits_s[0],
    time_limit=settings.expand_limits_s[1],
)
def finalize_batch_shard_task(self: Task, batch_id: str, shard: int) -> object:
    ctx = runtime.context()
    with lease_held(self, ctx):
        return guarded(
            self,
            ctx.settings,
            lambda: write_shard(ctx, batch_id, shard, _render_examples),
            what=f"result shard {shard} of batch {batch_id}",
            give_up=lambda code, message: batch_store(ctx).fail(
                batch_id,
                code=code,
                message=f"the batch's result shard {shard} could not be written: {message}",
            ),
        )


# A slice runs up to EXAMPLE_SLICE_ITEMS images through the model again and draws their
# tiles; the last one assembles every sheet: it gets the long limits expansion has.
@app.task(
    name=RENDER_EXAMPLES,
    bind=True,
    soft_time_limit=settings.expand_limits_s[0],
    time_limit=settings.expand_limits_s[1],
)
def render_examples_task(self: Task, batch_id: str, n: int) -> object:
    ctx = runtime.context()
    with lease_held(self, ctx):
        return guarded(
            self,
            ctx.settings,
            lambda: render_examples(ctx, batch_id, n),
            what=f"example slice {n} of batch {batch_id}",
            give_up=lambda code, message: fail_examples(ctx, batch_id, n, code, message),
        )
