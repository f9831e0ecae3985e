"""A job or batch accepted (202) and then lost with the last second of Redis's append-only
file: its record and its message are the newest writes, and an AOF loses a suffix, so both go.
The suffix is removed here by hand (the record's keys and the message), on a real stack
(gunicorn API, redis-server, S3, then a Celery worker): the next poll finds the record's spec
in storage and restores it, and a worker runs it (keeper/restore.py). The keeper's sweep, for
records nobody polls, is tested here by calling it, and in tests/chaos/test_lost_records.py
on a Redis restarted from a truncated append-only file."""

from __future__ import annotations

import json
import time

import pytest
import requests

from keeper.counters import REPAIR, counts
from keeper.reconciler import celery_sender
from keeper.restore import restore_unpolled
from shared import keys
from shared.batches import BatchStore
from shared.jobs import JobStore, job_key
from shared.queue import BATCH_QUEUE, JOBS_QUEUE, RENDER_JOB, make_producer
from shared.settings import Settings
from tests.helpers import (
    accepted,
    png,
    submit_archive,
    submit_job,
    wait_for_batch,
    wait_for_job,
    zip_of,
)
from tests.integration.deployment import Deployment

TOKENS = {"alice": "alice-restore-token", "bob": "bob-restore-token"}


def _auth(owner: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {TOKENS[owner]}"}


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    dep = Deployment(
        tmp_path_factory.mktemp("lost"),
        redis_url=redis_server.url.rsplit("/", 1)[0] + "/24",
        s3=s3_server,
        bucket=f"lost-{int(time.time())}",
        api_tokens=",".join(f"{name}:{token}" for name, token in TOKENS.items()),
    )
    dep.redis.flushdb()
    try:
        dep.api = dep.start_api()  # no worker yet: the message must still be queued
        yield dep
    finally:
        dep.stop()


def _lose(dep: Deployment, record_id: str, *, kind: str = "job") -> None:
    """What an AOF missing its last second takes: the record and the message."""
    store = JobStore if kind == "job" else BatchStore
    assert dep.redis.delete(*store(dep.redis, ttl_s=60).record_keys(record_id)) >= 1
    queue = JOBS_QUEUE if kind == "job" else BATCH_QUEUE
    lost = [raw for raw in dep.redis.lrange(queue, 0, -1) if record_id in raw.decode()]
    assert len(lost) == 1
    dep.redis.lrem(queue, 1, lost[0])


def test_a_job_lost_after_its_202_is_restored_by_its_next_poll_and_runs(deployment):
    api = deployment.api
    job_id = accepted(submit_job(api, png((40, 30), (9, 99, 9)), headers=_auth("alice")))
    _lose(deployment, job_id)

    # Another token's poll restores nothing: the job stays invisible to it.
    other = requests.get(f"{api}/jobs/{job_id}", headers=_auth("bob"), timeout=10)
    assert other.status_code == 404
    assert not deployment.redis.exists(job_key(job_id))

    doc = requests.get(f"{api}/jobs/{job_id}", headers=_auth("alice"), timeout=10)
    assert doc.status_code == 200, doc.text
    assert doc.json()["status"] == "queued"
    assert counts(deployment.redis, REPAIR)["job_restored"] == 1
    assert deployment.redis.llen(JOBS_QUEUE) == 1

    deployment.start_worker("lost1")
    done = wait_for_job(api, job_id, headers=_auth("alice"))
    assert done["status"] == "succeeded", done
    assert requests.get(f"{api}/jobs/{job_id}/figure", headers=_auth("alice"), timeout=10).ok
    # The input folder and the spec are released with the job (KEEP_INPUTS off).
    store = deployment.object_store()
    left = lambda: [*store.list_keys(keys.inputs_prefix(job_id)), *_specs(store, job_id)]  # noqa: E731
    deadline = time.monotonic() + 30
    while left() and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not left()


def _specs(store, record_id: str) -> list[str]:
    return [k for k in store.list_keys(keys.SPECS_PREFIX) if record_id in k]


def test_a_batch_lost_after_its_202_is_restored_by_its_next_poll_and_runs(deployment):
    api = deployment.api
    for worker in deployment.processes[1:]:
        worker.stop()  # the expansion's message must still be queued when it is lost
    files = {f"p{i}.png": png((30 + i, 20), (i, 80, 9)) for i in range(3)}
    batch_id = accepted(submit_archive(api, "photos.zip", zip_of(files), headers=_auth("alice")))
    assert _specs(deployment.object_store(), batch_id) == [keys.spec_key("batch", batch_id)]
    _lose(deployment, batch_id, kind="batch")

    other = requests.get(f"{api}/batches/{batch_id}", headers=_auth("bob"), timeout=10)
    assert other.status_code == 404
    doc = requests.get(f"{api}/batches/{batch_id}", headers=_auth("alice"), timeout=10)
    assert doc.status_code == 200, doc.text
    assert doc.json()["status"] == "queued"
    assert counts(deployment.redis, REPAIR)["batch_restored"] == 1

    deployment.start_worker("lost2")
    done = wait_for_batch(api, batch_id, headers=_auth("alice"))
    assert done["status"] == "succeeded" and done["counts"]["succeeded"] == 3, done
    assert not _specs(deployment.object_store(), batch_id)


def test_the_keepers_sweep_restores_what_nobody_polls(deployment):
    """A client that waits for its webhook never polls: the keeper's sweep finds the spec
    whose record is gone (past the grace period, younger than the TTL) and restores it."""
    api = deployment.api
    for worker in deployment.processes[1:]:
        worker.stop()
    store = deployment.object_store()
    lost = accepted(submit_job(api, png((20, 20), (5, 5, 250)), headers=_auth("alice")))
    kept = accepted(submit_job(api, png((20, 20), (5, 250, 5)), headers=_auth("bob")))
    _lose(deployment, lost)
    settings = Settings(
        redis_url=deployment.redis_url, s3_bucket=deployment.bucket, reconcile_grace_s=3600
    )
    sent: list[tuple[str, list]] = []
    producer = celery_sender(make_producer(settings))

    def send(task, *, args, queue, priority=None, task_id=None):
        sent.append((task, args))
        producer(task, args=args, queue=queue, priority=priority, task_id=task_id)

    assert restore_unpolled(deployment.redis, store, settings, send) == {"job": 0, "batch": 0}
    settings = settings.model_copy(update={"reconcile_grace_s": 0})
    assert restore_unpolled(deployment.redis, store, settings, send) == {"job": 1, "batch": 0}
    assert sent == [(RENDER_JOB, [lost])]
    assert JobStore(deployment.redis, ttl_s=60).get(lost).owner == "alice"
    assert deployment.redis.exists(job_key(kept))
    # Restored once: the next sweep finds its record.
    assert restore_unpolled(deployment.redis, store, settings, send) == {"job": 0, "batch": 0}
    assert len(sent) == 1
    deployment.start_worker("lost3")
    assert wait_for_job(api, lost, headers=_auth("alice"))["status"] == "succeeded"
    assert wait_for_job(api, kept, headers=_auth("bob"))["status"] == "succeeded"


def test_a_lost_job_older_than_the_ttl_is_not_restored(deployment):
    """Past JOB_TTL_HOURS its record may have expired normally: a 404 stays a 404."""
    api = deployment.api
    store = deployment.object_store()
    for worker in deployment.processes[1:]:
        worker.stop()  # keep the message queued while the test edits the spec
    job_id = accepted(submit_job(api, png((40, 30), (90, 9, 9)), headers=_auth("alice")))
    _lose(deployment, job_id)
    spec = json.loads(store.get_bytes(keys.spec_key("job", job_id)))
    spec["created_at"] = "2020-01-01T00:00:00+00:00"
    store.put_bytes(keys.spec_key("job", job_id), json.dumps(spec).encode(), "application/json")
    response = requests.get(f"{api}/jobs/{job_id}", headers=_auth("alice"), timeout=10)
    assert response.status_code == 404
    assert not deployment.redis.exists(job_key(job_id))
