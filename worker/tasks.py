"""Celery tasks: thin wrappers that pass ids and call plain functions in worker/execute.py."""

from __future__ import annotations

import logging

from celery.exceptions import Reject, SoftTimeLimitExceeded
from celery.signals import celeryd_after_setup, worker_process_init
from redis.exceptions import RedisError

from shared.errors import StorageUnavailable
from shared.queue import RENDER_JOB
from worker import metrics, runtime
from worker.celery_app import app, settings
from worker.execute import release_input, run_job

log = logging.getLogger(__name__)
_node = {"hostname": "worker"}


@celeryd_after_setup.connect
def _remember_hostname(sender: str, **_kwargs) -> None:
    # Runs in the parent before the pool forks; the child inherits the name.
    _node["hostname"] = sender


@worker_process_init.connect
def _load_model(**_kwargs) -> None:
    runtime.init_process(settings, _node["hostname"])


@app.task(name=RENDER_JOB, bind=True)
def render_job(self, job_id: str) -> str:
    ctx = runtime.context()
    # Returning means the job has ended (a retry or a requeue raises): its input can go.
    status = _render(self, ctx, job_id)
    release_input(ctx, job_id)
    return status


def _render(self, ctx: runtime.WorkerContext, job_id: str) -> str:
    try:
        return run_job(ctx, job_id)
    except StorageUnavailable as exc:
        retries = self.request.retries
        if retries >= ctx.settings.storage_retries:
            ctx.jobs.fail(
                job_id, code=exc.code, message=f"{exc.message} (gave up after {retries} retries)"
            )
            metrics.images_failed("job", exc.code)
            return "failed"
        delay = ctx.settings.storage_retry_backoff_s * 2**retries
        log.warning("job %s: storage unavailable, retry %d in %.1fs", job_id, retries + 1, delay)
        ctx.jobs.requeue(job_id, reason=f"storage unavailable, retry {retries + 1} in {delay:g}s")
        # Celery's own limit (3 unless told) would end the ladder early and leave the job
        # `queued` for ever; the count above is the limit.
        raise self.retry(exc=exc, countdown=delay, max_retries=retries + 1) from exc
    except RedisError as exc:
        # The job store itself is unreachable: nothing can be recorded. A plain failure would
        # make Celery reject the message *without* requeueing it (acks_on_failure_or_timeout
        # is off), so the job would stay `running` forever once Redis is back; reject with
        # requeue instead. If Redis is still down the message stays unacknowledged and comes
        # back after the visibility timeout; either way the job store counts the redelivery.
        raise Reject(exc, requeue=True) from exc
    except SoftTimeLimitExceeded:
        ctx.jobs.fail(
            job_id,
            code="timeout",
            message=f"the job ran past its time limit of {ctx.settings.task_soft_time_limit_s}s",
        )
        metrics.images_failed("job", "timeout")
        return "failed"
    except Exception as exc:
        log.exception("job %s failed unexpectedly", job_id)
        ctx.jobs.fail(job_id, code="internal_error", message=f"{type(exc).__name__}: {exc}")
        metrics.images_failed("job", "internal_error")
        return "failed"
