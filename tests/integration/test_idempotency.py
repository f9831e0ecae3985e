"""Idempotency-Key on POST /jobs and POST /batches against the real deployment (gunicorn API,
Redis, S3, a Celery worker): a retry after a dropped answer gets the first answer, a changed
request under a used key is 422, concurrent requests with one key make one record, keys are
scoped per token, and a bad key or a refused request never pins a key."""

from __future__ import annotations

import hashlib
import json
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

import pytest
import requests

from api.idempotency import WAIT_S, fingerprint
from client import Client
from shared.options import JobOptions
from tests.helpers import png, wait_for_job, zip_of
from tests.integration.deployment import Deployment
from tests.integration.dropping_proxy import DroppingProxy


def zip_of_images(*images: bytes) -> bytes:
    return zip_of({f"img{n}.png": data for n, data in enumerate(images)})


ALICE = f"alice-{uuid.uuid4().hex}"
BOB = f"bob-{uuid.uuid4().hex}"


def _headers(token: str, key: str | None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("idempotency"),
        redis_server,
        s3_server,
        name="idem",
        db=14,
        api_tokens=f"alice:{ALICE},bob:{BOB}",
    ) as dep:
        yield dep


def post_job(api: str, key: str | None, image: bytes, token: str = ALICE, **form):
    return requests.post(
        f"{api}/jobs",
        files={"image": ("x.png", image)},
        data=form,
        headers=_headers(token, key),
        timeout=30,
    )


def job_count(dep: Deployment) -> int:
    return sum(1 for _ in dep.redis.scan_iter("featuremaps:job:*"))


def test_a_retry_after_a_dropped_answer_gets_the_same_job(deployment):
    proxy = DroppingProxy(urlsplit(deployment.api).port, drops=1)
    key, image, before = str(uuid.uuid4()), png(), job_count(deployment)
    try:
        with pytest.raises(requests.ConnectionError):
            post_job(proxy.url, key, image)
        # The same request again: a new multipart boundary, the same meaning.
        retry = post_job(proxy.url, key, image)
    finally:
        proxy.close()
    head, _, lost_body = proxy.dropped[0].partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 202")
    assert retry.status_code == 202 and retry.headers["Idempotent-Replayed"] == "true"
    assert retry.json() == json.loads(lost_body)
    assert retry.headers["Location"].endswith(f"/jobs/{retry.json()['id']}")
    assert job_count(deployment) == before + 1
    doc = wait_for_job(deployment.api, retry.json()["id"], headers=_headers(ALICE, None))
    assert doc["status"] == "succeeded"


def test_the_client_retries_a_dropped_submission_with_its_key(deployment):
    proxy = DroppingProxy(urlsplit(deployment.api).port, drops=1)
    before = job_count(deployment)
    client = Client(proxy.url, token=ALICE, sleep=lambda _s: None)
    try:
        job = client.submit(png(color=(1, 2, 3)))
    finally:
        client.http.close()
        proxy.close()
    lost = json.loads(proxy.dropped[0].partition(b"\r\n\r\n")[2])
    assert job.id == lost["id"]
    assert job_count(deployment) == before + 1


def test_the_same_key_with_another_request_is_422(deployment):
    key, image = str(uuid.uuid4()), png()
    first = post_job(deployment.api, key, image)
    assert first.status_code == 202
    for changed in (
        post_job(deployment.api, key, image, reduction="max"),
        post_job(deployment.api, key, png(color=(0, 0, 0))),
    ):
        assert changed.status_code == 422
        error = changed.json()["error"]
        assert error["code"] == "idempotency_mismatch" and "new key" in error["message"]
    # Another token's key space: the same key is a new job there.
    other = post_job(deployment.api, key, image, token=BOB)
    assert other.status_code == 202 and other.json()["id"] != first.json()["id"]
    assert "Idempotent-Replayed" not in other.headers


def test_twenty_concurrent_posts_with_one_key_make_one_job(deployment):
    key, image, before = str(uuid.uuid4()), png(color=(10, 200, 10)), job_count(deployment)
    with ThreadPoolExecutor(max_workers=20) as pool:
        answers = list(pool.map(lambda _: post_job(deployment.api, key, image), range(20)))
    assert [a.status_code for a in answers] == [202] * 20
    assert len({a.json()["id"] for a in answers}) == 1
    assert sum(a.headers.get("Idempotent-Replayed") == "true" for a in answers) == 19
    assert job_count(deployment) == before + 1


def test_a_batch_retry_gets_the_same_batch_and_its_archive_is_not_kept_twice(deployment):
    key, archive = str(uuid.uuid4()), zip_of_images(png(), png(color=(9, 9, 9)))

    def post():
        return requests.post(
            f"{deployment.api}/batches",
            files={"archive": ("photos.zip", archive)},
            headers=_headers(ALICE, key),
            timeout=30,
        )

    first, again = post(), post()
    assert first.status_code == again.status_code == 202
    assert again.json()["id"] == first.json()["id"]
    # The retry's own copy of the archive was deleted: everything under batches/ is the
    # first batch's.
    stored = list(deployment.object_store().list_keys("batches/"))
    assert all(k.startswith(f"batches/{first.json()['id']}/") for k in stored), stored
    changed = requests.post(
        f"{deployment.api}/batches",
        files={"archive": ("photos.zip", zip_of_images(png()))},
        headers=_headers(ALICE, key),
        timeout=30,
    )
    assert changed.status_code == 422
    assert changed.json()["error"]["code"] == "idempotency_mismatch"


@pytest.mark.parametrize("bad", ["", "x" * 256, "caf\u00e9", "tab\there"])
def test_a_key_that_cannot_be_a_key_is_400(deployment, bad):
    headers = _headers(ALICE, None)
    answer = requests.post(
        f"{deployment.api}/jobs",
        files={"image": ("x.png", png())},
        headers={**headers, "Idempotency-Key": bad.encode()},
        timeout=30,
    )
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "invalid_idempotency_key" and "255" in error["message"]


def test_a_refused_request_does_not_use_up_its_key(deployment):
    key = str(uuid.uuid4())
    refused = post_job(deployment.api, key, png(), reduction="median")
    assert refused.status_code == 400
    assert post_job(deployment.api, key, png()).status_code == 202


def test_a_request_whose_twin_is_still_being_created_gets_409_with_retry_after(deployment):
    key, image = str(uuid.uuid4()), png(color=(5, 6, 7))
    meaning = fingerprint(
        "POST /jobs",
        image=hashlib.sha256(image).hexdigest(),
        options=JobOptions().to_dict(),
        callback_url=None,
    )
    pending = json.dumps({"claim": "held-by-a-test", "meaning": meaning})
    deployment.redis.set(f"featuremaps:idempotency:alice:{key}", pending, ex=120)
    answer = post_job(deployment.api, key, image)
    assert answer.status_code == 409 and answer.headers["Retry-After"] == "1"
    assert answer.json()["error"]["code"] == "idempotency_in_progress"
    assert answer.elapsed.total_seconds() >= WAIT_S  # it waited for the twin before giving up


def test_a_creation_that_outlasts_the_pending_claims_ttl_keeps_its_key(deployment, monkeypatch):
    """A 20 MB upload to a slow S3 can take longer than the pending claim lives: the claim is
    renewed while the creation runs, so a retry waits for the first answer and creates
    nothing (before, the claim expired and the retry made a second record)."""
    from api import idempotency

    monkeypatch.setattr(idempotency, "PENDING_TTL_S", 1)
    keys = idempotency.Idempotency(deployment.redis, ttl_s=60)
    key, created = str(uuid.uuid4()), []

    def create(label: str, seconds: float):
        def make() -> idempotency.Answer:
            created.append(label)
            time.sleep(seconds)
            return idempotency.Answer({"id": label}, 202, f"/jobs/{label}")

        return make

    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(keys.once, "alice", key, "meaning", create("first", 3.5))
        time.sleep(2.0)  # twice the claim's TTL: without renewal the key is free again
        retry = pool.submit(keys.once, "alice", key, "meaning", create("retry", 0))
        assert first.result(timeout=30)[0] == {"id": "first"}
        body, status, headers = retry.result(timeout=30)
    assert created == ["first"]
    assert body == {"id": "first"} and status == 202 and headers["Idempotent-Replayed"] == "true"
