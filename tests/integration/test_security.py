"""Least privilege through a real deployment (docs/security.md): token holders cannot make the
service read buckets the operator did not list, tokens live only as hashes and records and
logs name them, and inputs are deleted once their job or batch has ended."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import time
import uuid

import pytest
import requests

from shared.jobs import job_key
from shared.storage import ObjectStore
from stack.commands import api_command
from stack.services import free_port, wait_until
from tests.helpers import (
    accepted,
    jpeg,
    submit_archive,
    submit_job,
    submit_source,
    wait_for_batch,
    wait_for_job,
    worker_caught_up,
    zip_of,
)
from tests.integration.deployment import Deployment

UID = uuid.uuid4().hex[:8]
PHOTOS = f"photos-{UID}"
TEAM = f"team-{UID}"
HR = f"private-hr-{UID}"
# Real-looking secrets, given to the service only as SHA-256 digests in a tokens file.
ALICE_TOKEN = f"alice-{uuid.uuid4().hex}"
BOB_TOKEN = f"bob-{uuid.uuid4().hex}"
ALICE = {"Authorization": f"Bearer {ALICE_TOKEN}"}
BOB = {"Authorization": f"Bearer {BOB_TOKEN}"}


def _jpeg(shade: int) -> bytes:
    return jpeg(color=(shade, 255 - shade, 90))


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("security")
    tokens = run_dir / "tokens"
    tokens.write_text(
        "".join(
            f"{name}:{hashlib.sha256(token.encode()).hexdigest()}\n"
            for name, token in (("alice", ALICE_TOKEN), ("bob", BOB_TOKEN))
        )
    )
    with Deployment.started(
        run_dir,
        redis_server,
        s3_server,
        name="sec",
        db=8,
        worker="s1",
        api_tokens_file=tokens,
        source_allow=f"s3://{PHOTOS}/ alice=s3://{TEAM}/alice/",
        batch_chunk=2,
    ) as dep:
        yield dep


@pytest.fixture(scope="module")
def store(deployment):
    return deployment.object_store()


@pytest.fixture(scope="module")
def buckets(store):
    """Buckets on the same S3 server as the service's: allowed, neighbouring and unrelated."""
    made = {}
    for name in (PHOTOS, f"{PHOTOS}-private", TEAM, HR):
        made[name] = bucket = ObjectStore(store.client, name)
        bucket.ensure_bucket()
    made[HR].put_bytes("employees/badge.jpg", _jpeg(10), "image/jpeg")
    made[f"{PHOTOS}-private"].put_bytes("secret.jpg", _jpeg(20), "image/jpeg")
    made[PHOTOS].put_bytes("set/a.jpg", _jpeg(30), "image/jpeg")
    made[PHOTOS].put_bytes("set/b.jpg", _jpeg(40), "image/jpeg")
    made[PHOTOS].put_bytes("set/notes.txt", b"not an image", "text/plain")
    made[TEAM].put_bytes("alice/x.jpg", _jpeg(50), "image/jpeg")
    return made


def _wait_gone(store: ObjectStore, keys, timeout_s: float = 30) -> None:
    """The worker deletes inputs right after the terminal transition the API already shows."""
    deadline = time.monotonic() + timeout_s
    while remaining := [key for key in keys() if key]:
        assert time.monotonic() < deadline, f"inputs of an ended job or batch remain: {remaining}"
        time.sleep(0.1)


def _snapshot(deployment, store) -> tuple[set, set]:
    return set(deployment.redis.scan_iter("featuremaps:batch:*")), set(store.list_keys(""))


@pytest.mark.parametrize(
    "url",
    [
        f"s3://{HR}/employees/",
        f"s3://{HR}/",
        f"s3://{PHOTOS}-private/",
        f"s3://{TEAM}/",
        f"s3://{TEAM}/alice-other/",
    ],
    ids=["other-bucket", "other-bucket-root", "neighbour-bucket", "above-prefix", "neighbour"],
)
def test_sources_outside_the_allow_list_are_403_and_leave_nothing(deployment, store, buckets, url):
    before = _snapshot(deployment, store)
    response = submit_source(deployment.api, url, headers=ALICE)
    assert response.status_code == 403, response.text
    assert response.json()["error"]["code"] == "forbidden_source"
    assert _snapshot(deployment, store) == before


def test_allowed_prefix_runs_and_non_images_fail_alone(deployment, store, buckets):
    response = submit_source(deployment.api, f"s3://{PHOTOS}/set/", headers=BOB)
    assert response.status_code == 202, response.text
    doc = wait_for_batch(deployment.api, response.json()["id"], headers=BOB)
    assert doc["status"] == "succeeded"
    assert doc["counts"]["succeeded"] == 2 and doc["counts"]["failed"] == 1


def test_per_token_entries_allow_one_token_and_not_the_other(deployment, store, buckets):
    refused = submit_source(deployment.api, f"s3://{TEAM}/alice/", headers=BOB)
    assert refused.status_code == 403, refused.text
    allowed = submit_source(deployment.api, f"s3://{TEAM}/alice/", headers=ALICE)
    assert allowed.status_code == 202, allowed.text
    doc = wait_for_batch(deployment.api, allowed.json()["id"], headers=ALICE)
    assert doc["status"] == "succeeded" and doc["counts"]["succeeded"] == 1


def test_service_bucket_stays_refused(deployment, buckets):
    response = submit_source(deployment.api, f"s3://{deployment.bucket}/inputs/", headers=ALICE)
    assert response.status_code == 400


def test_token_hashes_are_not_tokens(deployment):
    digest = hashlib.sha256(ALICE_TOKEN.encode()).hexdigest()
    for token in (digest, "alice", ALICE_TOKEN[:-1]):
        response = requests.get(
            f"{deployment.api}/jobs/x", headers={"Authorization": f"Bearer {token}"}, timeout=10
        )
        assert response.status_code == 401, token


def test_finished_job_input_is_deleted_and_figure_kept(deployment, store):
    response = requests.post(
        f"{deployment.api}/jobs",
        files={"image": ("a.jpg", _jpeg(60))},
        headers=ALICE,
        timeout=30,
    )
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    doc = wait_for_job(deployment.api, job_id, headers=ALICE)
    assert doc["status"] == "succeeded"
    _wait_gone(store, lambda: list(store.list_keys(f"inputs/{job_id}/")))
    (figure,) = [k for k in store.list_keys(f"results/{job_id}/") if "feature_maps" in k]
    assert figure == json.loads(deployment.redis.hget(job_key(job_id), "result"))["figure_key"]
    assert requests.get(doc["result"]["figure_url"], timeout=10).status_code == 200
    # Another token cannot see it; the record names the token, never holds it.
    other = requests.get(f"{deployment.api}/jobs/{job_id}", headers=BOB, timeout=10)
    assert other.status_code == 404
    assert deployment.redis.hget(f"featuremaps:job:{job_id}", "owner") == b"alice"


def test_canceled_job_input_is_deleted(deployment, store):
    # The worker stopped, so the job is surely still queued when it is canceled.
    worker = deployment.workers[0]
    os.killpg(worker.pid, signal.SIGSTOP)
    try:
        job_id = accepted(submit_job(deployment.api, _jpeg(70), filename="c.jpg", headers=BOB))
        assert list(store.list_keys(f"inputs/{job_id}/"))
        canceled = requests.delete(f"{deployment.api}/jobs/{job_id}", headers=BOB, timeout=10)
        assert canceled.status_code == 202 and canceled.json()["status"] == "canceled"
        # The API deletes it as it cancels: no worker will read it.
        assert not list(store.list_keys(f"inputs/{job_id}/"))
    finally:
        os.killpg(worker.pid, signal.SIGCONT)
    worker_caught_up(deployment.api, headers=BOB)
    assert wait_for_job(deployment.api, job_id, headers=BOB)["status"] == "canceled"
    assert not list(store.list_keys(f"results/{job_id}/"))


def _submit_zip(deployment, name: str, count: int, headers: dict) -> requests.Response:
    archive = zip_of({f"p{i}.jpg": _jpeg(100 + i) for i in range(count)})
    return submit_archive(deployment.api, name, archive, headers=headers, timeout_s=30)


def test_finalized_batch_archive_and_members_are_deleted(deployment, store):
    response = _submit_zip(deployment, "three.zip", 3, ALICE)
    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]
    doc = wait_for_batch(deployment.api, batch_id, headers=ALICE)
    assert doc["status"] == "succeeded" and doc["counts"]["succeeded"] == 3

    def inputs() -> list[str]:
        return [
            key
            for key in store.list_keys("")
            if key.startswith((f"batches/{batch_id}/inputs/", f"batches/{batch_id}/source."))
        ]

    _wait_gone(store, inputs)
    keys = [key for key in store.list_keys("") if batch_id in key]
    assert f"batches/{batch_id}/results.zip" in keys
    assert len([key for key in keys if key.endswith("/feature_maps.jpg")]) == 3
    assert requests.get(doc["result"]["archive_url"], timeout=10).status_code == 200


def test_plaintext_tokens_are_nowhere_in_redis_or_logs(deployment, buckets):
    job = requests.post(
        f"{deployment.api}/jobs", files={"image": ("a.jpg", _jpeg(9))}, headers=ALICE, timeout=30
    ).json()["id"]
    archive = _submit_zip(deployment, "two.zip", 2, BOB).json()["id"]
    prefix = submit_source(deployment.api, f"s3://{TEAM}/alice/", headers=ALICE).json()["id"]
    assert wait_for_job(deployment.api, job, headers=ALICE)["status"] == "succeeded"
    assert wait_for_batch(deployment.api, archive, headers=BOB)["status"] == "succeeded"
    assert wait_for_batch(deployment.api, prefix, headers=ALICE)["status"] == "succeeded"
    secrets = (ALICE_TOKEN.encode(), BOB_TOKEN.encode())
    for key in deployment.redis.scan_iter("*"):
        kind = deployment.redis.type(key).decode()
        if kind == "hash":
            values = [b"%s=%s" % kv for kv in deployment.redis.hgetall(key).items()]
        elif kind == "list":
            values = deployment.redis.lrange(key, 0, -1)
        elif kind == "string":
            values = [deployment.redis.get(key)]
        elif kind == "set":
            values = list(deployment.redis.smembers(key))
        elif kind == "zset":
            values = deployment.redis.zrange(key, 0, -1)
        else:
            values = []
        for value in [key, *values]:
            assert not any(secret in value for secret in secrets), key
    logs = {path.name: path.read_text() for path in deployment.run_dir.glob("*.log")}
    assert "api.log" in logs
    for name, text in logs.items():
        assert ALICE_TOKEN not in text and BOB_TOKEN not in text, name
    audit = [line for line in logs["api.log"].splitlines() if "featuremaps.audit" in line]
    assert any(f"accepted job id={job} token=alice size=" in line for line in audit), audit
    assert any(f"id={prefix} token=alice size=- source=s3://{TEAM}/alice/" in x for x in audit)
    assert any(f"id={archive} token=bob size=" in x and "archive:two.zip" in x for x in audit)


@pytest.mark.parametrize("tokens", ["", "ops:tok"], ids=["no-tokens", "tokens"])
def test_api_warns_loudly_without_tokens_beyond_loopback(tmp_path, tokens):
    log_path = tmp_path / "gunicorn.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("FEATUREMAPS_")}
    env["FEATUREMAPS_API_TOKENS"] = tokens
    # A stand-in WSGI app: the warning comes from the master, before any app is loaded.
    argv = api_command(
        f"0.0.0.0:{free_port()}",
        config="python:api.gunicorn_conf",
        app="wsgiref.simple_server:demo_app",
    )
    with log_path.open("wb") as log:
        process = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, env=env)
    try:
        wait_until(lambda: "Booting worker" in log_path.read_text(), timeout_s=30, what="boot")
    finally:
        process.terminate()
        process.wait(timeout=30)
    assert ("SECURITY WARNING" in log_path.read_text()) == (not tokens)
