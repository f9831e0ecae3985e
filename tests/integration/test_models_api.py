"""Models in-process: the ``model`` option at submission and POST/GET/DELETE /models on
Flask's test client against the session's real Redis and S3, then the worker's side of an
upload (its context loads it, a deleted one fails its job ``model_deleted``) with the
worker's own functions, no Celery. docs/design.md "Models", "Uploaded models"."""

from __future__ import annotations

import io
from collections.abc import Callable

import pytest
import torch
from flask.testing import FlaskClient
from urllib3 import encode_multipart_formdata

from api import create_app
from shared.batches import BatchStore
from shared.jobs import JobStore
from shared.leases import LeaseStore
from shared.options import JobOptions
from shared.settings import Settings
from tests.helpers import jpeg
from tests.unit.test_weights_files import malicious_pickle, saved, seeded_state_dict
from worker.compute.model import load_model
from worker.runtime import WorkerContext

ALICE = {"Authorization": "Bearer tok-alice"}
BOB = {"Authorization": "Bearer tok-bob"}
TOKENS = "alice:tok-alice,bob:tok-bob"


@pytest.fixture
def make_client(make_settings, redis_client, object_store) -> Callable[..., FlaskClient]:
    def make(**overrides) -> FlaskClient:
        return create_app(make_settings(api_tokens=TOKENS, **overrides)).test_client()

    return make


@pytest.fixture
def client(make_client) -> FlaskClient:
    return make_client(models="resnet18,resnet34,vgg16")


def upload(client: FlaskClient, data: bytes, headers=ALICE, **fields):
    """POST /models; the body is encoded here (Werkzeug's test client spools a large form
    to a temporary file it never closes)."""
    form = {"weights": ("weights.pt", data), "architecture": "resnet18", **fields}
    body, content_type = encode_multipart_formdata(form)
    return client.post("/models", data=body, content_type=content_type, headers=headers)


def submit(client: FlaskClient, headers=ALICE, **options):
    return client.post(
        "/jobs", data={"image": (io.BytesIO(jpeg()), "a.jpg"), **options}, headers=headers
    )


def error(response) -> dict:
    return response.get_json()["error"]


def test_the_model_option_at_submission(client):
    assert submit(client, model="resnet34").status_code == 202
    assert submit(client, model="vgg16", mode="forward").status_code == 202
    refused = submit(client, model="densenet121", mode="forward")
    assert refused.status_code == 400 and error(refused)["code"] == "invalid_option"
    assert "enabled: resnet18, resnet34, vgg16" in error(refused)["message"]
    chain = submit(client, model="vgg16")
    assert chain.status_code == 400
    assert error(chain)["message"] == (
        "mode=chain is defined for ResNet-style networks; use mode=forward"
    )
    layers = submit(client, model="resnet34", layers="layer9.*, layer4.*")
    assert layers.status_code == 400 and "layer9.* matches no layer" in error(layers)["message"]
    assert submit(client, model="resnet34", layers="layer4.*").status_code == 202
    listed = client.get("/models", headers=ALICE).get_json()
    assert listed == {"architectures": ["resnet18", "resnet34", "vgg16"], "uploads": []}


def test_upload_list_use_and_delete(client, make_client, object_store):
    data = saved(seeded_state_dict())
    response = upload(client, data, name="my resnet")
    assert response.status_code == 201, response.get_json()
    body = response.get_json()
    model_id = body["id"]
    assert body["architecture"] == "resnet18" and body["bytes"] == len(data)
    assert body["name"] == "my resnet" and body["format"] == "pytorch"
    assert response.headers["Location"] == f"/models/{model_id}"
    stored = list(object_store.list_keys("models/"))
    assert stored == [f"models/{model_id}/{body['sha256']}.pt"]
    assert object_store.get_bytes(stored[0]) == data
    # The same file again is the same model.
    assert upload(client, data).get_json()["id"] == model_id

    assert client.get("/models", headers=ALICE).get_json()["uploads"][0]["id"] == model_id
    assert client.get(f"/models/{model_id}", headers=ALICE).status_code == 200
    assert submit(client, model=model_id).status_code == 202
    # Another token neither sees nor uses it.
    assert client.get("/models", headers=BOB).get_json()["uploads"] == []
    assert client.get(f"/models/{model_id}", headers=BOB).status_code == 404
    assert client.delete(f"/models/{model_id}", headers=BOB).status_code == 404
    assert submit(client, headers=BOB, model=model_id).status_code == 404
    # mode=chain and layers on an upload follow its architecture.
    assert submit(client, model=model_id, mode="forward").status_code == 202
    assert submit(client, model=model_id, layers="layer3.*").status_code == 202
    assert submit(client, model=model_id, layers="features.*").status_code == 400

    # An upload whose architecture the operator no longer enables is refused.
    resnet34 = upload(client, saved(seeded_state_dict("resnet34")), architecture="resnet34")
    narrower = make_client(models="vgg16")
    disabled = submit(narrower, model=resnet34.get_json()["id"])
    assert disabled.status_code == 400 and "not enabled here" in error(disabled)["message"]

    assert client.delete(f"/models/{model_id}", headers=ALICE).status_code == 204
    assert client.get(f"/models/{model_id}", headers=ALICE).status_code == 404
    assert submit(client, model=model_id).status_code == 404
    assert not any(key.startswith(f"models/{model_id}/") for key in object_store.list_keys())


def test_refused_uploads(make_client, object_store, tmp_path):
    client = make_client(max_model_bytes=200_000_000)
    side_effect = tmp_path / "pwned"
    unsafe = upload(client, malicious_pickle(side_effect))
    assert unsafe.status_code == 422 and error(unsafe)["code"] == "unsafe_weights"
    assert "system" in error(unsafe)["message"]
    assert not side_effect.exists()

    wrong = upload(client, saved(seeded_state_dict("resnet34")))
    assert wrong.status_code == 422 and error(wrong)["code"] == "weights_mismatch"
    assert "unexpected: layer1.2.conv1.weight" in error(wrong)["message"]

    checkpoint = upload(client, saved({"epoch": 1, "model": seeded_state_dict()}))
    assert checkpoint.status_code == 422 and error(checkpoint)["code"] == "not_a_state_dict"

    not_enabled = upload(client, saved(seeded_state_dict()), architecture="resnet50")
    assert not_enabled.status_code == 400 and "enabled: resnet18" in error(not_enabled)["message"]

    small = make_client(max_model_bytes=1000)
    too_large = upload(small, saved(seeded_state_dict()))
    assert too_large.status_code == 413 and error(too_large)["code"] == "too_large"
    assert "FEATUREMAPS_MAX_MODEL_BYTES" in error(too_large)["message"]
    assert list(object_store.list_keys("models/")) == []


@pytest.fixture
def worker_context(make_settings, redis_client, object_store) -> WorkerContext:
    """The worker's per-process state on this test's Redis and bucket, without Celery."""
    settings: Settings = make_settings(api_tokens=TOKENS, models="resnet18,resnet34,vgg16")
    return WorkerContext(
        settings=settings,
        hostname="w@test",
        redis=redis_client,
        jobs=JobStore(redis_client, ttl_s=600),
        batches=BatchStore(redis_client, ttl_s=600),
        leases=LeaseStore(redis_client, ttl_s=600),
        store=object_store,
        loaded=load_model("random", device="cpu"),
        device="cpu",
    )


def test_the_worker_loads_an_upload_and_fails_a_job_whose_model_was_deleted(client, worker_context):
    from worker.execute import run_job

    ctx = worker_context
    state_dict = seeded_state_dict()
    model_id = upload(client, saved(state_dict)).get_json()["id"]
    loaded = ctx.model_for(JobOptions(model=model_id), "alice")
    assert loaded.weights["name"] == "upload" and loaded.weights["label"] == model_id
    assert torch.equal(loaded.model.conv1.weight, state_dict["conv1.weight"])

    done = submit(client, model=model_id, arrays="true").get_json()["id"]
    assert run_job(ctx, done) == "succeeded"
    assert ctx.jobs.get(done).result["weights"]["id"] == model_id

    queued = submit(client, model=model_id).get_json()["id"]
    assert client.delete(f"/models/{model_id}", headers=ALICE).status_code == 204
    assert run_job(ctx, queued) == "failed"
    assert ctx.jobs.get(queued).error["code"] == "model_deleted"
    assert ctx.models is not None and model_id not in ctx.models.resident()


def test_a_chunk_whose_model_was_deleted_fails_its_items(client, worker_context):
    from shared.batches import Batch, BatchStatus, ItemStatus, NewItem, item_id
    from shared.records import new_record_id
    from worker.batches.chunks import Delivery, run_chunk

    ctx = worker_context
    model_id = upload(client, saved(seeded_state_dict())).get_json()["id"]
    batch_id = new_record_id()
    options = JobOptions.for_batch({"model": model_id}).to_dict()
    ctx.batches.create(
        Batch(id=batch_id, status=BatchStatus.QUEUED, options=options, source={}, owner="alice")
    )
    ctx.batches.begin_expansion(batch_id)
    ids = [item_id(batch_id, n) for n in range(3)]
    pack = f"batches/{batch_id}/inputs/000000.pack"
    ctx.store.put_bytes(pack, jpeg() * 3)
    size = len(jpeg())
    ctx.batches.add_items(
        batch_id,
        [
            NewItem(i, f"{n}.jpg", input_key=pack, input_range=(n * size, size))
            for n, i in enumerate(ids)
        ],
    )
    ctx.batches.end_expansion(batch_id)
    assert client.delete(f"/models/{model_id}", headers=ALICE).status_code == 204

    finalized: list[str] = []
    assert run_chunk(ctx, batch_id, ids, Delivery("chunk-1", finalized.append)) == 3
    items = ctx.batches.get_items(batch_id, ids)
    assert {items[i].status for i in ids} == {ItemStatus.FAILED}
    assert {items[i].info["error"]["code"] for i in ids} == {"model_deleted"}
    assert finalized == [batch_id]
