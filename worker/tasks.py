"""Celery tasks for single jobs: a thin task that passes the job's id to
:func:`worker.execute.run_job`, run as every task is (:class:`worker.leasing.LeasedTask`)."""

from __future__ import annotations

from shared.queue import RENDER_JOB
from worker import metrics, runtime
from worker.celery_app import task
from worker.execute import release_input, run_job
from worker.guard import HANDED_OVER, RETRYING
from worker.leasing import Held, LeasedTask


@task(RENDER_JOB)
def render_job(self: LeasedTask, job_id: str) -> object:
    def give_up(held: Held, code: str, message: str) -> None:
        held.ctx.jobs.fail(job_id, code=code, message=message, fence=held.fence)
        metrics.images_failed("job", code)

    status = self.run_leased(
        f"job {job_id}",
        lambda held: run_job(held.ctx, job_id, held.fence),
        give_up,
        subject="the job",
        # The record says why the job is queued again while it waits.
        retrying=lambda held, reason: held.ctx.jobs.requeue(
            job_id, reason=reason, fence=held.fence
        ),
    )
    # Returning means the job has ended (a requeue raises), unless another worker took it
    # over or it waits for a storage retry: then its input can go.
    if status not in (HANDED_OVER, RETRYING):
        release_input(runtime.context(), job_id)
    return status
