"""Redis and S3 going away under a running deployment: the API says 503 (never 500) while a
dependency is down, and every job finishes once it is back — or, past the retry budget,
fails with ``storage_unavailable``."""

from __future__ import annotations

import time

import pytest
import requests

from shared.delayed import DELAYED_KEY
from stack.services import wait_until
from tests.chaos.conftest import JOB_OUTPUTS
from tests.chaos.faults import HOLD, marked_png
from tests.chaos.test_lost_node import DEFAULT_LIMITS


def _retrying(stack, job_id: str) -> bool:
    doc = stack.job(job_id)
    return doc["status"] == "queued" and (doc["error"] or {}).get("code") == "retrying"


@pytest.mark.parametrize("running_job_ends", ["after_redis_is_back", "while_redis_is_down"])
def test_redis_restart_with_jobs_queued_and_running_loses_nothing(make_stack, running_job_ends):
    stack = make_stack()
    stack.start_worker("w1")
    running = stack.submit(marked_png(HOLD))
    queued = [stack.submit(marked_png(color=(i, 70, 70))) for i in range(3)]
    stack.wait_event("hold")

    stack.redis_server.stop()
    try:
        answers = {
            "submit": requests.post(
                f"{stack.api}/jobs", files={"image": ("a.png", marked_png())}, timeout=60
            ),
            "status": requests.get(f"{stack.api}/jobs/{running}", timeout=60),
            "figure": requests.get(f"{stack.api}/jobs/{running}/figure", timeout=60),
            "cancel": requests.delete(f"{stack.api}/jobs/{queued[0]}", timeout=60),
            "ready": requests.get(f"{stack.api}/readyz", timeout=60),
        }
        for what, response in answers.items():
            assert response.status_code == 503, (what, response.status_code, response.text)
        for what in ("submit", "status", "figure", "cancel"):
            assert answers[what].json()["error"]["code"] == "unavailable", what
        assert requests.get(f"{stack.api}/healthz", timeout=60).status_code == 200
        if running_job_ends == "while_redis_is_down":
            # It cannot record its result: the task gives up with a Redis error.
            stack.release()
            stack.wait_event("task-raised")
    finally:
        stack.redis_server.start()
    stack.release()

    # The append-only file brought back every record and message.
    for job_id in [running, *queued]:
        doc = stack.wait_finished(job_id)
        assert doc["status"] == "succeeded", doc
        assert stack.outputs(job_id) == JOB_OUTPUTS
    # A task that could not record its end was delivered again and ran once more.
    expected_attempts = 2 if running_job_ends == "while_redis_is_down" else 1
    assert stack.job(running)["attempts"] == expected_attempts
    later = stack.submit(marked_png(color=(3, 3, 3)))
    assert stack.wait_finished(later)["status"] == "succeeded"
    wait_until(stack.queue_is_drained, timeout_s=60, what="empty queue")


def test_s3_down_while_uploading_retries_with_backoff_and_succeeds(make_stack):
    stack = make_stack(storage_retries=6, storage_retry_backoff_s=0.5)
    stack.start_worker("w1")
    job_id = stack.submit(marked_png(HOLD))
    stack.wait_event("hold")
    stack.s3_server.stop()
    try:
        stack.release()
        # The upload failed and the job went back to the queue for a retry with backoff.
        wait_until(lambda: _retrying(stack, job_id), timeout_s=60, what="job requeued")
    finally:
        stack.s3_server.start()
    doc = stack.wait_finished(job_id)
    assert doc["status"] == "succeeded", doc
    assert doc["attempts"] >= 2 and doc["error"] is None
    assert stack.outputs(job_id) == JOB_OUTPUTS
    # KEEP_INPUTS=false: the input outlived the retry (it ran again) and goes once it ended.
    wait_until(
        lambda: not list(stack.store().list_keys(f"inputs/{job_id}/")),
        timeout_s=30,
        what="input deleted after the job ended",
    )


def test_a_worker_killed_while_its_job_waits_out_a_storage_retry_loses_nothing(make_stack):
    """The retry waits out its backoff in Redis, not in the worker's hands (shared/delayed.py):
    with that worker killed, and the visibility timeout at its production 600 s, the API's
    keeper queues the retry when it is due and the next worker runs it."""
    stack = make_stack(storage_retries=6, storage_retry_backoff_s=6, **DEFAULT_LIMITS)
    lost = stack.start_worker("w1")
    job_id = stack.submit(marked_png(HOLD))
    stack.wait_event("hold")
    stack.s3_server.stop()
    try:
        stack.release()
        wait_until(lambda: _retrying(stack, job_id), timeout_s=60, what="job requeued")
        assert stack.redis.zcard(DELAYED_KEY) == 1, "the retry waits in Redis"
        lost.kill()
        killed_at = time.time()
        assert stack.redis.hlen("unacked") == 0, "nothing held by the killed worker"
    finally:
        stack.s3_server.start()
    live = stack.start_worker("w2")
    doc = stack.wait_finished(job_id, timeout_s=120)
    print(
        f"\nkilled during the backoff → done on another worker in {time.time() - killed_at:.1f} s"
    )
    assert doc["status"] == "succeeded" and doc["worker"] == live.hostname, doc
    assert doc["error"] is None and doc["attempts"] == 2
    assert stack.outputs(job_id) == JOB_OUTPUTS
    wait_until(stack.queue_is_drained, timeout_s=30, what="empty queue")
    assert stack.redis.zcard(DELAYED_KEY) == 0


def test_s3_down_past_the_retry_budget_fails_storage_unavailable(make_stack):
    stack = make_stack(storage_retries=2, storage_retry_backoff_s=0.2)
    job_id = stack.submit(marked_png())  # queued: no worker yet
    stack.s3_server.stop()
    try:
        stack.start_worker("w1")
        doc = stack.wait_finished(job_id)
        assert doc["status"] == "failed", doc
        assert doc["error"]["code"] == "storage_unavailable"
        assert "gave up after 2 retries" in doc["error"]["message"]
        assert doc["attempts"] == 3  # the first try and two retries
    finally:
        stack.s3_server.start()
    # Storage is back: the worker serves the next job.
    later = stack.submit(marked_png(color=(5, 5, 5)))
    assert stack.wait_finished(later)["status"] == "succeeded"
    assert stack.job(job_id)["status"] == "failed"
    wait_until(stack.queue_is_drained, timeout_s=60, what="empty queue")
