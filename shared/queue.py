"""What the API and the workers agree on about the queue: task names, queue names and the
broker settings. The API sends tasks by name and never imports worker code."""

from __future__ import annotations

from celery import Celery

from shared.settings import Settings

RENDER_JOB = "featuremaps.render_job"
JOBS_QUEUE = "jobs"
EXPAND_BATCH = "featuremaps.expand_batch"
RUN_BATCH_CHUNK = "featuremaps.run_batch_chunk"
FINALIZE_BATCH = "featuremaps.finalize_batch"
BATCH_QUEUE = "batch"
# Workers consume both, interactive jobs first (see worker/celery_app.py).
WORKER_QUEUES = f"{JOBS_QUEUE},{BATCH_QUEUE}"


def broker_options(settings: Settings) -> dict:
    return {
        # A task running longer than this is handed to another worker, so every time
        # limit must stay below it (checked in worker/celery_app.py).
        "visibility_timeout": settings.visibility_timeout_s,
        # kombu sweeps for abandoned messages (a worker killed mid-task) every interval ×
        # throttle seconds, 10 × 10 by default; scan on every sweep so such a message comes
        # back about visibility_timeout after it was taken, not up to 100 s later.
        "unacked_restore_interval": min(10, max(1, settings.visibility_timeout_s // 3)),
        "unacked_restore_throttle": 1,
        "socket_connect_timeout": 3,
        "socket_timeout": 10,
        "retry_on_timeout": True,
    }


def make_producer(settings: Settings) -> Celery:
    """A Celery app that only sends: no result backend, no task code."""
    app = Celery("featuremaps-api", broker=settings.redis_url, set_as_current=False)
    app.conf.update(
        broker_transport_options=broker_options(settings),
        broker_connection_retry_on_startup=False,
        broker_connection_timeout=3,
        task_ignore_result=True,
        task_default_queue=JOBS_QUEUE,
    )
    return app
