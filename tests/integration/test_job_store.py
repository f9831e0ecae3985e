"""JobStore against a real redis-server: transitions are atomic and guarded."""

import threading

import pytest

from shared.errors import Conflict
from shared.jobs import Job, JobNotFound, JobStatus, JobStore, new_job_id


@pytest.fixture
def jobs(redis_client):
    return JobStore(redis_client, ttl_s=60)


def _queued(jobs, owner=""):
    return jobs.create(
        Job(id=new_job_id(), status=JobStatus.QUEUED, options={}, input_key="k", owner=owner)
    )


def test_unknown_id_is_not_found(jobs):
    with pytest.raises(JobNotFound):
        jobs.get("does-not-exist")
    with pytest.raises(JobNotFound):
        jobs.get("../../etc/passwd")


def test_lifecycle_and_ttl(jobs, redis_client):
    job = _queued(jobs)
    key = f"featuremaps:job:{job.id}"
    # A job that waits or runs never expires (a long backlog must not make it vanish);
    # it expires JOB_TTL after it ends.
    assert redis_client.ttl(key) == -1
    outcome = jobs.start(job.id, worker="w@h", device="cpu", max_attempts=3)
    assert outcome.started and outcome.attempts == 1
    assert redis_client.ttl(key) == -1
    assert jobs.succeed(job.id, result={"figure_key": "f"}, timings={"model_ms": 1.0})
    assert 0 < redis_client.ttl(key) <= 60
    done = jobs.get(job.id)
    assert done.status is JobStatus.SUCCEEDED and done.worker == "w@h"
    assert done.result == {"figure_key": "f"} and done.finished_at
    # A finished job is never started, failed or canceled again.
    assert not jobs.start(job.id, worker="x", device="cpu", max_attempts=3).started
    assert not jobs.fail(job.id, code="x", message="y")
    with pytest.raises(Conflict):
        jobs.cancel(job.id)


def test_only_one_of_many_concurrent_starts_wins(jobs):
    job = _queued(jobs)
    results = []
    barrier = threading.Barrier(8)

    def racer(i):
        barrier.wait()
        results.append(jobs.succeed(job.id, result={"by": i}, timings={}))

    jobs.start(job.id, worker="w", device="cpu", max_attempts=3)
    threads = [threading.Thread(target=racer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results.count(True) == 1


def test_redelivery_counts_lost_attempts_then_fails_worker_lost(jobs):
    job = _queued(jobs)
    for attempt in (1, 2, 3):
        outcome = jobs.start(job.id, worker="w", device="cpu", max_attempts=3)
        assert outcome.started and outcome.attempts == attempt
    # The third start found it running: the worker died twice; one more death ends it.
    outcome = jobs.start(job.id, worker="w", device="cpu", max_attempts=3)
    assert outcome.status == "exhausted"
    failed = jobs.get(job.id)
    assert failed.status is JobStatus.FAILED and failed.error["code"] == "worker_lost"


def test_cancel_queued_then_start_is_a_no_op(jobs):
    job = _queued(jobs)
    assert jobs.cancel(job.id).status is JobStatus.CANCELED
    outcome = jobs.start(job.id, worker="w", device="cpu", max_attempts=3)
    assert not outcome.started and outcome.status == "canceled"


def test_owner_mismatch_is_not_found(jobs):
    job = _queued(jobs, owner="alice")
    assert jobs.get(job.id, owner="alice").id == job.id
    with pytest.raises(JobNotFound):
        jobs.get(job.id, owner="bob")
    with pytest.raises(JobNotFound):
        jobs.cancel(job.id, owner="bob")


def test_requeue_then_restart_is_not_counted_as_lost(jobs):
    job = _queued(jobs)
    jobs.start(job.id, worker="w", device="cpu", max_attempts=1)
    assert jobs.requeue(job.id, reason="storage down")
    assert jobs.get(job.id).status is JobStatus.QUEUED
    assert jobs.start(job.id, worker="w", device="cpu", max_attempts=1).started
