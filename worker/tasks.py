"""Celery tasks for single jobs: thin wrappers that pass ids and call plain functions in
worker/execute.py, holding their lease (:func:`worker.leasing.lease_held`) and ended through
:func:`worker.guard.guarded`."""

from __future__ import annotations

from celery import Task
from celery.signals import celeryd_after_setup, worker_process_init

from shared.queue import RENDER_JOB
from worker import metrics, runtime
from worker.celery_app import app, settings
from worker.execute import release_input, run_job
from worker.guard import HANDED_OVER, guarded
from worker.leasing import lease_held

_node = {"hostname": "worker"}


@celeryd_after_setup.connect
def _remember_hostname(sender: str, **_kwargs) -> None:
    # Runs in the parent before the pool forks; the child inherits the name.
    _node["hostname"] = sender


@worker_process_init.connect
def _load_model(**_kwargs) -> None:
    runtime.init_process(settings, _node["hostname"])


@app.task(name=RENDER_JOB, bind=True)
def render_job(self: Task, job_id: str) -> object:
    ctx = runtime.context()
    with lease_held(self, ctx) as fence:

        def give_up(code: str, message: str) -> None:
            ctx.jobs.fail(job_id, code=code, message=message, fence=fence)
            metrics.images_failed("job", code)

        status = guarded(
            self,
            ctx.settings,
            lambda: run_job(ctx, job_id, fence),
            what=f"job {job_id}",
            subject="the job",
            give_up=give_up,
            # The record says why the job is queued again while it waits.
            retrying=lambda reason: ctx.jobs.requeue(job_id, reason=reason, fence=fence),
        )
    # Returning means the job has ended (a retry or a requeue raises), unless another worker
    # took it over: then its input can go.
    if status != HANDED_OVER:
        release_input(ctx, job_id)
    return status
