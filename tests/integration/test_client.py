"""The Python client (``from client import Client``) against a real deployment with tokens:
submit / wait / figure / maps on a camera photo, bytes and PIL input, a batch with progress
and its items, errors mapped to typed exceptions with the API's codes, and Retry-After
honoured on a rate-limited API process."""

from __future__ import annotations

import io

import numpy as np
import pytest
import requests
from PIL import Image

from client import (
    BadRequest,
    Client,
    Conflict,
    JobFailed,
    NotFound,
    OutputNotMade,
    RateLimited,
    Unauthorized,
    UnsupportedType,
)
from tests import photos
from tests.integration.deployment import Deployment

TOKEN = "client-token"
LIMIT_PER_MINUTE = 2


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("client"),
        redis_server,
        s3_server,
        name="client",
        db=11,
        api_tokens=TOKEN,
    ) as dep:
        yield dep


@pytest.fixture(scope="module")
def client(deployment) -> Client:
    return Client(deployment.api, token=TOKEN)


@pytest.fixture(scope="module")
def camera_photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("photos") / "IMG_0001.JPG"
    path.write_bytes(photos.camera_jpeg(2000, 1500, orientation=6))
    return path


def test_submit_wait_figure_maps_on_a_camera_photo(client, camera_photo):
    job = client.submit(camera_photo, reduction="max", arrays=True, per_layer=True)
    assert job.wait(timeout=120) is job and job.status == "succeeded"

    figure = job.figure()
    assert isinstance(figure, Image.Image) and figure.width > 500
    assert job.manifest["input"]["exif_orientation"] == 6
    assert job.manifest["options"]["reduction"] == "max"

    maps = job.maps()
    assert list(maps) == [layer["name"] for layer in job.manifest["layers"]]
    assert maps["conv1"].dtype == np.float32 and maps["conv1"].shape == (112, 112)
    # The API's one-layer endpoint serves the same float32 bits as maps.npz.
    np.testing.assert_array_equal(job.layer("layer4.1.conv2"), maps["layer4.1.conv2"])
    assert job.result["thumbnail_url"] and len(job.result["layer_urls"]) == len(maps)


def test_bytes_and_pil_images_are_accepted(client):
    from_bytes = client.submit(photos.camera_jpeg(800, 600, orientation=None)).wait(timeout=120)
    from_pil = client.submit(Image.new("RGB", (320, 240), (200, 120, 40))).wait(timeout=120)
    assert from_bytes.status == from_pil.status == "succeeded"
    assert from_pil.manifest["input"]["format"] == "png"
    # A job that succeeded without arrays=True: not a failure, and the error says what to do.
    with pytest.raises(OutputNotMade, match=r"submitted without arrays=True") as raised:
        from_pil.maps()
    assert raised.value.code == "not_requested" and not isinstance(raised.value, JobFailed)


def test_the_input_as_analysed_and_a_layer_are_served(client, camera_photo):
    job = client.submit(camera_photo).wait(timeout=120)
    # The input beside the figure: upright (EXIF orientation 6 turns 2000×1500 into
    # 1500×2000), small, a JPEG whatever was uploaded.
    preview = Image.open(io.BytesIO(client.fetch(job.result["input_url"])))
    assert (preview.format, preview.size) == ("JPEG", (480, 640))
    # Without arrays=true the maps were not kept: a 409 that says what to do.
    with pytest.raises(Conflict, match="arrays=true"):
        job.layer("conv1")
    with pytest.raises(NotFound):
        job.layer("no.such.layer")


def test_a_batch_reports_progress_and_iterates_over_its_items(client, tmp_path, capsys):
    paths = []
    for i in range(5):
        path = tmp_path / f"IMG_{i:04d}.JPG"
        path.write_bytes(photos.camera_jpeg(640, 480, seed=i))
        paths.append(path)
    (tmp_path / "notes.jpg").write_text("not a photo")
    batch = client.batch([*paths, tmp_path / "notes.jpg"], colormap="magma")
    assert batch.wait(progress=True, timeout=240) is batch
    assert batch.status == "succeeded" and batch.progress == 1.0
    assert "img" in capsys.readouterr().err  # the progress bar

    items = list(batch)
    assert sorted(item.name for item in items) == sorted(
        p.name for p in [*paths, tmp_path / "notes.jpg"]
    )
    failed = [item for item in items if item.status == "failed"]
    assert [(item.name, item.error["code"]) for item in failed] == [
        ("notes.jpg", "unsupported_type")
    ]
    good = next(item for item in items if item.status == "succeeded")
    thumbnail, figure = good.thumbnail(), good.figure()
    assert thumbnail.width < figure.width / 2  # a small rendition, not the figure
    with pytest.raises(JobFailed) as raised:
        failed[0].figure()
    assert raised.value.code == "unsupported_type"

    out = batch.download(tmp_path / "out")
    assert (tmp_path / "out" / "manifest.jsonl") in out and len(out) == 1 + len(paths)


def test_errors_are_typed_and_carry_the_api_code(deployment, client, camera_photo):
    with pytest.raises(Unauthorized) as raised:
        Client(deployment.api, token="wrong").submit(camera_photo)
    assert (raised.value.status, raised.value.code) == (401, "unauthorized")
    with pytest.raises(UnsupportedType) as raised:
        client.submit(b"%PDF-1.4 not an image")
    assert raised.value.code == "unsupported_type"
    with pytest.raises(BadRequest) as raised:
        client.submit(camera_photo, reduction="median")
    assert raised.value.code == "invalid_option"
    with pytest.raises(NotFound) as raised:
        client.job("0" * 24)
    assert raised.value.code == "not_found"
    # A member of the tree as the CLI prints it: status, code, message.
    assert str(raised.value).startswith("404 not_found: ")


def test_retry_after_is_honoured_on_429(deployment, camera_photo):
    limited = deployment.start_api("api-limited", rate_limit_per_minute=LIMIT_PER_MINUTE)
    announced: list[float] = []
    slept: list[float] = []

    def record(response, *args, **kwargs):
        if response.status_code == 429:
            announced.append(float(response.headers["Retry-After"]))

    def sleep(seconds: float) -> None:
        # The wait the server asked for is taken as given; then the window is over.
        slept.append(seconds)
        for key in deployment.redis.scan_iter("featuremaps:ratelimit:*"):
            deployment.redis.delete(key)

    session = requests.Session()
    session.hooks["response"].append(record)
    client = Client(limited, token=TOKEN, session=session, sleep=sleep)
    job = client.submit(camera_photo)
    for _ in range(LIMIT_PER_MINUTE):
        job.refresh()
    assert announced and slept == announced, (announced, slept)
    assert 1 <= slept[0] <= 60

    no_retries = Client(limited, token=TOKEN, retries=0)
    for _ in range(LIMIT_PER_MINUTE + 1):
        try:
            no_retries.job(job.id)
        except RateLimited as exc:
            assert exc.code == "rate_limited" and exc.retry_after >= 1
            break
    else:
        pytest.fail("the rate limit never answered 429")
