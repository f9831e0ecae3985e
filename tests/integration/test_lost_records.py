"""A job accepted (202) and then lost with the last second of Redis's append-only file: its
record and its message are the newest writes, and an AOF loses a suffix, so both go. The
suffix is removed here by hand (the record's key and the message), on a real stack (gunicorn
API, redis-server, S3, then a Celery worker): the job's next poll finds its spec beside its
input and restores it, and a worker runs it (api/restore.py)."""

from __future__ import annotations

import json
import time

import pytest
import requests

from keeper.counters import REPAIR, counts
from shared import keys
from shared.jobs import job_key
from shared.queue import JOBS_QUEUE
from tests.helpers import accepted, png, submit_job, wait_for_job
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


def _lose(dep: Deployment, job_id: str) -> None:
    """What an AOF missing its last second takes: the record and the message."""
    assert dep.redis.delete(job_key(job_id)) == 1
    lost = [raw for raw in dep.redis.lrange(JOBS_QUEUE, 0, -1) if job_id in raw.decode()]
    assert len(lost) == 1
    dep.redis.lrem(JOBS_QUEUE, 1, lost[0])


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
    # The input folder, spec included, is released with the job (KEEP_INPUTS off).
    store = deployment.object_store()
    deadline = time.monotonic() + 30
    while list(store.list_keys(keys.inputs_prefix(job_id))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not list(store.list_keys(keys.inputs_prefix(job_id)))


def test_a_lost_job_older_than_the_ttl_is_not_restored(deployment):
    """Past JOB_TTL_HOURS its record may have expired normally: a 404 stays a 404."""
    api = deployment.api
    store = deployment.object_store()
    for worker in deployment.processes[1:]:
        worker.stop()  # keep the message queued while the test edits the spec
    job_id = accepted(submit_job(api, png((40, 30), (90, 9, 9)), headers=_auth("alice")))
    _lose(deployment, job_id)
    spec = json.loads(store.get_bytes(keys.job_spec_key(job_id)))
    spec["created_at"] = "2020-01-01T00:00:00+00:00"
    store.put_bytes(keys.job_spec_key(job_id), json.dumps(spec).encode(), "application/json")
    response = requests.get(f"{api}/jobs/{job_id}", headers=_auth("alice"), timeout=10)
    assert response.status_code == 404
    assert not deployment.redis.exists(job_key(job_id))
