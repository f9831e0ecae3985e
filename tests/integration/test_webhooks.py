"""Webhooks against the real deployment (gunicorn API, Redis, S3, a Celery worker) and a real
HTTP receiver started here (``tests/integration/receiver.py``): one signed call per final
state, retries with backoff recorded on the record, no redirects, the SSRF guard at
submission, delivery off the jobs' path, and an outbox that outlives its worker."""

from __future__ import annotations

import io
import json
import re
import time
import uuid
import zipfile
from pathlib import Path

import pytest
import requests

from tests.helpers import png, submit_job, wait_for_batch, wait_for_job
from tests.integration.deployment import Deployment
from tests.integration.receiver import Receiver

SECRET = f"whsec-{uuid.uuid4().hex}"
README = Path(__file__).resolve().parents[2] / "README.md"


def readme_verify():
    """The signature check exactly as the README shows it."""
    block = re.search(r"```python\n(import hashlib, hmac, time\n.*?)```", README.read_text(), re.S)
    assert block, "README lost its verification snippet"
    namespace: dict = {}
    exec(block.group(1), namespace)
    return namespace["verify"]


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("webhooks"),
        redis_server,
        s3_server,
        name="hooks",
        db=16,
        webhook_secret=SECRET,
        webhook_allow_private="true",
        webhook_backoff_s="0.5",
        webhook_timeout_s="30",
        webhook_retry_for_s="10",
    ) as dep:
        yield dep


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    yield server
    server.close()


def submit(api: str, callback_url: str | None, image: bytes | None = None) -> requests.Response:
    data = {"callback_url": callback_url} if callback_url is not None else {}
    return submit_job(api, image or png(), filename="x.png", **data)


def wait_for_callback_state(api: str, path: str, *, timeout_s: float = 120) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        doc = requests.get(f"{api}{path}", timeout=10).json()
        if doc["callback_state"] in ("delivered", "failed"):
            return doc
        if time.monotonic() > deadline:
            raise AssertionError(f"{path}: callback still {doc['callback_state']}: {doc}")
        time.sleep(0.1)


def test_one_signed_call_per_final_state(deployment, receiver):
    verify = readme_verify()
    path = f"/ok/{uuid.uuid4().hex}"
    answer = submit(deployment.api, receiver.url(path))
    assert answer.status_code == 202
    job_id = answer.json()["id"]
    doc = wait_for_job(deployment.api, job_id)
    assert doc["status"] == "succeeded" and doc["callback_url"] == receiver.url(path)
    doc = wait_for_callback_state(deployment.api, f"/jobs/{job_id}")
    (call,) = receiver.calls_to(path)
    assert verify(SECRET, call.headers["X-Featuremaps-Signature"], call.body)
    assert not verify("another-secret", call.headers["X-Featuremaps-Signature"], call.body)
    assert not verify(SECRET, call.headers["X-Featuremaps-Signature"], call.body + b" ")
    sent = json.loads(call.body)
    assert (sent["id"], sent["status"]) == (job_id, "succeeded")
    assert sent["result"]["figure_url"].startswith("http")
    assert call.headers["Content-Type"] == "application/json"
    assert doc["callback_state"] == "delivered"
    assert [(a["status"], a["error"]) for a in doc["callbacks"]] == [(200, None)]


def test_a_canceled_job_and_a_batch_are_called_back_with_their_final_state(deployment, receiver):
    job_path, batch_path = f"/ok/{uuid.uuid4().hex}", f"/ok/{uuid.uuid4().hex}"
    job_id = submit(deployment.api, receiver.url(job_path)).json()["id"]
    requests.delete(f"{deployment.api}/jobs/{job_id}", timeout=10)  # 202, or 409 if done
    final = wait_for_job(deployment.api, job_id)["status"]
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as zf:
        zf.writestr("a.png", png())
        zf.writestr("b.png", png(color=(1, 2, 3)))
    batch = requests.post(
        f"{deployment.api}/batches",
        files={"archive": ("two.zip", archive.getvalue())},
        data={"callback_url": receiver.url(batch_path)},
        timeout=30,
    )
    assert batch.status_code == 202
    batch_id = batch.json()["id"]
    wait_for_batch(deployment.api, batch_id)
    wait_for_callback_state(deployment.api, f"/batches/{batch_id}")
    wait_for_callback_state(deployment.api, f"/jobs/{job_id}")
    (job_call,) = receiver.calls_to(job_path)
    assert (json.loads(job_call.body)["id"], json.loads(job_call.body)["status"]) == (job_id, final)
    (batch_call,) = receiver.calls_to(batch_path)
    sent = json.loads(batch_call.body)
    assert (sent["id"], sent["status"], sent["counts"]["succeeded"]) == (batch_id, "succeeded", 2)
    assert sent["result"]["manifest_url"] and sent["links"]["self"] == f"/batches/{batch_id}"


def test_the_command_line_passes_its_callback_url(deployment, receiver, tmp_path, capsys):
    from client.cli import main

    image = tmp_path / "photo.png"
    image.write_bytes(png(color=(40, 40, 40)))
    path = f"/ok/{uuid.uuid4().hex}"
    argv = ["submit", str(image), "--callback-url", receiver.url(path), "--api", deployment.api]
    assert main(argv) == 0
    job_id = json.loads(capsys.readouterr().out)["id"]
    (call,) = receiver.wait_for(path, 1)
    assert json.loads(call.body)["id"] == job_id


def test_an_idempotency_key_covers_the_callback_url(deployment, receiver):
    key, image = str(uuid.uuid4()), png(color=(7, 7, 7))

    def post(callback_url: str):
        return requests.post(
            f"{deployment.api}/jobs",
            files={"image": ("x.png", image)},
            data={"callback_url": callback_url},
            headers={"Idempotency-Key": key},
            timeout=30,
        )

    first, again = post(receiver.url("/ok/a")), post(receiver.url("/ok/a"))
    assert again.json()["id"] == first.json()["id"]
    other = post(receiver.url("/ok/b"))
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_mismatch"


def test_a_receiver_that_fails_twice_gets_three_attempts(deployment, receiver):
    path = f"/fail-twice/{uuid.uuid4().hex}"
    job_id = submit(deployment.api, receiver.url(path)).json()["id"]
    doc = wait_for_callback_state(deployment.api, f"/jobs/{job_id}")
    assert doc["callback_state"] == "delivered"
    assert [a["status"] for a in doc["callbacks"]] == [500, 500, 200]
    assert doc["callbacks"][0]["error"].startswith("HTTP 500")
    calls = receiver.calls_to(path)
    assert [c.headers["X-Featuremaps-Attempt"] for c in calls] == ["1", "2", "3"]
    verify = readme_verify()
    assert all(verify(SECRET, c.headers["X-Featuremaps-Signature"], c.body) for c in calls)


def test_redirects_are_not_followed_and_retries_end(deployment, receiver):
    token = uuid.uuid4().hex
    job_id = submit(deployment.api, receiver.url(f"/redirect/{token}")).json()["id"]
    doc = wait_for_callback_state(deployment.api, f"/jobs/{job_id}")
    # WEBHOOK_RETRY_FOR_S=10 with backoff 0.5 s doubling: tries at 0, 0.5, 1.5, 3.5, 7.5 s.
    assert doc["callback_state"] == "failed"
    assert [a["status"] for a in doc["callbacks"]] == [302] * 5
    assert "redirects are not followed" in doc["callbacks"][0]["error"]
    assert receiver.calls_to(f"/ok/{token}") == []


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1:9/hook",
        "http://localhost/hook",
        "http://[::1]/hook",
        "http://10.0.0.7/hook",
        "http://169.254.169.254/latest/meta-data/",
        "http://[::ffff:127.0.0.1]/hook",
    ],
)
def test_private_targets_are_refused_at_submission_unless_allowed(deployment, url, strict_api):
    before = sum(1 for _ in deployment.redis.scan_iter("featuremaps:job:*"))
    answer = submit(strict_api, url)
    assert answer.status_code == 400
    error = answer.json()["error"]
    assert error["code"] == "callback_url_refused"
    assert "FEATUREMAPS_WEBHOOK_ALLOW_PRIVATE" in error["message"]
    assert sum(1 for _ in deployment.redis.scan_iter("featuremaps:job:*")) == before


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("ftp://example.com/hook", "http:// or https://"),
        ("http://user:pw@example.com/hook", "credentials"),
        ("http://no-such-host.invalid/hook", "does not resolve"),
        ("http:///hook", "http:// or https://"),
        ("http://example.com:99999/", "not a valid URL"),
    ],
)
def test_malformed_callback_urls_are_400(deployment, url, says):
    answer = submit(deployment.api, url)
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "callback_url_refused"
    assert says in answer.json()["error"]["message"]


def test_without_a_secret_callbacks_are_refused(deployment, receiver):
    api = deployment.start_api("api-unsigned", webhook_secret="")
    answer = submit(api, receiver.url("/ok/never"))
    assert answer.status_code == 400
    assert "FEATUREMAPS_WEBHOOK_SECRET" in answer.json()["error"]["message"]
    assert submit(api, None).status_code == 202


def test_a_slow_receiver_never_delays_the_next_job(deployment, receiver):
    path = f"/slow/{uuid.uuid4().hex}"
    first = submit(deployment.api, receiver.url(path)).json()["id"]
    wait_for_job(deployment.api, first)
    receiver.wait_for(path, 1)  # the callback is in flight, and its receiver is not answering
    second = submit(deployment.api, None, png(color=(0, 99, 0))).json()["id"]
    assert wait_for_job(deployment.api, second)["status"] == "succeeded"
    assert receiver.in_flight == 1  # still held when the next job had already succeeded
    receiver.release()
    doc = wait_for_callback_state(deployment.api, f"/jobs/{first}")
    assert [a["status"] for a in doc["callbacks"]] == [200]


def test_the_outbox_outlives_the_worker(deployment, receiver):
    """A callback due while no worker runs (the API canceled the job) is delivered by the
    next worker to start."""
    (worker,) = deployment.workers
    worker.stop()
    path = f"/ok/{uuid.uuid4().hex}"
    job_id = submit(deployment.api, receiver.url(path)).json()["id"]
    assert requests.delete(f"{deployment.api}/jobs/{job_id}", timeout=10).status_code == 202
    assert requests.get(f"{deployment.api}/jobs/{job_id}", timeout=10).json()["callback_state"] == (
        "pending"
    )
    deployment.workers = [deployment.start_worker("w2")]
    (call,) = receiver.wait_for(path, 1)
    assert json.loads(call.body)["status"] == "canceled"
    assert wait_for_callback_state(deployment.api, f"/jobs/{job_id}")["callback_state"] == (
        "delivered"
    )


@pytest.fixture(scope="module")
def strict_api(deployment):
    """An API of the same deployment without WEBHOOK_ALLOW_PRIVATE."""
    return deployment.start_api("api-strict", webhook_allow_private="false")
