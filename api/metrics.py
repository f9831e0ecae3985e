"""Prometheus metrics.

Request durations are observed in-process by prometheus_client (in multiprocess mode when
``PROMETHEUS_MULTIPROC_DIR`` is set, as under gunicorn with several workers). Job counts,
job durations, the backlog (keeper/backlog.py), the oldest waiting message, live workers and
the keeper's counters (keeper/counters.py) are read from Redis at scrape time, so every API
process reports the same numbers (read them with ``max``). (Each worker serves its own
metrics: worker/metrics.py.)
"""

from __future__ import annotations

import json
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

from keeper.backlog import backlog
from keeper.counters import HANDOVER, REPAIR, counts
from shared.heartbeat import live_workers
from shared.jobs import JobStatus
from shared.queue import QUEUES, SENT_AT_HEADER, broker_options, queue_keys

REGISTRY = CollectorRegistry(auto_describe=True)
REQUEST_SECONDS = Histogram(
    "featuremaps_http_request_duration_seconds",
    "HTTP request duration by endpoint, method and status.",
    ["endpoint", "method", "status"],
    registry=REGISTRY,
)


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
    out += _queue_metrics(svc)
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


# featuremaps_queue_depth's series beyond the queues' own (waiting messages): what else a
# worker is wanted for (keeper/backlog.py).
DEPTH_BEYOND_QUEUES = {"batch_scheduled": "scheduled_chunks", "in_flight": "in_flight"}


def _queue_metrics(svc) -> list[str]:
    options = broker_options(svc.settings)
    oldest = {}
    now = time.time()
    for queue in QUEUES:
        lists = queue_keys(queue, options)
        # kombu pushes on the left and workers pop on the right: the right end is the oldest.
        ages = [_age(message, now) for message in (svc.redis.lindex(key, -1) for key in lists)]
        oldest[queue] = max((a for a in ages if a is not None), default=0.0)
    waiting = backlog(svc.redis, svc.settings)
    depth = {q: waiting[f"waiting_{q}"] for q in QUEUES}
    depth.update({name: waiting[part] for name, part in DEPTH_BEYOND_QUEUES.items()})
    workers = live_workers(svc.redis)
    out = [
        "# HELP featuremaps_queue_depth What waits for a worker: messages waiting in each "
        "queue (all priorities), batch chunks waiting in the scheduler with no turn queued "
        "(batch_scheduled), messages delivered and not acknowledged or leases held (in_flight)."
        " Their sum is what KEDA scales on.\n",
        "# TYPE featuremaps_queue_depth gauge\n",
    ]
    out += [f'featuremaps_queue_depth{{queue="{q}"}} {n}\n' for q, n in depth.items()]
    out += [
        "# HELP featuremaps_batch_items_scheduled Batch items waiting in the fair scheduler.\n",
        "# TYPE featuremaps_batch_items_scheduled gauge\n",
        f"featuremaps_batch_items_scheduled {waiting['scheduled_items']}\n",
        "# HELP featuremaps_webhooks_due Webhook calls due now (delivered by the keeper).\n",
        "# TYPE featuremaps_webhooks_due gauge\n",
        f"featuremaps_webhooks_due {waiting['webhooks_due']}\n",
        "# HELP featuremaps_retries_waiting Storage retries waiting out their backoff (the "
        "keeper queues each when it is due).\n",
        "# TYPE featuremaps_retries_waiting gauge\n",
        f"featuremaps_retries_waiting {waiting['retries_waiting']}\n",
        "# HELP featuremaps_queue_oldest_age_seconds Time the oldest waiting message of each "
        "queue has waited since it was sent (0 when empty).\n",
        "# TYPE featuremaps_queue_oldest_age_seconds gauge\n",
    ]
    out += [
        f'featuremaps_queue_oldest_age_seconds{{queue="{q}"}} {age:.3f}\n'
        for q, age in oldest.items()
    ]
    out += [
        "# HELP featuremaps_workers_alive Worker processes with a fresh heartbeat.\n",
        "# TYPE featuremaps_workers_alive gauge\n",
        f"featuremaps_workers_alive {len(workers)}\n",
    ]
    return out + _keeper_metrics(svc)


def _keeper_metrics(svc) -> list[str]:
    return _counter(
        "featuremaps_handovers_total",
        "Tasks of lost nodes (holder's heartbeat expired) the keeper moved back to the front "
        "of their queue, by task.",
        "task",
        counts(svc.redis, HANDOVER),
    ) + _counter(
        "featuremaps_reconciler_repairs_total",
        "Lost signals the keeper's reconciler repaired, by kind.",
        "kind",
        counts(svc.redis, REPAIR),
    )


def _counter(name: str, help_text: str, label: str, values: dict[str, int]) -> list[str]:
    """One counter family in the text format, a series per label value."""
    out = [f"# HELP {name} {help_text}\n", f"# TYPE {name} counter\n"]
    return out + [f'{name}{{{label}="{key}"}} {n}\n' for key, n in values.items()]


def _age(message: bytes | None, now: float) -> float | None:
    if message is None:
        return None
    try:
        sent_at = json.loads(message)["headers"][SENT_AT_HEADER]
    except (ValueError, KeyError, TypeError):
        return None  # sent before the header existed, or not a Celery message
    return max(0.0, now - float(sent_at))
