"""Per-process worker state: the resident models, clients, a heartbeat, the leases of the task
it runs, retention sweeps, the keeper (recovery of lost nodes' work, the reconciler, webhook
delivery; keeper/) and the metrics endpoint.

The model is loaded once in each worker process, after the fork (Celery's
``worker_process_init``), never in the parent: CUDA cannot be re-initialised in a forked
child, and one resident copy per GPU is the point. ResNet-18 stays loaded; the other models a
job may name are loaded on first use and kept in a bounded set (``model_for``,
worker/compute/resident.py). Tasks get the state with :func:`context`.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property
from pathlib import Path
from typing import TYPE_CHECKING

from redis import Redis
from redis.exceptions import RedisError

from keeper.reconciler import celery_sender
from keeper.runner import periodically, start_keeper
from shared.batches import BatchStore
from shared.errors import MODEL_DELETED, FeatureMapsError, NotFound
from shared.heartbeat import HEARTBEAT_EVERY_S, holder_id, process_nonce, write_heartbeat
from shared.jobs import JobStore
from shared.leases import Fence, LeaseStore
from shared.models import ModelNotFound, ModelStore, UploadedModel
from shared.options import JobOptions, check_upload_enabled, is_upload_id
from shared.queue import make_producer
from shared.schedule import Scheduler
from shared.settings import Settings
from shared.storage import ObjectStore, ensure_bucket
from worker import metrics
from worker.retention import maybe_sweep, sweep_interval_s

if TYPE_CHECKING:  # torch is imported after the fork, not when this module is
    from worker.compute.model import LoadedModel
    from worker.compute.resident import ResidentModels

log = logging.getLogger(__name__)


@dataclass
class WorkerContext:
    settings: Settings
    hostname: str
    redis: Redis
    jobs: JobStore
    batches: BatchStore
    leases: LeaseStore
    store: ObjectStore
    # ResNet-18, always resident
    loaded: LoadedModel
    device: str
    # the other models, loaded on first use (model_for); made then
    models: ResidentModels | None = None
    jobs_done: int = 0
    started: float = field(default_factory=time.time)
    # Leases whose task ended while Redis was down: given back by the heartbeat thread once
    # Redis answers, so that a later delivery elsewhere is not deferred for nothing.
    unreleased: list[Fence] = field(default_factory=list)

    @cached_property
    def scheduler(self) -> Scheduler:
        """Which batch chunk a turn runs next (shared/schedule.py)."""
        return Scheduler(self.redis, self.settings)

    @property
    def holder(self) -> str:
        """This process as its heartbeat key and its leases name it."""
        return holder_id(self.hostname, os.getpid(), process_nonce())

    def model_for(self, options: JobOptions, owner: str) -> LoadedModel:
        """The model ``options.model`` names, for a record of ``owner``: an enabled
        architecture or one of the owner's uploads, loaded now if it is not resident
        (docs/design.md "Models"). An upload deleted since submission fails
        ``model_deleted``."""
        from worker.compute.resident import ResidentModels

        if self.models is None:
            self.models = ResidentModels(
                self.loaded, self._load, capacity=self.settings.resident_models
            )
        options.check_enabled(self.settings.enabled_models)
        if is_upload_id(options.model):
            # Read every time, resident or not: a deleted upload is not used again.
            uploaded = self._uploaded(options.model, owner)
            check_upload_enabled(uploaded.id, uploaded.architecture, self.settings.enabled_models)
        return self.models.get(options.model)

    def _uploaded(self, model: str, owner: str | None) -> UploadedModel:
        try:
            return ModelStore(self.redis).get(model, owner=owner)
        except ModelNotFound as exc:
            if self.models is not None:
                self.models.discard(model)
            raise FeatureMapsError(
                f"the uploaded model {model} was deleted (or is not this token's); upload it "
                "again and resubmit",
                code=MODEL_DELETED,
            ) from exc

    def _load(self, key: str) -> LoadedModel:
        from worker.compute.model import load_model

        settings = self.settings
        log.info("loading model %s", key)
        if is_upload_id(key):
            return self._load_upload(self._uploaded(key, None))
        return load_model(
            settings.weights, device=settings.device, seed=settings.weights_seed, architecture=key
        )

    def _load_upload(self, uploaded: UploadedModel) -> LoadedModel:
        """Copy the weights from storage to a temporary file (never whole in memory), check
        their digest, and load them strictly (worker/compute/model.py)."""
        from worker.compute.model import load_uploaded

        suffix = Path(uploaded.key).suffix
        with tempfile.NamedTemporaryFile(suffix=suffix) as copy:
            digest = hashlib.sha256()
            try:
                with self.store.open(uploaded.key) as source:
                    for block in iter(lambda: source.read(1 << 20), b""):
                        digest.update(block)
                        copy.write(block)
            except NotFound as exc:
                raise FeatureMapsError(
                    f"the weights of uploaded model {uploaded.id} are gone from storage",
                    code=MODEL_DELETED,
                ) from exc
            copy.flush()
            if digest.hexdigest() != uploaded.sha256:
                raise FeatureMapsError(
                    f"the stored weights of model {uploaded.id} do not match their SHA-256"
                )
            return load_uploaded(
                uploaded.architecture,
                Path(copy.name),
                uploaded.weights_identity(),
                device=self.settings.device,
            )

    def release_lease(self, fence: Fence) -> None:
        try:
            self.leases.release(fence)
        except RedisError as exc:
            log.warning("lease of task %s not given back now (retried): %s", fence.task_id, exc)
            self.unreleased.append(fence)

    def release_pending(self) -> None:
        while self.unreleased:
            self.leases.release(self.unreleased[0])
            self.unreleased.pop(0)

    def beat(self) -> None:
        """Refresh this process's heartbeat, then give back leases Redis missed."""
        write_heartbeat(self.redis, self.heartbeat_info())
        self.release_pending()

    def heartbeat_info(self) -> dict:
        from worker.compute.model import load_count

        return {
            "hostname": self.hostname,
            "pid": os.getpid(),
            "nonce": process_nonce(),
            "device": self.device,
            "weights": getattr(self.loaded, "weights", None),
            # Counted inside load_model itself: proof that the model stays resident.
            "model_loads": load_count(),
            "resident_models": self.models.resident() if self.models else [],
            "jobs_done": self.jobs_done,
            "started": self.started,
        }


_context: WorkerContext | None = None


def init_process(settings: Settings, hostname: str) -> WorkerContext:
    """Build this process's context and load the model (once)."""
    global _context
    from worker.compute.model import load_model  # torch is imported here, after the fork

    loaded = load_model(settings.weights, device=settings.device, seed=settings.weights_seed)
    redis = Redis.from_url(settings.redis_url, socket_connect_timeout=3, socket_timeout=10)
    _context = WorkerContext(
        settings=settings,
        hostname=hostname,
        redis=redis,
        jobs=JobStore(redis, ttl_s=settings.job_ttl_s),
        batches=BatchStore(redis, ttl_s=settings.job_ttl_s),
        leases=LeaseStore(redis, ttl_s=settings.visibility_timeout_s),
        store=ObjectStore.from_settings(settings),
        loaded=loaded,
        device=describe_device(loaded.device),
    )
    log.info("model loaded on %s with weights %s", _context.device, loaded.weights)
    ensure_bucket(_context.store, log)
    if settings.worker_metrics_port:
        metrics.start_server(
            settings.worker_metrics_port, loaded.device, lambda: _context and _context.models
        )
    _start_threads(_context)
    return _context


def _start_threads(ctx: WorkerContext) -> None:
    """The heartbeat and retention sweeps (worker/retention.py), each a daemon thread of this
    process, and the keeper (keeper/runner.py), which the API runs too."""
    ttl_s = ctx.settings.job_ttl_s
    for period_s, work, what in (
        (HEARTBEAT_EVERY_S, ctx.beat, "heartbeat"),
        (
            sweep_interval_s(ttl_s),
            lambda: maybe_sweep(ctx.store, ctx.redis, ttl_s=ttl_s, holder=ctx.holder),
            "retention sweep",
        ),
    ):
        threading.Thread(target=periodically, args=(period_s, work, what), daemon=True).start()
    send = celery_sender(make_producer(ctx.settings))
    start_keeper(ctx.redis, ctx.store, ctx.settings, send=send, holder=ctx.holder)


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
