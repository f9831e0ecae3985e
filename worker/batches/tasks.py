"""Celery tasks for batches: thin wrappers that pass ids and call the stages of a batch
(``expand``, ``chunks``, ``finalize`` in this package: finalizing plans the result shards, and
each shard is a task of its own).

Every task is a :class:`worker.leasing.LeasedTask`: it holds its lease while it runs (a
chunk's item changes are fenced by it) and ends through :func:`worker.guard.guarded`: storage
errors are retried with backoff (the same delivery token is kept across retries, so a chunk
resumes the items it started); when retries run out, or the time limit or a bug ends a task,
its items (or the expansion) end ``failed`` so the batch still completes.
"""

from __future__ import annotations

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
from worker.batches.chunks import Delivery, fail_chunk, run_chunk
from worker.batches.expand import expand_batch, expand_shard, fail_expansion, fail_shard
from worker.batches.finalize import fail_examples, finalize_batch, render_examples, write_shard
from worker.celery_app import app, task
from worker.leasing import Held, LeasedTask


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


@task(EXPAND_BATCH, long=True)
def expand_batch_task(self: LeasedTask, batch_id: str) -> object:
    return self.run_leased(
        f"expansion of batch {batch_id}",
        lambda held: expand_batch(held.ctx, batch_id, _expand_shard, _finalize),
        lambda held, code, message: fail_expansion(held.ctx, batch_id, code, message, _finalize),
    )


@task(EXPAND_BATCH_SHARD, long=True)
def expand_shard_task(self: LeasedTask, batch_id: str, shard: int, gen: int) -> object:
    handing_on = (_dispatch, _expand_shard, _finalize)
    return self.run_leased(
        f"expansion of batch {batch_id}, shard {shard}",
        lambda held: expand_shard(held.ctx, batch_id, shard, gen, handing_on),
        lambda held, code, message: fail_shard(held.ctx, batch_id, shard, code, message, _finalize),
    )


@task(RUN_BATCH_CHUNK)
def run_chunk_task(self: LeasedTask, batch_id: str, item_ids: list[str]) -> object:
    def delivery(held: Held) -> Delivery:
        # The task id: a redelivery, or the same message handed over, resumes the items it
        # started.
        return Delivery(
            token=self.request.id,
            finalize=_finalize,
            fence=held.fence,
            retries=self.request.retries or 0,
        )

    return self.run_leased(
        f"chunk of batch {batch_id}",
        lambda held: run_chunk(held.ctx, batch_id, item_ids, delivery(held)),
        lambda held, code, message: fail_chunk(
            held.ctx, batch_id, item_ids, delivery(held), code, message
        ),
    )


@task(FINALIZE_BATCH)
def finalize_batch_task(self: LeasedTask, batch_id: str) -> object:
    return self.run_leased(
        f"finalizing batch {batch_id}",
        lambda held: finalize_batch(held.ctx, batch_id, _write_shard, _render_examples),
        lambda held, code, message: held.ctx.batches.fail(
            batch_id, code=code, message=f"the batch's results could not be planned: {message}"
        ),
    )


# A shard copies up to RESULT_SHARD_ITEMS figures: it gets the long limits expansion has.
@task(FINALIZE_BATCH_SHARD, long=True)
def finalize_batch_shard_task(self: LeasedTask, batch_id: str, shard: int) -> object:
    return self.run_leased(
        f"result shard {shard} of batch {batch_id}",
        lambda held: write_shard(held.ctx, batch_id, shard, _render_examples),
        lambda held, code, message: held.ctx.batches.fail(
            batch_id,
            code=code,
            message=f"the batch's result shard {shard} could not be written: {message}",
        ),
    )


# A slice runs up to EXAMPLE_SLICE_ITEMS images through the model again and draws their
# tiles; the last one assembles every sheet: it gets the long limits expansion has.
@task(RENDER_EXAMPLES, long=True)
def render_examples_task(self: LeasedTask, batch_id: str, n: int) -> object:
    return self.run_leased(
        f"example slice {n} of batch {batch_id}",
        lambda held: render_examples(held.ctx, batch_id, n),
        lambda held, code, message: fail_examples(held.ctx, batch_id, n, code, message),
    )
