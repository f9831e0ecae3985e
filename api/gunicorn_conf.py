"""gunicorn settings for the API (``gunicorn -c python:api.gunicorn_conf``): a loud warning
at start when it serves without tokens beyond loopback, and the keeper (keeper/runner.py)
started in each worker process once it has loaded the app, so that recovery, the reconciler
and webhook delivery run wherever the API runs, workers or none."""

from __future__ import annotations

import os
import socket

from api.audit import exposure_warning
from keeper.reconciler import celery_sender
from keeper.runner import start_keeper
from shared.settings import Settings


def when_ready(server) -> None:
    hosts = [
        address[0] if isinstance(address, tuple) else f"unix:{address}"
        for address in server.cfg.address
    ]
    warning = exposure_warning(hosts, Settings())
    if warning:
        server.log.warning(warning)


def post_worker_init(worker) -> None:
    """Start the keeper beside this process's app (after the fork: its threads are this
    process's). An app that is not ours (a stand-in in tests) gets none."""
    extensions = getattr(worker.wsgi, "extensions", {})
    svc = extensions.get("featuremaps")
    if svc is None:
        return
    holder = f"api@{socket.gethostname()}:{os.getpid()}"
    send = celery_sender(svc.producer)
    start_keeper(svc.redis, svc.store, svc.settings, send=send, holder=holder)
