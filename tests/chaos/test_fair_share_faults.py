"""Faults around batch turns (shared/schedule.py, docs/design.md "Fair share"): a worker
killed between ending a turn and sending its successor, and Redis killed and restarted from
its append-only file mid-run. Every item of every batch ends exactly once, with one set of
outputs, and nothing stalls: a turn that was registered but never sent is found by the
scheduler's repair and sent again."""

from __future__ import annotations

import requests

from keeper.counters import REPAIR, counts
from shared.schedule import Scheduler
from stack.services import wait_until
from tests.chaos.conftest import ITEM_OUTPUTS
from tests.chaos.faults import marked_png
from tests.helpers import zip_of

# Without dataset examples an item has no channel scores.
OUTPUTS = [name for name in ITEM_OUTPUTS if name != "scores.npy"]


def _items(stack, batch_id: str) -> list[dict]:
    page = requests.get(
        f"{stack.api}/batches/{batch_id}/items", params={"limit": 1000}, timeout=30
    ).json()
    return page["items"]


def _all_once(stack, batch_id: str, count: int) -> None:
    doc = stack.wait_batch_finished(batch_id)
    assert doc["status"] == "succeeded", doc
    assert doc["counts"]["total"] == count and doc["counts"]["succeeded"] == count, doc
    items = _items(stack, batch_id)
    assert len(items) == count
    for item in items:
        assert item["status"] == "succeeded", item
        assert stack.outputs(item["id"]) == OUTPUTS, item


def _settled(stack) -> bool:
    """No chunk waits, no turn is registered or claimed, no message is left."""
    backlog = Scheduler(stack.redis, stack.service_settings()).backlog()
    return not any(backlog.values()) and stack.queue_is_drained()


def test_a_worker_killed_before_sending_the_next_turn_does_not_stall_the_batch(make_stack):
    """With a window of one turn, the killed worker's successor is the only turn: registered,
    never sent. The redelivered turn finds itself ended and sends nothing; the scheduler's
    repair finds the registered turn with no message and sends it again."""
    stack = make_stack(batch_chunk=2, batch_window=1)
    stack.start_worker("w1")
    files = {f"img_{i}.png": marked_png(color=(11, 20 * i, 60)) for i in range(8)}
    (stack.gate / "kill-after-turn-end").touch()
    batch_id = stack.submit_archive("photos.zip", zip_of(files), examples="0")

    _all_once(stack, batch_id, len(files))
    assert [e for e, _ in stack.events() if e.startswith("kill-after")] == ["kill-after-turn-end:1"]
    wait_until(lambda: _settled(stack), timeout_s=60, what="scheduler and queues empty")
    repairs = counts(stack.redis, REPAIR)
    assert repairs["turn_resent"] >= 1, repairs  # the keeper's reconciler sent it again


def test_redis_killed_and_restarted_mid_run_every_item_ends_once(make_stack):
    stack = make_stack(batch_chunk=2, batch_window=2)
    stack.start_worker("w1")
    batches = {}
    for n in range(2):
        files = {f"b{n}_{i}.png": marked_png(color=(n * 90, 7 * i, 33)) for i in range(12)}
        batches[stack.submit_archive(f"set{n}.zip", zip_of(files), examples="0")] = len(files)
    wait_until(
        lambda: sum(stack.batch(b)["counts"]["succeeded"] for b in batches) >= 4,
        timeout_s=120,
        what="some items done",
    )
    stack.redis_server.kill()  # SIGKILL: the append-only file may miss its last second
    stack.redis_server.start()

    for batch_id, count in batches.items():
        _all_once(stack, batch_id, count)
    wait_until(lambda: _settled(stack), timeout_s=90, what="scheduler and queues empty")
