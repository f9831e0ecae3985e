"""Models through the real service (gunicorn, Redis, SeaweedFS, a Celery worker process):
weights uploaded with the client run a job whose maps are those of the same weights loaded
here, and jobs alternating over three architectures all succeed while the worker keeps at
most FEATUREMAPS_RESIDENT_MODELS = 2 of them loaded besides ResNet-18, as its metrics show.
docs/design.md "Models", "Uploaded models". Redis db 19."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from client import Client
from shared.options import JobOptions
from stack.services import free_port
from tests.helpers import png, zip_of
from tests.integration.deployment import Deployment
from tests.integration.test_metrics import scrape
from tests.unit.test_weights_files import saved, seeded_state_dict
from worker.compute.model import load_uploaded
from worker.compute.pipeline import process_image

ALTERNATING = (
    ("resnet34", "chain"),
    ("mobilenet_v3_large", "forward"),
    ("regnet_y_400mf", "forward"),
)


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("models"),
        redis_server,
        s3_server,
        name="models",
        db=19,
        models=",".join(name for name, _ in ALTERNATING),
        resident_models=2,
        worker_metrics_port=free_port(),
    ) as dep:
        yield dep


@pytest.fixture(scope="module")
def client(deployment) -> Client:
    return Client(deployment.api)


def worker_models(dep: Deployment) -> dict[str, float]:
    samples = scrape(f"http://127.0.0.1:{dep.settings['worker_metrics_port']}/metrics")
    return {
        name: value for (name, labels), value in samples.items() if "model" in name and not labels
    }


def test_a_job_runs_on_uploaded_weights(client, tmp_path):
    path = tmp_path / "seeded.pt"
    path.write_bytes(saved(seeded_state_dict("resnet18", seed=11)))
    uploaded = client.upload_model(path, architecture="resnet18", name="seeded")
    assert uploaded["sha256"] == hashlib.sha256(path.read_bytes()).hexdigest()
    assert client.models()["uploads"] == [uploaded]

    image = png((96, 64), (30, 160, 90))
    job = client.submit(image, model=uploaded["id"], arrays=True).wait(timeout=120)
    assert job.status == "succeeded", job.doc
    assert job.manifest["model"] == "resnet18"
    assert job.manifest["weights"] == {
        "name": "upload",
        "id": uploaded["id"],
        "sha256": uploaded["sha256"],
        "label": "seeded",
    }
    # The maps are those of these weights, loaded here the worker's way.
    identity = job.manifest["weights"]
    local = process_image(
        load_uploaded("resnet18", path, identity, device="cpu"),
        image,
        JobOptions(model=uploaded["id"], arrays=True),
        max_pixels=10**8,
    )
    maps = job.maps()
    assert list(maps) == list(local.maps)
    for name, expected in local.maps.items():
        np.testing.assert_array_equal(maps[name], expected, err_msg=name)


def test_alternating_models_stay_within_the_resident_bound(client, deployment):
    image = png((64, 64), (200, 40, 90))
    before = worker_models(deployment)
    for _round in range(2):
        for model, mode in ALTERNATING:
            job = client.submit(image, model=model, mode=mode).wait(timeout=180)
            assert job.status == "succeeded", job.doc
            assert job.manifest["model"] == model
            now = worker_models(deployment)
            assert now["featuremaps_worker_resident_models"] <= 2
    after = worker_models(deployment)
    assert after["featuremaps_worker_resident_models_peak"] == 2
    # Three models through a set of two, least recently used first: every job loads one.
    assert after["featuremaps_worker_model_loads_total"] - before[
        "featuremaps_worker_model_loads_total"
    ] == 2 * len(ALTERNATING)
    assert after["featuremaps_worker_model_evictions_total"] >= 2 * len(ALTERNATING) - 2


def test_a_batch_with_dataset_examples_on_another_model(client, tmp_path):
    """A batch uses one model: its items' figures and its examples' layers are the
    network's default tiles (MobileNetV3: no squeeze-and-excitation convs among them)."""
    archive = tmp_path / "photos.zip"
    archive.write_bytes(
        zip_of({f"{n}.png": png((48, 48), (40 * n, 90, 200 - 40 * n)) for n in range(3)})
    )
    batch = client.batch(archive, model="mobilenet_v3_large", mode="forward", examples=2)
    batch.wait(timeout=240)
    assert batch.status == "succeeded", batch.doc
    assert batch.counts["succeeded"] == 3
    examples = batch.examples()
    names = [layer.name for layer in examples.layers]
    assert len(names) == 32 and names[0] == "features.0.0"
    assert not any(name.endswith((".fc1", ".fc2")) for name in names)
    item = next(iter(batch))
    assert item.figure().width > 500
