"""Per-item callbacks of a batch (``item_callbacks=true``) against the real deployment
(gunicorn API, Redis, S3, a Celery worker) and a real HTTP receiver: one signed call per
item with its final status besides the batch's own final call, item calls spaced by
WEBHOOK_ITEM_RATE as the receiver sees them, a retry recorded on the item, and the 400s."""

from __future__ import annotations

import io
import itertools
import json
import time
import uuid
import zipfile

import pytest
import requests

from tests.helpers import png, submit_archive, wait_for_batch
from tests.integration.deployment import Deployment
from tests.integration.receiver import Receiver
from tests.integration.test_webhooks import SECRET, readme_verify

RATE = 4.0  # item calls per second per batch: 0.25 s apart
MEMBERS = {"a.png": png(), "b.png": png(color=(1, 2, 3)), "c.png": png(color=(9, 9, 9))}
BROKEN = "broken.png"


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("itemhooks"),
        redis_server,
        s3_server,
        name="itemhooks",
        db=21,
        webhook_secret=SECRET,
        webhook_allow_private="true",
        webhook_backoff_s="0.5",
        webhook_item_rate=str(RATE),
    ) as dep:
        yield dep


@pytest.fixture(scope="module")
def receiver():
    server = Receiver()
    yield server
    server.close()


def archive() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        for name, data in MEMBERS.items():
            zf.writestr(name, data)
        zf.writestr(BROKEN, b"these bytes are no image")
    return buf.getvalue()


def submit(api: str, data: dict[str, str], headers: dict[str, str] | None = None):
    return submit_archive(api, "four.zip", archive(), headers=headers, timeout_s=30, **data)


def items_when_called_back(api: str, batch_id: str, *, timeout_s: float = 120) -> list[dict]:
    """The batch's items once every item call was delivered or given up."""
    deadline = time.monotonic() + timeout_s
    while True:
        items = requests.get(f"{api}/batches/{batch_id}/items", timeout=10).json()["items"]
        if all(i["callback_state"] in ("delivered", "failed") for i in items):
            return items
        if time.monotonic() > deadline:
            raise AssertionError(f"item calls of {batch_id} not settled: {items}")
        time.sleep(0.2)


def calls_by_event(receiver: Receiver, path: str) -> dict[str, list]:
    calls = receiver.calls_to(path)
    return {
        e: [c for c in calls if c.headers["X-Featuremaps-Event"] == e] for e in ("item", "batch")
    }


def test_each_item_is_called_back_signed_and_spaced_besides_the_batch(deployment, receiver):
    path = f"/ok/{uuid.uuid4().hex}"
    answer = submit(deployment.api, {"callback_url": receiver.url(path), "item_callbacks": "true"})
    assert answer.status_code == 202
    batch_id = answer.json()["id"]
    doc = wait_for_batch(deployment.api, batch_id)
    assert doc["item_callbacks"] is True
    items = items_when_called_back(deployment.api, batch_id)
    receiver.wait_for(path, len(items) + 1)
    calls = calls_by_event(receiver, path)
    verify = readme_verify()
    assert all(verify(SECRET, c.headers["X-Featuremaps-Signature"], c.body) for c in calls["item"])
    sent = {json.loads(c.body)["name"]: json.loads(c.body) for c in calls["item"]}
    assert len(calls["item"]) == len(sent) == len(MEMBERS) + 1  # one call per item
    assert {n: d["status"] for n, d in sent.items()} == {
        **dict.fromkeys(MEMBERS, "succeeded"),
        BROKEN: "failed",
    }
    assert all(d["batch_id"] == batch_id for d in sent.values())
    assert all(sent[n]["figure_url"].startswith("http") for n in MEMBERS)
    assert sent[BROKEN]["error"]["code"] and sent[BROKEN]["figure_url"] is None
    (batch_call,) = calls["batch"]  # the batch's own final call, once
    assert json.loads(batch_call.body)["id"] == batch_id
    assert verify(SECRET, batch_call.headers["X-Featuremaps-Signature"], batch_call.body)
    assert {i["callback_state"] for i in items} == {"delivered"}
    assert all([a["status"] for a in i["callbacks"]] == [200] for i in items)
    arrivals = sorted(c.at for c in calls["item"])
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    print(f"item calls at rate {RATE}/s: gaps {[round(g, 3) for g in gaps]} s")
    # Each call starts at least 1/RATE after the previous one; what the receiver sees may
    # differ by a connection's own delay on a busy machine, never by a burst (~1 ms apart).
    assert min(gaps) >= 0.6 / RATE


def test_a_failed_item_call_is_retried_and_recorded_on_the_item(deployment, receiver):
    path = f"/fail-once-each/{uuid.uuid4().hex}"
    data = {"callback_url": receiver.url(path), "item_callbacks": "1"}
    batch_id = submit(deployment.api, data).json()["id"]
    wait_for_batch(deployment.api, batch_id)
    items = items_when_called_back(deployment.api, batch_id)
    for item in items:
        assert item["callback_state"] == "delivered" and item["callback_attempts"] == 2
        assert [a["status"] for a in item["callbacks"]] == [500, 200]
        assert item["callbacks"][0]["error"].startswith("HTTP 500")
    calls = calls_by_event(receiver, path)["item"]
    attempts = sorted(c.headers["X-Featuremaps-Attempt"] for c in calls)
    assert attempts == sorted(["1", "2"] * len(items))


def test_item_callbacks_need_a_callback_url_and_a_boolean(deployment, receiver):
    before = sum(1 for _ in deployment.redis.scan_iter("featuremaps:batch:*"))
    missing = submit(deployment.api, {"item_callbacks": "true"})
    assert missing.status_code == 400
    assert missing.json()["error"]["code"] == "missing_field"
    assert "callback_url" in missing.json()["error"]["message"]
    bad = submit(deployment.api, {"callback_url": receiver.url("/ok/x"), "item_callbacks": "ja"})
    assert bad.status_code == 400
    assert bad.json()["error"]["code"] == "invalid_option"
    assert "item_callbacks" in bad.json()["error"]["message"]
    assert sum(1 for _ in deployment.redis.scan_iter("featuremaps:batch:*")) == before
    off = submit(deployment.api, {"item_callbacks": "false"})
    assert off.status_code == 202


def test_the_command_line_passes_item_callbacks(deployment, tmp_path, capsys):
    from client.cli import main

    path = tmp_path / "four.zip"
    path.write_bytes(archive())
    assert main(["batch", str(path), "--item-callbacks", "--api", deployment.api]) == 1
    assert "item_callbacks=true needs a callback_url" in capsys.readouterr().err


def test_an_idempotency_key_covers_item_callbacks(deployment, receiver):
    key, url = str(uuid.uuid4()), receiver.url(f"/ok/{uuid.uuid4().hex}")
    first = submit(deployment.api, {"callback_url": url}, {"Idempotency-Key": key})
    again = submit(deployment.api, {"callback_url": url}, {"Idempotency-Key": key})
    assert again.json()["id"] == first.json()["id"]
    other = submit(
        deployment.api, {"callback_url": url, "item_callbacks": "true"}, {"Idempotency-Key": key}
    )
    assert other.status_code == 422
    assert other.json()["error"]["code"] == "idempotency_mismatch"
