"""The keeper in the API (keeper/, started by api/gunicorn_conf.py): with every worker gone, as
when the workers are scaled to zero, the API alone still hands a lost node's work back to its
queue, reports it as backlog for the autoscaler, and re-sends a lost finalize; a worker
started afterwards finishes the work.

Lost-node timings are the production defaults (visibility 600 s: kombu's restore cannot be what
brings the work back); the reconciler sweeps every second with a 2 s grace period here.
"""

from __future__ import annotations

import re
import time

import requests

from keeper.reconciler import SUSPECTS_KEY
from shared.batches import batch_key
from shared.heartbeat import HEARTBEAT_TTL_S
from shared.queue import JOBS_QUEUE, UNACKED_KEY
from shared.records import OPEN_KEY
from stack.services import wait_until
from tests.chaos.conftest import JOB_OUTPUTS, ChaosStack
from tests.chaos.faults import HOLD, marked_png
from tests.chaos.test_lost_node import DEFAULT_LIMITS
from tests.helpers import zip_of

FAST_RECONCILER = {"reconcile_every_s": 1, "reconcile_grace_s": 2}


def _backlog(stack: ChaosStack) -> dict[str, int]:
    response = requests.get(f"{stack.api}/backlog", timeout=10)
    assert response.status_code == 200, response.text
    return response.json()


def _metric(stack: ChaosStack, name: str, **labels: str) -> float:
    body = requests.get(f"{stack.api}/metrics", timeout=10).text
    selector = ",".join(f'{k}="{v}"' for k, v in labels.items())
    series = re.escape(f"{name}{{{selector}}}" if labels else name)
    match = re.search(rf"^{series} (\S+)$", body, re.MULTILINE)
    assert match, f"{name} {labels} not in /metrics"
    return float(match.group(1))


def test_with_every_worker_killed_the_api_hands_the_job_back_and_a_new_worker_finishes_it(
    make_stack,
):
    stack = make_stack(**DEFAULT_LIMITS)
    lost = stack.start_worker("w1")
    held = stack.submit(marked_png(HOLD))
    stack.wait_event("hold")
    assert _backlog(stack)["in_flight"] == 1, "a running job is work for a worker"

    lost.kill()  # main process and pool: no worker left at all
    killed_at = time.time()
    wait_until(
        lambda: stack.redis.llen(JOBS_QUEUE) == 1 and stack.redis.hlen(UNACKED_KEY) == 0,
        timeout_s=45,
        what="the API's keeper moving the lost worker's message back to its queue",
    )
    print(f"\nno worker: kill → message back in its queue in {time.time() - killed_at:.1f} s")
    backlog = _backlog(stack)
    assert backlog["waiting_jobs"] == 1 and backlog["for_workers"] == 1, backlog
    assert _metric(stack, "featuremaps_queue_depth", queue="jobs") == 1
    assert _metric(stack, "featuremaps_handovers_total", task="render_job") == 1
    # The metric counts fresh heartbeats: any left by the killed processes expire by
    # themselves within HEARTBEAT_TTL_S (the holder's had, or its work would not be back).
    wait_until(
        lambda: _metric(stack, "featuremaps_workers_alive") == 0,
        timeout_s=HEARTBEAT_TTL_S + 5,
        what="no worker alive in /metrics once the killed worker's heartbeats expired",
    )

    stack.release()  # the next run of the held job goes through
    live = stack.start_worker("w2")
    doc = stack.wait_finished(held, timeout_s=120)
    assert doc["status"] == "succeeded" and doc["worker"] == live.hostname, doc
    assert doc["attempts"] == 2
    assert stack.outputs(held) == JOB_OUTPUTS
    wait_until(stack.queue_is_drained, timeout_s=30, what="empty queue")
    wait_until(lambda: _backlog(stack)["for_workers"] == 0, timeout_s=15, what="an empty backlog")


def test_a_lost_finalize_is_sent_again_by_the_api_and_a_worker_closes_the_batch(make_stack):
    stack = make_stack(batch_chunk=2, **FAST_RECONCILER)
    worker = stack.start_worker("w1")
    files = {f"img_{i}.png": marked_png(color=(20 * i, 60, 7)) for i in range(4)}
    batch_id = stack.submit_archive("photos.zip", zip_of(files), examples="0")
    first = stack.wait_batch_finished(batch_id)
    assert first["status"] == "succeeded", first
    worker.stop()

    # The state a lost finalize leaves (the chunk that recorded the last outcome died, or its
    # publish failed, before it sent the finalize): finalizing, not closed, no message.
    key = batch_key(batch_id)
    stack.redis.hdel(key, "result", "finished_at")
    stack.redis.hset(key, "status", "running")
    stack.redis.persist(key)
    # A batch that never closed never left the reconciler's open index; this one had.
    stack.redis.sadd(OPEN_KEY, key)
    assert stack.redis.hget(key, "finalizing") == b"1"
    assert stack.queue_is_drained()

    wait_until(
        lambda: _backlog(stack)["waiting_batch"] == 1,
        timeout_s=30,
        what="the API's reconciler sending the finalize again",
    )
    assert _metric(stack, "featuremaps_reconciler_repairs_total", kind="finalize") == 1
    assert stack.batch(batch_id)["status"] == "running"

    stack.start_worker("w2")
    doc = stack.wait_batch_finished(batch_id)
    assert doc["status"] == "succeeded" and doc["counts"]["succeeded"] == 4, doc
    assert doc["result"]["manifest_url"], doc
    wait_until(stack.queue_is_drained, timeout_s=30, what="empty queues")
    time.sleep(3)  # sweeps after the close find nothing more to repair
    assert _metric(stack, "featuremaps_reconciler_repairs_total", kind="finalize") == 1
    assert stack.redis.hlen(SUSPECTS_KEY) == 0
