"""The command lines that start the service's own processes, and the probe that says one
answers: the gunicorn API, a Celery worker, ``GET /healthz``. The local stack, the worker
launcher, the benchmarks and the tests all start their processes with these, so there is one
spelling of each (the containers' is in docker/*.Dockerfile)."""

from __future__ import annotations

import os
import sys

import requests

from shared.queue import WORKER_QUEUES
from stack.services import ManagedProcess, wait_until

API_APP = "api:create_app()"
# gunicorn settings of the API: it starts the keeper in each process (api/gunicorn_conf.py).
API_CONFIG = "python:api.gunicorn_conf"
CELERY_APP = "worker.celery_app"


def api_command(
    bind: str,
    *,
    workers: int = 2,
    threads: int = 4,
    timeout_s: int | None = None,
    config: str | None = None,
    app: str = API_APP,
) -> list[str]:
    """gunicorn serving ``app`` on ``bind`` (``host:port``), run by this interpreter."""
    argv = [sys.executable, "-m", "gunicorn"]
    if config is not None:
        argv += ["--config", config]
    argv += ["--bind", bind, "--workers", str(workers), "--threads", str(threads)]
    if timeout_s is not None:
        argv += ["--timeout", str(timeout_s)]
    return [*argv, app]


def worker_command(
    hostname: str,
    *,
    queues: str = WORKER_QUEUES,
    loglevel: str = "INFO",
    app: str = CELERY_APP,
) -> list[str]:
    """One Celery worker process (prefork, concurrency 1) named ``hostname`` (``%h`` is
    Celery's own host name), consuming ``queues`` in priority order."""
    return [
        *(sys.executable, "-m", "celery", "-A", app, "worker"),
        *("--hostname", hostname),
        *("--pool", "prefork", "--concurrency", "1"),
        *("-Q", queues, "--loglevel", loglevel),
        "--without-gossip",
        "--without-mingle",
    ]


def gpu_worker_env(gpu: str) -> dict[str, str]:
    """A worker pinned to one GPU, which it then sees as ``cuda:0``."""
    return {"CUDA_VISIBLE_DEVICES": gpu, "FEATUREMAPS_DEVICE": "cuda:0"}


def cpu_worker_env(replicas: int) -> dict[str, str]:
    """A CPU worker among ``replicas``: they share the cores instead of each starting one torch
    thread per core."""
    threads = str(max(1, (os.cpu_count() or 1) // replicas))
    return {"CUDA_VISIBLE_DEVICES": "", "FEATUREMAPS_DEVICE": "cpu", "OMP_NUM_THREADS": threads}


def answers(url: str, *, timeout_s: float = 2.0) -> bool:
    """Whether ``url`` answers 200: the readiness probe for ``/healthz`` and ``/readyz``."""
    try:
        return requests.get(url, timeout=timeout_s).status_code == 200
    except requests.RequestException:
        return False


def wait_for_api(
    api_url: str,
    process: ManagedProcess,
    *,
    timeout_s: float,
    path: str = "/healthz",
    interval_s: float = 0.1,
) -> float:
    """Wait until the API at ``api_url`` answers ``path``; fails early if ``process`` exits."""
    return wait_until(
        lambda: answers(f"{api_url}{path}"),
        timeout_s=timeout_s,
        process=process,
        what=f"the API at {api_url}{path}",
        interval_s=interval_s,
    )
