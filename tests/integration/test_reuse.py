"""Content-addressed result reuse through the real service (gunicorn API, a real Celery worker
process, redis-server, SeaweedFS): the same bytes with the same options and weights are run
through the model once, whether they come as a second job, as a duplicate inside one archive or
as a job after a batch; other options or other weights are computed again; and retention after
reuse never leaves a record pointing at a deleted object. The worker's own /metrics counts
model passes (``featuremaps_worker_model_images_total``). Redis db 15."""

from __future__ import annotations

import io
import json
import random
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import UTC, datetime, timedelta

import pytest
import requests

from shared.batches import BatchStore
from shared.jobs import JobStore, job_key
from stack.services import free_port
from tests.helpers import wait_for_batch, wait_for_job
from tests.integration.deployment import Deployment
from tests.integration.test_batches import photo
from tests.integration.test_metrics import scrape
from worker.retention import sweep

TTL_S = 24 * 3600
# Two tokens: results are reused within one owner's records only.
TOKENS = {"alice": "alice-token", "bob": "bob-token"}
MODEL_IMAGES = ("featuremaps_worker_model_images_total", ())
REUSED_JOBS = ("featuremaps_worker_images_reused_total", (("kind", "job"),))


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("reuse"),
        redis_server,
        s3_server,
        name="reuse",
        db=15,
        worker_metrics_port=free_port(),
        api_tokens=",".join(f"{name}:{token}" for name, token in TOKENS.items()),
    ) as dep:
        yield dep


def model_images(dep: Deployment, port: int | None = None) -> float:
    """Images the worker on ``port`` (default: the deployment's) ran through the model."""
    port = port or dep.settings["worker_metrics_port"]
    return scrape(f"http://127.0.0.1:{port}/metrics")[MODEL_IMAGES]


def auth(owner: str = "alice") -> dict:
    return {"Authorization": f"Bearer {TOKENS[owner]}"}


def run_job(dep: Deployment, data: bytes, owner: str = "alice", **options) -> dict:
    response = requests.post(
        f"{dep.api}/jobs",
        files={"image": ("p.jpg", data)},
        data=options,
        headers=auth(owner),
        timeout=30,
    )
    assert response.status_code == 202, response.text
    doc = wait_for_job(dep.api, response.json()["id"], headers=auth(owner))
    assert doc["status"] == "succeeded", doc
    return doc


def all_items(api: str, batch_id: str) -> list[dict]:
    items, cursor = [], "0"
    while cursor is not None:
        page = requests.get(
            f"{api}/batches/{batch_id}/items",
            params={"cursor": cursor, "limit": 100},
            headers=auth(),
            timeout=30,
        ).json()
        items += page["items"]
        cursor = page["next_cursor"]
    return items


def fetch(url: str) -> bytes:
    response = requests.get(url, timeout=30)
    assert response.status_code == 200, url
    return response.content


def test_the_same_photo_twice_is_reused_without_a_model_pass(deployment):
    data = photo(1000, size=(320, 240))
    first = run_job(deployment, data, arrays="true", per_layer="true")
    assert first["result"]["reused"] is False
    before = scrape(f"http://127.0.0.1:{deployment.settings['worker_metrics_port']}/metrics")

    second = run_job(deployment, data, arrays="true", per_layer="true")

    after = scrape(f"http://127.0.0.1:{deployment.settings['worker_metrics_port']}/metrics")
    assert after[MODEL_IMAGES] == before[MODEL_IMAGES]
    assert after[REUSED_JOBS] == before[REUSED_JOBS] + 1
    result = second["result"]
    assert result["reused"] is True
    assert result["reused_from"] == first["id"]
    assert "model_ms" not in second["timings"]
    # Byte-identical outputs, in objects of the second job's own.
    for name in ("figure_url", "thumbnail_url", "input_url", "arrays_url"):
        assert f"/results/{second['id']}/" in result[name]
        assert fetch(result[name]) == fetch(first["result"][name])
    assert len(result["layer_urls"]) == len(first["result"]["layer_urls"]) == 17
    assert fetch(result["layer_urls"][5]) == fetch(first["result"]["layer_urls"][5])
    manifest = json.loads(fetch(result["manifest_url"]))
    assert manifest["job_id"] == second["id"]
    assert manifest["reused_from"] == first["id"]
    assert result["layers"] == first["result"]["layers"]
    layer = requests.get(
        f"{deployment.api}/jobs/{second['id']}/layers/conv1", headers=auth(), timeout=30
    )
    assert layer.status_code == 200


def test_other_options_are_computed_again(deployment):
    data = photo(1001, size=(320, 240))
    first = run_job(deployment, data)
    before = model_images(deployment)
    for options in ({"colormap": "gray"}, {"reduction": "max"}, {"format": "png"}):
        doc = run_job(deployment, data, **options)
        assert doc["result"]["reused"] is False, options
    assert model_images(deployment) == before + 3
    # ... while the first options still find their result.
    assert run_job(deployment, data)["result"]["reused_from"] == first["id"]
    assert model_images(deployment) == before + 3


def test_another_owners_result_is_never_reused(deployment):
    data = photo(1003, size=(320, 240))
    run_job(deployment, data, owner="alice")
    before = model_images(deployment)
    # Bob sent the same photo: that Alice did must not show (nor her job's id).
    doc = run_job(deployment, data, owner="bob")
    assert doc["result"]["reused"] is False
    assert model_images(deployment) == before + 1
    assert run_job(deployment, data, owner="bob")["result"]["reused_from"] == doc["id"]


@contextmanager
def other_worker(dep: Deployment, name: str, **settings) -> Iterator[int]:
    """The deployment's worker replaced by one with ``settings`` for the block; yields the
    other's metrics port. The replacement back gets a new name: the stopped worker's
    heartbeat lingers for its TTL."""
    for process in dep.workers:
        process.stop()
    port = free_port()
    other = dep.start_worker(name, worker_metrics_port=port, **settings)
    try:
        yield port
    finally:
        other.stop()
        dep.workers = [dep.start_worker(f"{name}-back")]


def test_other_weights_are_computed_again(deployment):
    data = photo(1002, size=(320, 240))
    assert run_job(deployment, data)["result"]["reused"] is False
    with other_worker(deployment, "seed1", weights_seed=1) as port:
        doc = run_job(deployment, data)
        assert doc["result"]["reused"] is False
        assert model_images(deployment, port) == 1
        assert doc["result"]["weights"] == {"name": "random", "seed": 1}


def test_the_setting_turns_reuse_off(deployment):
    data = photo(1004, size=(320, 240))
    with other_worker(deployment, "off", reuse_results=False) as port:
        docs = [run_job(deployment, data) for _ in range(2)]
        assert [doc["result"]["reused"] for doc in docs] == [False, False]
        assert model_images(deployment, port) == 2
    # Nor did it index its results: a worker with reuse on finds nothing of them.
    assert run_job(deployment, data)["result"]["reused"] is False


def test_an_archive_of_duplicates_runs_each_distinct_photo_once(deployment):
    distinct = [photo(2000 + n) for n in range(100)]
    members = distinct + distinct
    # Shuffled: some twins share a chunk, most find the other's result in the index.
    random.Random(7).shuffle(members)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for n, data in enumerate(members):
            archive.writestr(f"photos/{n:03d}.jpg", data)
    before = model_images(deployment)

    response = requests.post(
        f"{deployment.api}/batches",
        files={"archive": ("dups.zip", buffer.getvalue())},
        headers=auth(),
        timeout=60,
    )
    assert response.status_code == 202, response.text
    doc = wait_for_batch(deployment.api, response.json()["id"], timeout_s=600, headers=auth())

    assert doc["counts"]["succeeded"] == 200, doc
    assert model_images(deployment) == before + 100
    items = all_items(deployment.api, doc["id"])
    reused = [item for item in items if item["reused"]]
    assert len(reused) == 100
    by_id = {item["id"]: item for item in items}
    # Both ways were taken: twins in one chunk (BATCH_CHUNK 16 members in order) share one
    # model pass; a twin in a later chunk copies the result from the index.
    chunk = {item["id"]: items.index(item) // 16 for item in items}
    same_chunk = [item for item in reused if chunk[item["id"]] == chunk[item["reused_from"]]]
    assert 0 < len(same_chunk) < len(reused)
    for item in reused[:10]:
        twin = by_id[item["reused_from"]]
        assert twin["name"] != item["name"] and not twin["reused"]
        assert fetch(item["figure_url"]) == fetch(twin["figure_url"])
    # A job of one of those photos copies a batch item's result, and gets its input preview.
    before = model_images(deployment)
    job = run_job(deployment, distinct[0])
    assert job["result"]["reused_from"].startswith(doc["id"] + "-")
    assert fetch(job["result"]["input_url"])[:2] == b"\xff\xd8"
    assert model_images(deployment) == before


def dangling_keys(dep: Deployment) -> list[str]:
    """Objects that a job or batch item record names but storage does not hold."""
    store = dep.object_store()
    jobs = JobStore(dep.redis, ttl_s=TTL_S)
    batches = BatchStore(dep.redis, ttl_s=TTL_S)
    named: list[str] = []
    for key in dep.redis.scan_iter("featuremaps:job:*"):
        job = jobs.get(key.decode().rsplit(":", 1)[1])
        result = job.result or {}
        named += [v for k, v in result.items() if k.endswith("_key")]
        named += result.get("layer_keys", [])
    for key in dep.redis.scan_iter("featuremaps:batch:*"):
        if key.count(b":") == 2:
            for item in batches.iter_items(key.decode().rsplit(":", 1)[1]):
                outputs = {k: v for k, v in item.info.items() if k != "input_key"}
                named += [v for k, v in outputs.items() if k.endswith("_key")]
    return [key for key in named if not store.exists(key)]


def test_retention_after_reuse_leaves_no_record_pointing_at_a_deleted_object(deployment):
    data = photo(3000, size=(320, 240))
    source = run_job(deployment, data, per_layer="true")
    reuser = run_job(deployment, data, per_layer="true")
    assert reuser["result"]["reused_from"] == source["id"]
    store = deployment.object_store()
    later = datetime.now(UTC) + timedelta(seconds=TTL_S + 60)

    # The source's record expires and the sweep deletes its objects ...
    deployment.redis.delete(job_key(source["id"]))
    assert sweep(store, deployment.redis, ttl_s=TTL_S, now=later) > 0
    assert not list(store.list_keys(f"results/{source['id']}/"))
    # ... the reusing record's objects are its own and all still there.
    assert dangling_keys(deployment) == []
    assert fetch(reuser["result"]["figure_url"])[:2] == b"\xff\xd8"
    # The reusing record became the source in turn.
    third = run_job(deployment, data, per_layer="true")
    assert third["result"]["reused_from"] == reuser["id"]

    # Both gone too while the index still names the third: the next copy finds nothing,
    # so the photo is computed again, completely.
    for job in (reuser, third):
        deployment.redis.delete(job_key(job["id"]))
    sweep(store, deployment.redis, ttl_s=TTL_S, now=later)
    before = model_images(deployment)
    fourth = run_job(deployment, data, per_layer="true")
    assert fourth["result"]["reused"] is False
    assert model_images(deployment) == before + 1
    assert len(list(store.list_keys(f"results/{fourth['id']}/"))) == 4 + 17
    assert dangling_keys(deployment) == []
