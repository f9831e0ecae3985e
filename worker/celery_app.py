"""The one Celery app of the workers and its configuration (docs/design.md "Workers").

This module is the worker's entry point (`celery -A worker.celery_app worker`), so it is
where the settings are built, and where each worker process is set up: the model is loaded
after the fork (``worker_process_init``), never in the parent. The task modules are listed in
``include``.
"""

from __future__ import annotations

from collections.abc import Callable

from celery import Celery
from celery.signals import celeryd_after_setup, worker_process_init

from shared.queue import JOBS_QUEUE, broker_options
from shared.settings import Settings
from worker import runtime
from worker.leasing import LeasedTask

settings = Settings()

for soft, hard, name in (
    (settings.task_soft_time_limit_s, settings.task_time_limit_s, "TASK"),
    (*settings.expand_limits_s, "EXPAND"),
):
    if not soft < hard < settings.visibility_timeout_s:
        raise SystemExit(
            f"FEATUREMAPS_{name}_SOFT_TIME_LIMIT_S < FEATUREMAPS_{name}_TIME_LIMIT_S < "
            "FEATUREMAPS_VISIBILITY_TIMEOUT_S must hold, or a running task could be handed to "
            "a second worker"
        )

app = Celery(
    "featuremaps", broker=settings.redis_url, include=["worker.tasks", "worker.batches.tasks"]
)
app.conf.update(
    # A task is acknowledged only once it has finished, and a worker that dies mid-task
    # gives its message back, so no job is lost; the job store's attempt counter stops a
    # poison job from looping.
    task_acks_late=True,
    task_reject_on_worker_lost=True,
    # An error that escapes a task (Redis gone mid-task) leaves the message unacknowledged
    # so it is redelivered; every expected error is handled inside the task.
    task_acks_on_failure_or_timeout=False,
    worker_prefetch_multiplier=1,
    task_soft_time_limit=settings.task_soft_time_limit_s,
    task_time_limit=settings.task_time_limit_s,
    # "priority": BRPOP lists the queues in the order the worker consumes them (-Q
    # jobs,batch), so an interactive job is always taken before the next batch chunk.
    broker_transport_options={**broker_options(settings), "queue_order_strategy": "priority"},
    broker_connection_retry_on_startup=True,
    task_ignore_result=True,
    task_default_queue=JOBS_QUEUE,
    # Task events (received, started, succeeded, failed) and worker heartbeats go out on
    # Redis pub/sub, so Flower (or `celery events`) shows live workers and tasks.
    worker_send_task_events=True,
    task_send_sent_event=True,
    worker_hijack_root_logger=False,
    worker_redirect_stdouts=False,
)

_node = {"hostname": "worker"}


@celeryd_after_setup.connect
def _remember_hostname(sender: str, **_kwargs) -> None:
    # Runs in the parent before the pool forks; the child inherits the name.
    _node["hostname"] = sender


@worker_process_init.connect
def _load_model(**_kwargs) -> None:
    runtime.init_process(settings, _node["hostname"])


def task(name: str, *, long: bool = False) -> Callable:
    """Register a featuremaps task: bound, run as a :class:`~worker.leasing.LeasedTask`, and
    named by its plain ``featuremaps.*`` string (shared/queue.py); ``long`` gives it the time
    limits expansion has instead of a job's."""
    limits = {}
    if long:
        limits = {
            "soft_time_limit": settings.expand_limits_s[0],
            "time_limit": settings.expand_limits_s[1],
        }
    return app.task(name=name, bind=True, base=LeasedTask, **limits)
