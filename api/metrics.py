"""Prometheus metrics.

Request durations are observed in-process by prometheus_client (in multiprocess mode when
``PROMETHEUS_MULTIPROC_DIR`` is set, as under gunicorn with several workers). Job counts,
job durations and queue depth live in Redis, so every API process reports the same numbers.
"""

from __future__ import annotations

import os
import time

from flask import Flask, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Histogram,
    generate_latest,
    multiprocess,
)

from shared.jobs import JobStatus
from shared.queue import BATCH_QUEUE, JOBS_QUEUE

REGISTRY = CollectorRegistry(auto_describe=True)
REQUEST_SECONDS = Histogram(
    "featuremaps_http_request_duration_seconds",
    "HTTP request duration by endpoint, method and status.",
    ["endpoint", "method", "status"],
    registry=REGISTRY,
)
QUEUES = (JOBS_QUEUE, BATCH_QUEUE)


def init_metrics(app: Flask) -> None:
    @app.before_request
    def _start_timer():
        g.request_started = time.perf_counter()

    @app.after_request
    def _observe(response):
        started = g.pop("request_started", None)
        if started is not None:
            REQUEST_SECONDS.labels(
                request.url_rule.rule if request.url_rule else "unmatched",
                request.method,
                str(response.status_code),
            ).observe(time.perf_counter() - started)
        return response


def render_metrics(svc) -> tuple[bytes, str]:
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    lines = [generate_latest(registry).decode()]
    lines += _job_metrics(svc)
    return "".join(lines).encode(), CONTENT_TYPE_LATEST


def _job_metrics(svc) -> list[str]:
    counts = svc.jobs.counts()
    out = [
        "# HELP featuremaps_jobs_total Jobs that entered each status.\n",
        "# TYPE featuremaps_jobs_total counter\n",
    ]
    out += [
        f'featuremaps_jobs_total{{status="{s.value}"}} {counts.get(s.value, 0)}\n'
        for s in JobStatus
    ]
    out += [
        "# HELP featuremaps_queue_depth Messages waiting in each queue.\n",
        "# TYPE featuremaps_queue_depth gauge\n",
    ]
    out += [f'featuremaps_queue_depth{{queue="{q}"}} {svc.redis.llen(q)}\n' for q in QUEUES]
    buckets, total, count = svc.jobs.duration_histogram()
    out += [
        "# HELP featuremaps_job_duration_seconds Submit-to-success time of jobs.\n",
        "# TYPE featuremaps_job_duration_seconds histogram\n",
    ]
    out += [
        f'featuremaps_job_duration_seconds_bucket{{le="{le}"}} {n}\n' for le, n in buckets.items()
    ]
    out += [
        f"featuremaps_job_duration_seconds_sum {total}\n",
        f"featuremaps_job_duration_seconds_count {count}\n",
    ]
    return out
