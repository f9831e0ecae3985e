"""Retention: job and batch records expire after JOB_TTL_HOURS, and the worker's periodic
sweep deletes their objects (and those of submissions that never got a record)."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import requests

from shared.batches import batch_key
from shared.jobs import Job, JobStatus, JobStore, new_job_id
from stack.services import wait_until
from tests.chaos.faults import marked_png
from tests.helpers import zip_of
from worker.retention import owner_record_key, sweep

TTL_S = 3600


def test_owner_of_each_object_key():
    assert owner_record_key("inputs/abc123/0.png") == "featuremaps:job:abc123"
    assert owner_record_key("results/abc123/layers/00_conv1.png") == "featuremaps:job:abc123"
    # In an attempt's folder, named by a record or not: owned by the id all the same.
    assert owner_record_key("results/abc123/g17/layers/00_conv1.png") == "featuremaps:job:abc123"
    assert owner_record_key("results/b0b1-000042/g9/manifest.json") == "featuremaps:batch:b0b1"
    assert owner_record_key("inputs/b0b1-000042/0.jpg") == "featuremaps:batch:b0b1"
    assert owner_record_key("batches/b0b1/results.zip") == "featuremaps:batch:b0b1"
    assert owner_record_key("batches/b0b1/results-00002.zip") == "featuremaps:batch:b0b1"
    assert owner_record_key("batches/b0b1/inputs/000003.pack") == "featuremaps:batch:b0b1"
    model = "ab" * 12
    assert owner_record_key(f"models/{model}/{'0' * 64}.pt") == f"featuremaps:model:{model}"
    assert owner_record_key("accepted/jobs/abc123.json") == "featuremaps:job:abc123"
    assert owner_record_key("accepted/batches/b0b1.json") == "featuremaps:batch:b0b1"
    assert owner_record_key("accepted/models/b0b1.json") is None
    assert owner_record_key("elsewhere/b0b1/x") is None
    assert owner_record_key("inputs/") is None


def test_sweep_deletes_only_old_objects_whose_record_is_gone(object_store, redis_client):
    jobs = JobStore(redis_client, ttl_s=TTL_S)
    live, gone, live_batch, gone_batch = (new_job_id() for _ in range(4))
    jobs.create(Job(id=live, status=JobStatus.SUCCEEDED, options={}, input_key=""))
    redis_client.hset(batch_key(live_batch), "status", "running")
    kept = {
        f"inputs/{live}/0.png",
        f"results/{live}/manifest.json",
        f"results/{live}/g3/manifest.json",
        f"batches/{live_batch}/source.zip",
        f"inputs/{live_batch}-000000/0.png",
        "uploads-of-someone-else/x.png",
    }
    expired = {
        f"inputs/{gone}/0.png",
        f"results/{gone}/feature_maps.jpg",
        f"results/{gone}/layers/00_conv1.png",
        f"results/{gone}/g4/feature_maps.jpg",
        f"results/{gone}/g5/manifest.json",  # an attempt no record named
        f"batches/{gone_batch}/manifest.jsonl",
        f"inputs/{gone_batch}-000001/0.png",
        f"results/{gone_batch}-000001/manifest.json",
        f"results/{gone_batch}-000001/g6/thumbnail.jpg",
    }
    for key in kept | expired:
        object_store.put_bytes(key, b"x")

    # Young objects stay even without a record (their record may be being written now).
    assert sweep(object_store, redis_client, ttl_s=TTL_S) == 0
    assert set(object_store.list_keys("")) == kept | expired

    later = datetime.now(UTC) + timedelta(seconds=TTL_S + 60)
    assert sweep(object_store, redis_client, ttl_s=TTL_S, now=later) == len(expired)
    assert set(object_store.list_keys("")) == kept
    assert sweep(object_store, redis_client, ttl_s=TTL_S, now=later) == 0


def test_records_and_objects_expire_after_the_ttl(make_stack):
    stack = make_stack(job_ttl_hours=0.002)  # 7 s; the worker sweeps every ~2 s
    stack.start_worker("w1")
    store = stack.store()
    job_id = stack.submit(marked_png())
    # Without dataset examples: their second pass and sheets take longer than this test's
    # 7-second TTL on a loaded machine, and the batch's helper keys (result shards, examples
    # state) count their TTL from their own last change.
    batch_id = stack.submit_archive(
        "two.zip",
        zip_of({"a.png": marked_png(color=(1, 1, 1)), "b.png": marked_png()}),
        examples="0",
    )
    # An input whose submission was undone (no record was ever written).
    orphan = new_job_id()
    store.put_bytes(f"inputs/{orphan}/0.png", marked_png())

    assert stack.wait_finished(job_id)["status"] == "succeeded"
    assert stack.wait_batch_finished(batch_id)["status"] == "succeeded"
    prefixes = ("inputs/", "results/", "batches/")
    owners = {key.split("/")[1].split("-")[0] for p in prefixes for key in store.list_keys(p)}
    assert {job_id, batch_id} <= owners

    def gone() -> bool:
        return not any(list(store.list_keys(p)) for p in prefixes)

    wait_until(gone, timeout_s=120, what="every object deleted", interval_s=0.5)
    for path in (f"/jobs/{job_id}", f"/batches/{batch_id}"):
        assert requests.get(f"{stack.api}{path}", timeout=30).status_code == 404
    assert not list(stack.redis.scan_iter(f"featuremaps:batch:{batch_id}*"))
    assert not list(stack.redis.scan_iter(f"featuremaps:job:{job_id}"))
