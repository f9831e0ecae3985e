"""SIGKILL in the middle of a batch: chunks done, one running (its first figures already
uploaded), others queued. With the pool process respawned, or a restarted worker, every item
ends ``succeeded`` with one set of outputs and the batch completes once."""

from __future__ import annotations

import os
import signal

import pytest
import requests

from stack.services import wait_until
from tests.chaos.conftest import ITEM_OUTPUTS
from tests.chaos.faults import HOLD, HOLD_UPLOAD, KILL, marked_png
from tests.helpers import zip_of

ITEMS = 8
CHUNK = 2


def _items(stack, batch_id: str) -> list[dict]:
    items, cursor = [], "0"
    while cursor is not None:
        page = requests.get(
            f"{stack.api}/batches/{batch_id}/items",
            params={"cursor": cursor, "limit": 100},
            timeout=30,
        ).json()
        items += page["items"]
        cursor = page["next_cursor"]
    return items


@pytest.mark.parametrize("killed", ["pool_process", "whole_worker"])
def test_sigkill_mid_batch_every_item_succeeds_with_one_set_of_outputs(make_stack, killed):
    stack = make_stack(batch_chunk=CHUNK)
    first = stack.start_worker("w1")
    files = {f"img_{i}.png": marked_png(color=(30 * i, 5, 5)) for i in range(ITEMS)}
    files["img_5.png"] = marked_png(HOLD_UPLOAD, color=(1, 2, 3))
    batch_id = stack.submit_archive("photos.zip", zip_of(files))

    child = stack.wait_event("hold-upload")[0]
    if killed == "pool_process":
        os.kill(child, signal.SIGKILL)
    else:
        first.kill()
    stack.release()
    if killed == "whole_worker":
        stack.start_worker("w2")

    doc = stack.wait_batch_finished(batch_id)
    assert doc["status"] == "succeeded", doc
    assert doc["counts"]["total"] == ITEMS
    assert doc["counts"]["succeeded"] == ITEMS and doc["counts"]["failed"] == 0, doc
    items = _items(stack, batch_id)
    assert sorted(item["name"] for item in items) == sorted(files)
    for item in items:
        assert item["status"] == "succeeded", item
        outputs = stack.outputs(item["id"])
        assert outputs == ITEM_OUTPUTS, (item, outputs)
    # The held chunk ran again in another process.
    assert any(pid != child for event, pid in stack.events() if event == "hold-upload")
    wait_until(stack.queue_is_drained, timeout_s=60, what="empty queues")


def test_redis_down_when_a_chunk_ends_the_batch_still_completes(make_stack):
    stack = make_stack(batch_chunk=CHUNK)
    stack.start_worker("w1")
    files = {f"img_{i}.png": marked_png(color=(5, 30 * i, 5)) for i in range(4)}
    files["img_3.png"] = marked_png(HOLD, color=(3, 2, 1))
    batch_id = stack.submit_archive("photos.zip", zip_of(files))
    stack.wait_event("hold")

    stack.redis_server.stop()
    try:
        stack.release()
        stack.wait_event("task-raised")  # the chunk could not record its items
    finally:
        stack.redis_server.start()

    doc = stack.wait_batch_finished(batch_id)
    assert doc["status"] == "succeeded", doc
    assert doc["counts"]["succeeded"] == len(files), doc
    for item in _items(stack, batch_id):
        outputs = stack.outputs(item["id"])
        assert outputs == ITEM_OUTPUTS, (item, outputs)
    wait_until(stack.queue_is_drained, timeout_s=60, what="empty queues")


def test_a_member_that_kills_its_worker_every_time_fails_worker_lost_and_the_rest_succeed(
    make_stack,
):
    """Before, a chunk holding such a member was delivered again without end (jobs had an
    attempt cap, chunks none) and its batch never finished."""
    stack = make_stack(batch_chunk=4, max_attempts=3)
    stack.start_worker("w1")
    files = {f"img_{i}.png": marked_png(color=(20 * i, 90, 5)) for i in range(6)}
    files["img_1.png"] = marked_png(KILL, color=(7, 7, 7))
    batch_id = stack.submit_archive("photos.zip", zip_of(files), examples="0")

    doc = stack.wait_batch_finished(batch_id)
    assert doc["counts"]["total"] == 6
    assert doc["counts"]["succeeded"] == 5 and doc["counts"]["failed"] == 1, doc
    for item in _items(stack, batch_id):
        if item["name"] == "img_1.png":
            assert item["status"] == "failed", item
            assert item["error"]["code"] == "worker_lost", item
            assert "lost 3 times" in item["error"]["message"], item
            assert stack.outputs(item["id"]) == []
        else:
            assert item["status"] == "succeeded", item
            assert "feature_maps.jpg" in stack.outputs(item["id"]), item
    # The killing member ran MAX_ATTEMPTS times (once in its chunk's batched pass, then on its
    # own), and nothing is left to deliver.
    assert [event for event, _ in stack.events()].count("kill") == 3
    wait_until(stack.queue_is_drained, timeout_s=60, what="empty queues")


def test_a_worker_killed_between_the_last_outcome_and_the_finalize_still_closes_the_batch(
    make_stack,
):
    """The step that records a batch's last outcome says 'finalize' once; the chunk then sends
    the finalize task. Killed in between, the chunk's redelivery finds its items final:
    before, it returned and the batch stayed open for ever (no manifest, no webhook); now it
    sends the finalize again."""
    stack = make_stack(batch_chunk=2)
    (stack.gate / "kill-before-finalize").touch()
    stack.start_worker("w1")
    files = {f"img_{i}.png": marked_png(color=(9, 40 * i, 90)) for i in range(4)}
    batch_id = stack.submit_archive("photos.zip", zip_of(files), examples="0")

    doc = stack.wait_batch_finished(batch_id)
    assert doc["status"] == "succeeded" and doc["counts"]["succeeded"] == 4, doc
    assert doc["result"]["manifest_url"], doc
    assert [event for event, _ in stack.events()].count("kill-before-finalize") == 1
    for item in _items(stack, batch_id):
        assert item["status"] == "succeeded", item
    wait_until(stack.queue_is_drained, timeout_s=60, what="empty queues")
