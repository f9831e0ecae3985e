"""Workers that die, hang or are stopped mid-job: no job is lost, none runs forever, none
leaves two sets of outputs, and the other jobs keep flowing."""

from __future__ import annotations

import os
import signal

from stack.services import wait_until
from tests.chaos.conftest import JOB_OUTPUTS
from tests.chaos.faults import HOLD, HOLD_UPLOAD, KILL, SLOW, marked_png

# One set of outputs for a job with default options: the figure and the manifest.


def test_sigkill_pool_process_mid_job_the_job_is_redelivered_and_succeeds_once(make_stack):
    stack = make_stack()
    stack.start_worker("w1")
    held = stack.submit(marked_png(HOLD_UPLOAD))
    others = [stack.submit(marked_png(color=(i, 9, 9))) for i in range(3)]
    # Every output but the manifest (written last) is in storage when the process dies.
    (child,) = stack.wait_event("hold-upload")
    assert stack.outputs(held) == [name for name in JOB_OUTPUTS if name != "manifest.json"]
    os.kill(child, signal.SIGKILL)
    stack.release()

    doc = stack.wait_finished(held)
    assert doc["status"] == "succeeded", doc
    assert doc["attempts"] == 2, "delivered again after the pool process died"
    assert stack.outputs(held) == JOB_OUTPUTS
    for job_id in others:
        assert stack.wait_finished(job_id)["status"] == "succeeded"
        assert stack.outputs(job_id) == JOB_OUTPUTS
    # The rerun happened in a new pool process, and nothing is left to deliver.
    assert [pid for event, pid in stack.events() if event == "hold-upload"][-1] != child
    wait_until(stack.queue_is_drained, timeout_s=30, what="empty queue")


def test_sigkill_whole_worker_mid_job_a_restarted_worker_finishes_it(make_stack):
    stack = make_stack()
    first = stack.start_worker("w1")
    held = stack.submit(marked_png(HOLD))
    queued = [stack.submit(marked_png(color=(i, 50, 9))) for i in range(2)]
    stack.wait_event("hold")
    first.kill()  # SIGKILL to the main process and its pool at once
    assert stack.job(held)["status"] == "running"
    stack.release()

    stack.start_worker("w2")
    for job_id in [held, *queued]:
        doc = stack.wait_finished(job_id)
        assert doc["status"] == "succeeded", doc
        assert doc["worker"].startswith("w2@")
        assert stack.outputs(job_id) == JOB_OUTPUTS
    assert stack.job(held)["attempts"] == 2
    wait_until(stack.queue_is_drained, timeout_s=30, what="empty queue")


def test_poison_image_fails_worker_lost_after_max_attempts_and_others_flow(make_stack):
    stack = make_stack(max_attempts=3)
    stack.start_worker("w1")
    poison = stack.submit(marked_png(KILL))
    others = [stack.submit(marked_png(color=(9, i, 9))) for i in range(4)]

    doc = stack.wait_finished(poison)
    assert doc["status"] == "failed" and doc["error"]["code"] == "worker_lost", doc
    assert doc["attempts"] == 3
    for job_id in others:
        assert stack.wait_finished(job_id)["status"] == "succeeded"
    assert stack.result_keys(poison) == []

    # No endless redelivery: the killing input ran exactly max_attempts times, the queue is
    # empty, and a job submitted afterwards runs without the poison coming back.
    wait_until(stack.queue_is_drained, timeout_s=30, what="empty queue")
    later = stack.submit(marked_png(color=(1, 2, 3)))
    assert stack.wait_finished(later)["status"] == "succeeded"
    assert [event for event, _ in stack.events()].count("kill") == 3
    assert stack.job(poison)["status"] == "failed"


def test_task_over_its_time_limit_fails_timeout_and_worker_keeps_serving(make_stack):
    stack = make_stack(task_soft_time_limit_s=5, task_time_limit_s=10, visibility_timeout_s=30)
    worker = stack.start_worker("w1")
    slow = stack.submit(marked_png(SLOW))
    after = stack.submit(marked_png(color=(200, 1, 1)))

    doc = stack.wait_finished(slow)
    assert doc["status"] == "failed" and doc["error"]["code"] == "timeout", doc
    assert doc["attempts"] == 1
    assert stack.result_keys(slow) == []
    doc = stack.wait_finished(after)
    assert doc["status"] == "succeeded" and doc["worker"] == worker.hostname
    # A failed job's input goes too (KEEP_INPUTS=false): the one worker ran `after` once the
    # failed job's task, which deletes it, had returned.
    assert not list(stack.store().list_keys(f"inputs/{slow}/"))
    # The soft limit interrupted the sleep: it never ran to its end.
    assert "slow-not-interrupted" not in [event for event, _ in stack.events()]
    assert worker.is_running
    wait_until(stack.queue_is_drained, timeout_s=30, what="empty queue")


def test_sigterm_mid_job_finishes_the_job_and_the_rest_run_on_the_next_worker(make_stack):
    stack = make_stack()
    first = stack.start_worker("w1")
    held = stack.submit(marked_png(HOLD))
    queued = [stack.submit(marked_png(color=(i, 9, 200))) for i in range(2)]
    stack.wait_event("hold")
    os.kill(first.pid, signal.SIGTERM)  # a deploy: Celery's warm shutdown
    stack.release()
    assert first.wait(60) == 0, "warm shutdown exits cleanly once the job is done"

    doc = stack.job(held)
    assert doc["status"] == "succeeded" and doc["worker"] == first.hostname, doc
    stack.start_worker("w2")
    for job_id in queued:
        doc = stack.wait_finished(job_id)
        assert doc["status"] == "succeeded", doc
    for job_id in [held, *queued]:
        assert stack.outputs(job_id) == JOB_OUTPUTS
    wait_until(stack.queue_is_drained, timeout_s=30, what="empty queue")
