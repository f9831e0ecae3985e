"""Per-process worker state: the resident model, clients, a heartbeat, retention sweeps,
webhook delivery and the metrics endpoint.

The model is loaded once in each worker process, after the fork (Celery's
``worker_process_init``), never in the parent: CUDA cannot be re-initialised in a forked
child, and one resident copy per GPU is the point. Tasks get the state with :func:`context`.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from dataclasses import dataclass, field

from redis import Redis

from shared.heartbeat import HEARTBEAT_EVERY_S, write_heartbeat
from shared.jobs import RedisJobStore
from shared.settings import Settings
from shared.storage import ObjectStore, ensure_bucket
from worker import metrics
from worker.retention import retention_loop
from worker.webhooks import Deliverer, webhook_loop

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    settings: Settings
    hostname: str
    redis: Redis
    jobs: RedisJobStore
    store: ObjectStore
    loaded: object  # worker.model.LoadedModel; typed loosely to keep torch out of imports
    device: str
    jobs_done: int = 0
    started: float = field(default_factory=time.time)

    def heartbeat_info(self) -> dict:
        from worker.model import load_count

        return {
            "hostname": self.hostname,
            "pid": os.getpid(),
            "device": self.device,
            "weights": getattr(self.loaded, "weights", None),
            # Counted inside load_model itself: proof that the model stays resident.
            "model_loads": load_count(),
            "jobs_done": self.jobs_done,
            "started": self.started,
        }


_context: WorkerContext | None = None


def init_process(settings: Settings, hostname: str) -> WorkerContext:
    """Build this process's context and load the model (once)."""
    global _context
    from worker.model import load_model  # torch is imported here, after the fork

    loaded = load_model(settings.weights, device=settings.device, seed=settings.weights_seed)
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=10)
    _context = WorkerContext(
        settings=settings,
        hostname=hostname,
        redis=redis,
        jobs=RedisJobStore(redis, ttl_s=settings.job_ttl_s),
        store=ObjectStore.from_settings(settings),
        loaded=loaded,
        device=describe_device(loaded.device),
    )
    log.info("model loaded on %s with weights %s", _context.device, loaded.weights)
    ensure_bucket(_context.store, log)
    if settings.worker_metrics_port:
        metrics.start_server(settings.worker_metrics_port, loaded.device)
    threading.Thread(target=_heartbeat_loop, args=(_context,), daemon=True).start()
    threading.Thread(
        target=retention_loop,
        args=(_context.store, redis),
        kwargs={"ttl_s": settings.job_ttl_s, "holder": f"{hostname}:{os.getpid()}"},
        daemon=True,
    ).start()
    if settings.webhook_secret:
        deliverer = Deliverer(redis, _context.store, settings)
        threading.Thread(target=webhook_loop, args=(deliverer,), daemon=True).start()
    return _context


def context() -> WorkerContext:
    if _context is None:
        raise RuntimeError("worker process not initialised (worker_process_init did not run)")
    return _context


def describe_device(device) -> str:
    if device.type != "cuda":
        return "cpu"
    import torch

    index = device.index or 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "all")
    return f"cuda:{index} ({torch.cuda.get_device_name(index)}; CUDA_VISIBLE_DEVICES={visible})"


def _heartbeat_loop(ctx: WorkerContext) -> None:
    while True:
        try:
            write_heartbeat(ctx.redis, ctx.heartbeat_info())
        except Exception as exc:  # Redis may be restarting; the next beat tries again
            log.warning("heartbeat failed: %s", exc)
        time.sleep(HEARTBEAT_EVERY_S)
