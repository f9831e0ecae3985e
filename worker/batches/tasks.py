"""Celery tasks for batches: thin wrappers that pass ids and call the stages of a batch
(``expand``, ``chunks``, ``finalize`` in this package: finalizing plans the result shards, and
each shard is a task of its own).

Expansion hands each block's queued items to the scheduler (shared/schedule.py) as chunks of
``BATCH_CHUNK``; the batch queue holds *turns*, and a turn runs whichever chunk is next in
fair order when it starts, then ends by registering its successor while chunks wait.

Every task is a :class:`worker.leasing.LeasedTask`: it holds its lease while it runs (a
chunk's item changes are fenced by it) and ends through :func:`worker.guard.guarded`: storage
errors are retried with backoff (the same delivery token is kept across retries, so a chunk
resumes the items it started); when retries run out, or the time limit or a bug ends a task,
its items (or the expansion) end ``failed`` so the batch still completes.
"""

from __future__ import annotations

from shared.item_codec import member_index
from shared.queue import (
    BATCH_QUEUE,
    CHUNK_PRIORITY,
    EXPAND_BATCH,
    EXPAND_BATCH_SHARD,
    FINALIZE_BATCH,
    FINALIZE_BATCH_SHARD,
    RENDER_EXAMPLES,
    RUN_BATCH_CHUNK,
    RUN_BATCH_TURN,
)
from shared.schedule import Claim
from worker import runtime
from worker.batches.chunks import Delivery, fail_chunk, run_chunk
from worker.batches.expand import expand_batch, expand_shard, fail_expansion, fail_shard
from worker.batches.finalize import fail_examples, finalize_batch, render_examples, write_shard
from worker.celery_app import app, task
from worker.leasing import Held, LeasedTask


def _dispatch(batch_id: str, item_ids: list[str]) -> None:
    """Queue queued items (a block's, from expansion) with the scheduler, in chunks, and
    send the turns it registered for them."""
    ctx = runtime.context()
    size = ctx.settings.batch_chunk
    indexes = [n for i in item_ids if (n := member_index(batch_id, i)) is not None]
    chunks = [indexes[start : start + size] for start in range(0, len(indexes), size)]
    for turn in ctx.scheduler.add(batch_id, chunks):
        send_turn(turn)


def send_turn(turn_id: str) -> None:
    """Publish a registered turn (its id is the Celery task id: a redelivery resumes it)."""
    app.send_task(RUN_BATCH_TURN, task_id=turn_id, queue=BATCH_QUEUE, priority=CHUNK_PRIORITY)


def _expand_shard(batch_id: str, shard: int, gen: int) -> None:
    app.send_task(EXPAND_BATCH_SHARD, args=[batch_id, shard, gen], queue=BATCH_QUEUE)


def _finalize(batch_id: str) -> None:
    # A task of its own, so that writing the manifest gets its own storage retries.
    app.send_task(FINALIZE_BATCH, args=[batch_id], queue=BATCH_QUEUE)


def _write_shard(batch_id: str, shard: int, *, queued_behind: bool = False) -> None:
    # Ahead of chunk turns (priority 0), or, for a canceled batch's, behind those waiting.
    priority = CHUNK_PRIORITY if queued_behind else 0
    app.send_task(
        FINALIZE_BATCH_SHARD, args=[batch_id, shard], queue=BATCH_QUEUE, priority=priority
    )


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
        lambda held: expand_shard(held.ctx, batch_id, shard, gen, handing_on, fence=held.fence),
        lambda held, code, message: fail_shard(held.ctx, batch_id, shard, code, message, _finalize),
    )


def _delivery(task: LeasedTask, held: Held) -> Delivery:
    # The task id: a redelivery, or the same message handed over, resumes the items it
    # started.
    return Delivery(
        token=task.request.id,
        finalize=_finalize,
        fence=held.fence,
        retries=task.request.retries or 0,
    )


@task(RUN_BATCH_TURN)
def run_turn_task(self: LeasedTask) -> object:
    turn = self.request.id

    def work(held: Held) -> object:
        claim = held.ctx.scheduler.claim(turn, held.fence)
        done = 0
        if isinstance(claim, Claim):
            done = run_chunk(held.ctx, claim.batch_id, claim.item_ids, _delivery(self, held))
        _end_turn(held, turn)
        return done if isinstance(claim, Claim) else claim

    def give_up(held: Held, code: str, message: str) -> None:
        claim = held.ctx.scheduler.claimed(turn)
        if claim is not None:
            fail_chunk(
                held.ctx, claim.batch_id, claim.item_ids, _delivery(self, held), code, message
            )
        _end_turn(held, turn)

    return self.run_leased(f"batch turn {turn}", work, give_up)


def _end_turn(held: Held, turn: str) -> None:
    """The turn's chunk is recorded: end the turn and send the successors it registered."""
    for successor in held.ctx.scheduler.end(turn, held.fence):
        send_turn(successor)


# Chunk messages sent before turns existed (batch id and item ids as arguments).
@task(RUN_BATCH_CHUNK)
def run_chunk_task(self: LeasedTask, batch_id: str, item_ids: list[str]) -> object:
    def delivery(held: Held) -> Delivery:
        return _delivery(self, held)

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
        lambda held: write_shard(held.ctx, batch_id, shard, _render_examples, _write_shard),
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
