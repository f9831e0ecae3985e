"""A real featuremaps deployment for integration tests: gunicorn API processes and Celery
worker processes (started with the launcher's own command lines) on top of the suite's
redis-server and SeaweedFS. Everything is reached over HTTP / Redis / S3, never in-process."""

from __future__ import annotations

import os
import socket
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

from redis import Redis

from shared.heartbeat import live_workers
from shared.queue import WORKER_QUEUES
from shared.settings import Settings
from shared.storage import ObjectStore
from stack.commands import (
    API_CONFIG,
    CELERY_APP,
    api_command,
    cpu_worker_env,
    wait_for_api,
    worker_command,
)
from stack.local import service_env
from stack.services import ManagedProcess, free_port, wait_until


class Deployment:
    # Whether the keeper runs as in production: in the API too (api/gunicorn_conf.py), and
    # with the reconciler's default grace period. Off here: these tests write records by hand
    # that no message goes with (a batch left finalizing, a job queued before its message is
    # sent), which the workers' reconciler would repair after a minute; it waits an hour
    # instead. On in the fault stacks (tests/chaos/), which test the keeper.
    KEEPER = False

    def __init__(self, run_dir: Path, *, redis_url: str, s3, bucket: str, **settings) -> None:
        self.run_dir = run_dir
        self.redis_url = redis_url
        self.s3 = s3
        self.bucket = bucket
        if not self.KEEPER:
            settings.setdefault("reconcile_grace_s", 3600)
        self.settings = settings
        self.processes: list[ManagedProcess] = []
        self.redis = Redis.from_url(redis_url)

    @classmethod
    @contextmanager
    def started(
        cls,
        run_dir: Path,
        redis_server,
        s3_server,
        *,
        name: str,
        db: int,
        worker: str = "w1",
        **settings,
    ) -> Iterator[Deployment]:
        """A module's deployment: its own Redis database (flushed) and bucket on the suite's
        servers, one API and one worker; everything is stopped on exit."""
        dep = cls(
            run_dir,
            redis_url=redis_server.url.rsplit("/", 1)[0] + f"/{db}",
            s3=s3_server,
            bucket=f"{name}-{uuid.uuid4().hex[:8]}",
            **settings,
        )
        dep.redis.flushdb()
        try:
            dep.api = dep.start_api()
            dep.workers = [dep.start_worker(worker)]
            yield dep
        finally:
            dep.stop()

    def service_settings(self) -> Settings:
        """The settings the API and workers of this deployment run with."""
        prefix = "FEATUREMAPS_"
        values = {
            k.removeprefix(prefix).lower(): v for k, v in self.env().items() if k.startswith(prefix)
        }
        return Settings(**{k: v for k, v in values.items() if k in Settings.model_fields})

    def object_store(self) -> ObjectStore:
        """A client for this deployment's bucket (created if the API has not yet)."""
        store = ObjectStore.from_settings(self.service_settings())
        store.ensure_bucket()
        return store

    def env(self, **overrides) -> dict[str, str]:
        """The environment of this deployment's processes: this one's, with the services,
        the bucket, random weights, the deployment's settings and ``overrides`` laid over."""
        services = Settings(
            redis_url=self.redis_url,
            s3_endpoint=self.s3.endpoint,
            s3_access_key=self.s3.access_key,
            s3_secret_key=self.s3.secret_key,
            s3_bucket=self.bucket,
            weights="random",
        )
        return {**os.environ, **service_env(services, **{**self.settings, **overrides})}

    def start_api(self, name: str = "api", **overrides) -> str:
        port = free_port()
        config = API_CONFIG if self.KEEPER else None
        process = ManagedProcess(
            name,
            api_command(f"127.0.0.1:{port}", timeout_s=60, config=config),
            env=self.env(**overrides),
            log_path=self.run_dir / f"{name}.log",
        )
        process.start()
        self.processes.append(process)
        url = f"http://127.0.0.1:{port}"
        wait_for_api(url, process, timeout_s=30)
        return url

    def start_worker(
        self,
        name: str,
        *,
        queues: str = WORKER_QUEUES,
        app: str | None = None,
        extra_env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
        timeout_s: float = 90,
        **overrides,
    ) -> ManagedProcess:
        """A worker started with the launcher's command line (the Celery ``app`` module
        swapped in when given), running until it beats; ``overrides`` are settings."""
        hostname = f"{name}@{socket.gethostname()}"
        argv = worker_command(hostname, queues=queues, app=app or CELERY_APP)
        env = {**self.env(**overrides), **cpu_worker_env(1), **(extra_env or {})}
        process = ManagedProcess(
            name, argv, env=env, log_path=self.run_dir / f"{name}.log", cwd=cwd
        )
        process.start()
        self.processes.append(process)
        wait_until(
            lambda: hostname in self.worker_hostnames(),
            timeout_s=timeout_s,
            process=process,
            what=f"worker {hostname} heartbeat",
        )
        process.hostname = hostname
        return process

    def worker_hostnames(self) -> set[str]:
        return {w["hostname"] for w in live_workers(self.redis)}

    def stop(self) -> None:
        for process in reversed(self.processes):
            process.stop()
        self.processes.clear()
