"""The service end to end: HTTP API under gunicorn → Celery on a real redis-server →
real worker processes with a resident ResNet-18 → figures in a real S3 server."""

from __future__ import annotations

import io
import uuid

import matplotlib
import pytest
import requests
from PIL import Image

from shared.heartbeat import live_workers
from shared.jobs import Job, JobStatus, JobStore, new_job_id
from shared.options import JobOptions
from shared.queue import JOBS_QUEUE, RENDER_JOB, make_producer
from shared.settings import Settings
from shared.storage import ObjectStore
from stack.services import RedisServer, SeaweedS3, wait_until
from tests.helpers import png, submit_job, wait_for_job
from tests.integration.deployment import Deployment

GRACE_HOPPER = f"{matplotlib.get_data_path()}/sample_data/grace_hopper.jpg"
MAX_UPLOAD_MB = 2
MAX_PIXELS = 4_000_000


def _jpeg_bytes() -> bytes:
    with open(GRACE_HOPPER, "rb") as fh:
        return fh.read()


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("service"),
        redis_server,
        s3_server,
        name="svc",
        db=3,
        max_upload_mb=MAX_UPLOAD_MB,
        max_image_pixels=MAX_PIXELS,
    ) as dep:
        yield dep


@pytest.fixture(scope="module")
def store(deployment):
    return deployment.object_store()


def _submit(api, data=None, filename="photo.jpg", headers=None, **options):
    data = _jpeg_bytes() if data is None else data
    return submit_job(api, data, filename=filename, headers=headers, **options)


def test_submit_poll_succeed_and_fetch_the_figure(deployment, store):
    from worker.compute.model import load_model
    from worker.compute.pipeline import process_image

    response = _submit(deployment.api)
    assert response.status_code == 202, response.text
    body = response.json()
    assert body["status"] == "queued" and response.headers["Location"] == f"/jobs/{body['id']}"

    doc = wait_for_job(deployment.api, body["id"])
    assert doc["status"] == "succeeded", doc
    assert doc["attempts"] == 1 and doc["worker"].startswith("w1@") and doc["device"] == "cpu"
    assert {"queue_ms", "decode_ms", "model_ms", "render_ms", "upload_ms"} <= set(doc["timings"])

    figure = requests.get(doc["result"]["figure_url"], timeout=10)
    assert figure.status_code == 200
    assert Image.open(io.BytesIO(figure.content)).format == "JPEG"

    # The manifest's layers match the pipeline run in-process on the same bytes.
    manifest = requests.get(doc["result"]["manifest_url"], timeout=10).json()
    expected = process_image(
        load_model("random", device="cpu"), _jpeg_bytes(), JobOptions(), max_pixels=MAX_PIXELS
    )
    assert [layer["name"] for layer in manifest["layers"]] == [
        layer["name"] for layer in expected.layers
    ]
    for got, want in zip(manifest["layers"], expected.layers, strict=True):
        assert got["shape"] == list(want["shape"])
        assert got["mean"] == pytest.approx(want["mean"], rel=1e-4, abs=1e-5)
    assert manifest["weights"]["name"] == "random"
    # The precision that ran, in the manifest and the job's result alike: auto is exact on a CPU.
    assert manifest["precision"] == doc["result"]["precision"]
    assert doc["result"]["precision"]["mode"] == "exact" and doc["options"]["precision"] == "auto"

    redirect = requests.get(
        f"{deployment.api}/jobs/{body['id']}/figure", allow_redirects=False, timeout=10
    )
    assert redirect.status_code == 302
    assert requests.get(redirect.headers["Location"], timeout=10).content == figure.content


def test_options_reach_the_worker(deployment):
    response = _submit(
        deployment.api,
        png(),
        "x.png",
        format="png",
        reduction="max",
        arrays="true",
        per_layer="true",
    )
    doc = wait_for_job(deployment.api, response.json()["id"])
    assert doc["status"] == "succeeded", doc
    assert doc["options"]["reduction"] == "max"
    assert Image.open(io.BytesIO(requests.get(doc["result"]["figure_url"]).content)).format == "PNG"
    assert len(doc["result"]["layer_urls"]) == 17
    assert requests.get(doc["result"]["arrays_url"]).content[:2] == b"PK"


def test_api_creates_its_bucket_at_start(deployment, s3_server):
    bucket = f"fresh-{uuid.uuid4().hex[:8]}"
    client = s3_server.client()
    assert not client.bucket_exists(bucket)
    deployment.start_api("api-fresh-bucket", s3_bucket=bucket)
    assert client.bucket_exists(bucket)


def test_unknown_job_is_404(deployment):
    for path in ("/jobs/nope", "/jobs/nope/figure"):
        response = requests.get(f"{deployment.api}{path}", timeout=10)
        assert response.status_code == 404
        assert response.json()["error"]["code"] == "not_found"
    assert requests.delete(f"{deployment.api}/jobs/nope", timeout=10).status_code == 404


BAD_UPLOADS = [
    # (description, files, form, status, code)
    ("missing field", {"picture": ("a.jpg", b"x")}, {}, 400, "missing_field"),
    ("empty file", {"image": ("a.jpg", b"")}, {}, 400, "empty_image"),
    ("bad option", {"image": ("a.png", png())}, {"mode": "sideways"}, 400, "invalid_option"),
    ("unknown option", {"image": ("a.png", png())}, {"dpi": "9"}, 400, "invalid_option"),
    ("text named .jpg", {"image": ("a.jpg", b"hello, I am text")}, {}, 415, "unsupported_type"),
    (
        "script named .jpg",
        {"image": ("a.jpg", b"#!/bin/sh\nrm -rf /\n")},
        {},
        415,
        "unsupported_type",
    ),
    (
        "pdf",
        {"image": ("a.jpg", b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj")},
        {},
        415,
        "unsupported_type",
    ),
    ("truncated jpeg", {"image": ("a.jpg", _jpeg_bytes()[:3000])}, {}, 422, "truncated_image"),
    ("pixel bomb", {"image": ("a.png", png((2100, 2000)))}, {}, 422, "too_many_pixels"),
    (
        "too large",
        {"image": ("a.jpg", b"\xff\xd8\xff" + b"0" * (MAX_UPLOAD_MB * 2**20 + 1))},
        {},
        413,
        "too_large",
    ),
]


@pytest.mark.parametrize(
    "what, files, form, status, code", BAD_UPLOADS, ids=[b[0] for b in BAD_UPLOADS]
)
def test_bad_uploads_are_refused_and_nothing_is_stored(
    deployment, store, what, files, form, status, code
):
    keys_before = set(store.list_keys(""))
    jobs_before = set(deployment.redis.scan_iter("featuremaps:job:*"))
    response = requests.post(f"{deployment.api}/jobs", files=files, data=form, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert error["code"] == code and error["message"]
    assert set(store.list_keys("")) == keys_before
    assert set(deployment.redis.scan_iter("featuremaps:job:*")) == jobs_before


def test_oversized_body_without_content_length_is_413(deployment):
    def chunks():
        boundary = b"--xyz\r\n"
        yield boundary + b'Content-Disposition: form-data; name="image"; filename="a.jpg"\r\n\r\n'
        for _ in range(MAX_UPLOAD_MB * 4):
            yield b"\xff" * (512 * 1024)
        yield b"\r\n--xyz--\r\n"

    response = requests.post(
        f"{deployment.api}/jobs",
        data=chunks(),  # a generator: sent chunked, with no Content-Length
        headers={"Content-Type": "multipart/form-data; boundary=xyz"},
        timeout=30,
    )
    assert response.status_code == 413
    assert response.json()["error"]["code"] == "too_large"


def test_undecodable_input_that_slipped_past_validation_fails_once(deployment, store):
    settings = Settings(redis_url=deployment.redis_url, job_ttl_hours=1)
    jobs = JobStore(deployment.redis, ttl_s=3600)
    job_id = new_job_id()
    store.put_bytes(f"inputs/{job_id}/0.jpg", b"\xff\xd8\xff\xe0garbage-after-magic", "image/jpeg")
    jobs.create(
        Job(
            id=job_id,
            status=JobStatus.QUEUED,
            options=JobOptions().to_dict(),
            input_key=f"inputs/{job_id}/0.jpg",
        )
    )
    make_producer(settings).send_task(RENDER_JOB, args=[job_id], queue=JOBS_QUEUE)
    doc = wait_for_job(deployment.api, job_id)
    assert doc["status"] == "failed"
    assert doc["error"]["code"] in ("undecodable_image", "truncated_image")
    assert doc["attempts"] == 1
    assert not list(store.list_keys(f"results/{job_id}/"))


def test_cancel_finished_job_is_409(deployment):
    job_id = _submit(deployment.api, png(), "a.png").json()["id"]
    assert wait_for_job(deployment.api, job_id)["status"] == "succeeded"
    response = requests.delete(f"{deployment.api}/jobs/{job_id}", timeout=10)
    assert response.status_code == 409
    assert response.json()["error"]["code"] == "conflict"
    figure = requests.get(f"{deployment.api}/jobs/{job_id}/figure", allow_redirects=False)
    assert figure.status_code == 302


def test_tokens_guard_jobs(deployment):
    api = deployment.start_api("api-auth", api_tokens="alice-token,bob-token")
    alice = {"Authorization": "Bearer alice-token"}
    bob = {"Authorization": "Bearer bob-token"}
    assert _submit(api, png(), "a.png").status_code == 401
    bad = _submit(api, png(), "a.png", headers={"Authorization": "Bearer nope"})
    assert bad.status_code == 401 and bad.json()["error"]["code"] == "unauthorized"
    job_id = _submit(api, png(), "a.png", headers=alice).json()["id"]
    assert requests.get(f"{api}/jobs/{job_id}", headers=alice).status_code == 200
    assert requests.get(f"{api}/jobs/{job_id}", timeout=10).status_code == 401
    for method in ("GET", "DELETE"):
        other = requests.request(method, f"{api}/jobs/{job_id}", headers=bob, timeout=10)
        assert other.status_code == 404
    assert requests.get(f"{api}/healthz").status_code == 200  # health needs no token
    wait_for_job(api, job_id, headers=alice)


def test_two_workers_share_jobs_and_each_runs_once(deployment):
    second = deployment.start_worker("w2")
    try:
        ids = [
            _submit(deployment.api, png(color=(i, 0, 0)), "a.png").json()["id"] for i in range(12)
        ]
        docs = [wait_for_job(deployment.api, job_id) for job_id in ids]
    finally:
        second.stop()
    assert all(d["status"] == "succeeded" for d in docs)
    assert all(d["attempts"] == 1 for d in docs)
    hostnames = {d["worker"] for d in docs}
    assert hostnames == {deployment.workers[0].hostname, second.hostname}


def test_model_is_resident_one_load_per_worker_process(deployment):
    hostname = deployment.workers[0].hostname

    def beat() -> dict:
        (only,) = [w for w in live_workers(deployment.redis) if w["hostname"] == hostname]
        return only

    before = beat()
    ids = [_submit(deployment.api, png(color=(0, i, 0)), "a.png").json()["id"] for i in range(8)]
    docs = [wait_for_job(deployment.api, job_id) for job_id in ids]
    assert all(d["status"] == "succeeded" and d["worker"] == hostname for d in docs)
    # Heartbeats are refreshed every few seconds: wait for one written after these jobs.
    wait_until(
        lambda: beat()["jobs_done"] >= before["jobs_done"] + 8,
        timeout_s=30,
        what="a heartbeat counting the 8 jobs",
    )
    after = beat()
    assert after["pid"] == before["pid"]  # the same pool process served every job
    assert after["model_loads"] == 1


def test_health_readiness_metrics_openapi(deployment):
    ready = requests.get(f"{deployment.api}/readyz", timeout=10)
    assert ready.status_code == 200, ready.text
    assert ready.json()["checks"]["workers"]["count"] >= 1
    metrics = requests.get(f"{deployment.api}/metrics", timeout=10).text
    assert 'featuremaps_jobs_total{status="succeeded"}' in metrics
    assert 'featuremaps_queue_depth{queue="jobs"}' in metrics
    assert "featuremaps_http_request_duration_seconds" in metrics
    spec = requests.get(f"{deployment.api}/openapi.json", timeout=10).json()
    assert spec["openapi"].startswith("3.") and "/jobs/{job_id}" in spec["paths"]


# --- A deployment whose Redis and S3 the tests may stop -----------------------------------


@pytest.fixture
def fragile(tmp_path):
    redis = RedisServer(tmp_path / "redis")
    s3 = SeaweedS3(tmp_path / "s3")
    redis.start()
    s3.start()
    dep = Deployment(tmp_path, redis_url=redis.url, s3=s3, bucket="fragile")
    dep.api = dep.start_api()
    dep.redis_server, dep.s3_server = redis, s3
    yield dep
    dep.stop()
    s3.stop()
    redis.stop()


def test_cancel_queued_job_never_runs(fragile):
    # No worker yet: the job stays queued.
    job_id = _submit(fragile.api, png(), "a.png").json()["id"]
    response = requests.delete(f"{fragile.api}/jobs/{job_id}", timeout=10)
    assert response.status_code == 202 and response.json()["status"] == "canceled"
    marker = _submit(fragile.api, png(), "b.png").json()["id"]
    fragile.start_worker("late")
    assert wait_for_job(fragile.api, marker)["status"] == "succeeded"  # queue drained past it
    doc = requests.get(f"{fragile.api}/jobs/{job_id}", timeout=10).json()
    assert doc["status"] == "canceled" and doc["attempts"] == 0 and doc["worker"] is None


@pytest.mark.parametrize("down", ["redis", "s3"])
def test_dependency_down_gives_503_and_nothing_half_made(fragile, down):
    settings = Settings(
        s3_endpoint=fragile.s3_server.endpoint,
        s3_access_key=fragile.s3_server.access_key,
        s3_secret_key=fragile.s3_server.secret_key,
        s3_bucket="fragile",
    )
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    keys_before = set(store.list_keys(""))
    jobs_before = set(fragile.redis.scan_iter("featuremaps:job:*"))
    service = fragile.redis_server if down == "redis" else fragile.s3_server
    service.stop()
    try:
        ready = requests.get(f"{fragile.api}/readyz", timeout=30)
        assert ready.status_code == 503
        assert ready.json()["checks"]["redis" if down == "redis" else "storage"]["ok"] is False
        response = _submit(fragile.api, png(), "a.png")
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] in ("unavailable", "storage_unavailable")
    finally:
        service.start()
    assert set(store.list_keys("")) == keys_before
    assert set(fragile.redis.scan_iter("featuremaps:job:*")) == jobs_before
    assert _submit(fragile.api, png(), "a.png").json()["status"] == "queued"  # recovered
