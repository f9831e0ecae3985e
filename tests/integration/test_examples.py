"""Dataset examples end to end (docs/design.md "Dataset examples"): an archive of photos of
mixed sizes (camera-size JPEGs with EXIF orientation among them) through gunicorn, real
Celery workers, Redis and S3. ``examples.json`` equals a brute-force reference computed here
(every image's activations by the article's loop or by cloning hooks, every score, a sort),
for ``chain`` and ``forward``, ``mean`` and ``max``; and it is the same bytes whatever the
chunk size, with two workers, and with a worker SIGKILLed mid-batch."""

from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import pytest
import requests
import torch
from PIL import Image, ImageOps
from torch import nn
from torchvision import transforms

from stack.services import wait_until
from tests import photos
from tests.helpers import wait_for_batch
from tests.integration.deployment import Deployment
from tests.integration.test_batches import photo

K = 3


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "PNG")
    return buffer.getvalue()


def _members() -> list[tuple[str, bytes]]:
    """Mixed sizes and formats: two 12 MP camera JPEGs (one stored sideways), a PNG, small
    and medium JPEGs, one duplicate (reused, under its own name) and one non-image."""
    small = [
        (f"shots/IMG_{i:04d}.jpg", photo(100 + i, (160 + 40 * i, 120 + 25 * i))) for i in range(8)
    ]
    return [
        ("camera/DSC_0001.JPG", photos.camera_jpeg(orientation=6, seed=1)),
        *small[:4],
        ("scans/page.png", _png(photos.scene(900, 1300, seed=3))),
        ("camera/DSC_0002.JPG", photos.camera_jpeg(orientation=None, seed=2)),
        *small[4:],
        ("copies/IMG_0002 copy.jpg", small[2][1]),
        ("notes.txt.jpg", b"not a photo at all"),
    ]


@pytest.fixture(scope="module")
def members() -> list[tuple[str, bytes]]:
    return _members()


@pytest.fixture(scope="module")
def archive(members) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as bundle:
        for name, data in members:
            bundle.writestr(name, data)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("examples"),
        redis_server,
        s3_server,
        name="examples",
        db=31,
        worker="e1",
        batch_chunk=16,
        # Two example slices for this archive, so slices meet in the assembly.
        example_slice_items=5,
        task_soft_time_limit_s=40,
        task_time_limit_s=50,
        visibility_timeout_s=60,
    ) as dep:
        yield dep


@pytest.fixture(scope="module")
def model():
    from worker.compute.model import load_model

    return load_model("random", device="cpu").model


def submit(deployment: Deployment, archive: bytes, **options) -> str:
    response = requests.post(
        f"{deployment.api}/batches",
        files={"archive": ("photos.zip", archive)},
        data={"examples": str(K), **options},
        timeout=60,
    )
    assert response.status_code == 202, response.text
    return response.json()["id"]


def examples_json(deployment: Deployment, doc: dict) -> bytes:
    """The batch's examples.json, its own id (in item ids and sheet keys) made ``<batch>``:
    batches of the same archive must agree on everything else, byte for byte."""
    assert doc["status"] == "succeeded", doc
    url = doc["result"]["examples_url"]
    response = requests.get(url, timeout=30)
    assert response.status_code == 200, response.text
    assert response.content.count(doc["id"].encode()) > 0
    return response.content.replace(doc["id"].encode(), b"<batch>")


def finished(deployment: Deployment, archive: bytes, **options) -> dict:
    batch_id = submit(deployment, archive, **options)
    return wait_for_batch(deployment.api, batch_id, timeout_s=600)


def run(deployment: Deployment, archive: bytes, **options) -> bytes:
    return examples_json(deployment, finished(deployment, archive, **options))


@pytest.fixture(scope="module")
def first_run(deployment, archive) -> dict:
    """The module's first batch (chain, mean; result reuse on, so the duplicate member
    shares its twin's result): the baseline every later run must equal."""
    return finished(deployment, archive, mode="chain", examples_score="mean")


# --- the reference: the article's computation written out, every score, a sort -----------


def _article_input(data: bytes) -> torch.Tensor:
    image = ImageOps.exif_transpose(Image.open(io.BytesIO(data))).convert("RGB")
    return transforms.Compose([transforms.Resize((224, 224)), transforms.ToTensor()])(image)


def _chain_activations(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """The article's loop: top-level Conv2d children, then each block's own Conv2d
    children, applied one after another."""
    convs = []
    for name, child in model.named_children():
        if type(child) is nn.Conv2d:
            convs.append((name, child))
        elif type(child) is nn.Sequential:
            for block_name, block in child.named_children():
                for conv_name, conv in block.named_children():
                    if type(conv) is nn.Conv2d:
                        convs.append((f"{name}.{block_name}.{conv_name}", conv))
    outputs = []
    with torch.no_grad():
        for name, conv in convs:
            x = conv(x)
            outputs.append((name, x.clone()))
    return outputs


def _forward_activations(model: nn.Module, x: torch.Tensor) -> list[tuple[str, torch.Tensor]]:
    """Every Conv2d's output of one forward pass, cloned by its hook."""
    captured: dict[str, torch.Tensor] = {}
    handles = [
        module.register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().clone())
        )
        for name, module in model.named_modules()
        if isinstance(module, nn.Conv2d)
    ]
    try:
        with torch.no_grad():
            model.eval()(x)
    finally:
        for handle in handles:
            handle.remove()
    return [(n, captured[n]) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def reference(model: nn.Module, members, mode: str, score: str) -> dict:
    """{layer: (top lists of names, top lists of scores, channel_mean, channel_max)}."""
    per_layer: dict[str, list[np.ndarray]] = {}
    names = []
    for name, data in members:
        try:
            x = _article_input(data)[None]
        except OSError:
            continue  # the non-image fails; failed items take no part
        names.append(name)
        layers = (_chain_activations if mode == "chain" else _forward_activations)(model, x)
        for layer, activation in layers:
            a = activation[0].float()
            value = a.mean(dim=(1, 2)) if score == "mean" else a.amax(dim=(1, 2))
            per_layer.setdefault(layer, []).append(value.numpy())
    expected = {}
    for layer, rows in per_layer.items():
        scores = np.stack(rows)  # [items, channels]
        tops_names, tops_scores = [], []
        for channel in range(scores.shape[1]):
            order = sorted(range(len(names)), key=lambda i: (-scores[i, channel], i))[:K]
            tops_names.append([names[i] for i in order])
            tops_scores.append([float(scores[i, channel]) for i in order])
        expected[layer] = (
            tops_names,
            tops_scores,
            scores.astype(np.float64).mean(axis=0),
            scores.max(axis=0),
        )
    return expected


@pytest.mark.parametrize("mode, score", [("chain", "mean"), ("forward", "max")])
def test_examples_equal_a_brute_force_reference(
    deployment, archive, members, model, first_run, mode, score
):
    if mode == "chain":
        document = json.loads(examples_json(deployment, first_run))
    else:
        document = json.loads(run(deployment, archive, mode=mode, examples_score=score))
    expected = reference(model, members, mode, score)
    assert document["k"] == K and document["score"] == score and document["mode"] == mode
    assert document["items"] == len(members) - 1 and document["missing"] == []
    assert [layer["name"] for layer in document["layers"]] == list(expected)
    assert len(document["layers"]) == (17 if mode == "chain" else 20)
    for layer in document["layers"]:
        names, scores, mean, maximum = expected[layer["name"]]
        assert layer["channels"] == len(names) == len(layer["top"])
        assert [[e["name"] for e in top] for top in layer["top"]] == names, layer["name"]
        got = np.array([[e["score"] for e in top] for top in layer["top"]])
        np.testing.assert_allclose(got, np.array(scores), rtol=1e-5, atol=1e-7)
        np.testing.assert_allclose(layer["channel_mean"], mean, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(layer["channel_max"], maximum, rtol=1e-5, atol=1e-7)


def test_every_top_list_place_has_its_tile_in_a_sheet(deployment, first_run):
    batch_id = first_run["id"]
    named = examples_json(deployment, first_run).replace(b"<batch>", batch_id.encode())
    document = json.loads(named)
    store = deployment.object_store()
    layer = document["layers"][0]
    assert len(layer["sheets"]) == -(-layer["channels"] // document["sheet_channels"])
    sheet = np.asarray(Image.open(io.BytesIO(store.get_bytes(layer["sheets"][0]))))
    tile = document["tile"]
    assert sheet.shape == (document["sheet_channels"] * tile, K * tile, 3)
    # Every place of a full top list is a drawn tile, not the grey background.
    for rank in range(K):
        box = sheet[:tile, rank * tile : (rank + 1) * tile].astype(int)
        assert np.abs(box - 128).max() > 40, f"tile (0, {rank}) is blank"


@pytest.fixture(scope="module")
def baseline(deployment, first_run) -> bytes:
    return examples_json(deployment, first_run)


def _restart_workers(deployment: Deployment, names: list[str], chunk: int) -> None:
    """Workers of this chunk size that compute every item (no result reuse: every score
    comes from a model pass of this run)."""
    for worker in deployment.workers:
        worker.stop()
    deployment.workers = [_worker(deployment, name, chunk) for name in names]


def _worker(deployment: Deployment, name: str, chunk: int):
    return deployment.start_worker(name, batch_chunk=str(chunk), reuse_results="false")


@pytest.mark.parametrize("chunk, workers", [(1, ["c1"]), (128, ["c128"]), (3, ["t1", "t2"])])
def test_the_same_bytes_for_any_chunk_size_and_number_of_workers(
    deployment, archive, baseline, chunk, workers
):
    _restart_workers(deployment, workers, chunk)
    assert run(deployment, archive, mode="chain") == baseline


def test_the_same_bytes_with_a_worker_killed_mid_batch(deployment, archive, baseline):
    _restart_workers(deployment, ["k1", "k2"], 1)
    batch_id = submit(deployment, archive, mode="chain")

    def some_done() -> bool:
        doc = requests.get(f"{deployment.api}/batches/{batch_id}", timeout=10).json()
        return doc["counts"]["succeeded"] >= 3

    wait_until(some_done, timeout_s=300, what="a few items to succeed")
    killed = deployment.workers[0]
    killed.kill()
    doc = requests.get(f"{deployment.api}/batches/{batch_id}", timeout=10).json()
    assert doc["status"] in ("expanding", "running"), doc  # killed mid-batch
    deployment.workers.append(_worker(deployment, "k3", 1))
    doc = wait_for_batch(deployment.api, batch_id, timeout_s=600)
    assert examples_json(deployment, doc) == baseline
    # The kill hit a chunk in flight: the live workers found it held by the dead one and
    # handed it over (recovery logs it).
    logs = "".join(
        (deployment.run_dir / f"{name}.log").read_text(errors="replace") for name in ("k2", "k3")
    )
    assert f"held by {killed.hostname}:" in logs and "handed over" in logs
