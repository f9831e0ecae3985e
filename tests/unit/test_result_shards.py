"""Result shards as planned and named: positions covered once, an empty batch's one shard,
today's names for a single shard and numbered ones for more, and the rule that keeps a
figure's name unique within its shard."""

from __future__ import annotations

import pytest

from shared import keys
from worker.batches.finalize import _ArcNames, batch_result
from worker.batches.result_shards import ShardPlan


@pytest.mark.parametrize(
    ("total", "size", "spans"),
    [
        (10, 4, [(0, 4), (4, 4), (8, 2)]),
        (8, 4, [(0, 4), (4, 4)]),
        (3, 5000, [(0, 3)]),
        (0, 5000, [(0, 0)]),
    ],
)
def test_a_plan_covers_every_position_once(total, size, spans):
    plan = ShardPlan(total=total, size=size)
    assert plan.count == len(spans)
    assert [plan.span(n) for n in range(1, plan.count + 1)] == spans
    covered = [p for first, count in spans for p in range(first, first + count)]
    assert covered == list(range(total))


@pytest.mark.parametrize("shard", [0, 4])
def test_a_shard_outside_the_plan_is_refused(shard):
    with pytest.raises(ValueError, match=f"shard {shard} is not one of 1..3"):
        ShardPlan(total=10, size=4).span(shard)


def test_one_shard_keeps_todays_keys_more_are_numbered():
    assert keys.batch_result_keys("b", 1, 1) == (
        "batches/b/manifest.jsonl",
        "batches/b/results.zip",
    )
    assert keys.batch_result_keys("b", 2, 3) == (
        "batches/b/manifest-00002.jsonl",
        "batches/b/results-00002.zip",
    )
    assert all(p.startswith(("batches/b/", "inputs/b-")) for p in keys.batch_inputs_prefixes("b"))


def test_a_single_shard_result_keeps_its_keys_at_the_top():
    shard = {"index": 1, "first": 0, "items": 2, "manifest_key": "m", "archive_key": "a"}
    assert batch_result([shard]) == {"manifest_key": "m", "archive_key": "a", "shards": [shard]}
    two = [shard, {**shard, "index": 2}]
    assert batch_result(two)["manifest_key"] is None and batch_result(two)["shards"] == two


def test_names_are_unique_within_a_shard_and_never_escape():
    names = _ArcNames("jpg")
    assert names.for_item("b-000000", "x/dup.jpg") == "figures/x/dup.jpg.jpg"
    assert names.for_item("b-000001", "x/dup.jpg") == "figures/x/dup.jpg.b-000001.jpg"
    assert names.for_item("b-000002", "../up.jpg") == "figures/b-000002.jpg"
    # A new shard starts its own set: the first use of a name there keeps it.
    assert _ArcNames("jpg").for_item("b-000005", "x/dup.jpg") == "figures/x/dup.jpg.jpg"
