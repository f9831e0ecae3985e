"""Photos as people send them, end to end at the service's default limits (20 MB uploads,
50 MP): a 12 MP camera JPEG with EXIF orientation 6, files a kilobyte either side of the
upload limit, a 24 MP PNG, HEIC and AVIF from phones, CMYK and 16-bit files; through curl-like
multipart, a chunked body, the ``featuremaps`` client and a batch archive, each to a real
worker. Orientation is checked on the maps themselves against a numpy-rotated reference."""

from __future__ import annotations

import io
import zipfile

import numpy as np
import pytest
import requests

from shared.options import JobOptions
from tests import photos
from tests.helpers import accepted, submit_job, wait_for_batch, wait_for_job
from tests.integration.deployment import Deployment

LIMIT_MB = 20
LIMIT_BYTES = LIMIT_MB * 2**20
MAX_PIXELS = 50_000_000


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("photos"),
        redis_server,
        s3_server,
        name="pho",
        db=9,
        worker="p1",
        max_upload_mb=LIMIT_MB,
        max_image_pixels=MAX_PIXELS,
    ) as dep:
        yield dep


@pytest.fixture(scope="module")
def camera_jpeg() -> bytes:
    data = photos.camera_jpeg(orientation=6)
    assert 3_000_000 <= len(data) <= 6_000_000, len(data)
    return data


@pytest.fixture(scope="module")
def model():
    from worker.compute.model import load_model

    return load_model("random", device="cpu")


def _submit(api: str, data: bytes, filename: str = "IMG_0001.JPG", **options) -> dict:
    response = submit_job(api, data, filename=filename, timeout_s=120, **options)
    return wait_for_job(api, accepted(response), timeout_s=240)


def _maps(doc: dict) -> dict[str, np.ndarray]:
    with np.load(io.BytesIO(requests.get(doc["result"]["arrays_url"], timeout=30).content)) as npz:
        return {name: npz[name] for name in npz.files}


def _reference_maps(model, pixels: np.ndarray) -> dict[str, np.ndarray]:
    """Maps of already-upright pixels, computed in-process from a lossless PNG of them."""
    from worker.compute.pipeline import process_image

    result = process_image(
        model, photos.png_bytes(pixels), JobOptions(arrays=True), max_pixels=MAX_PIXELS
    )
    return result.maps


def test_a_camera_jpeg_with_orientation_6_is_processed_upright(deployment, camera_jpeg, model):
    doc = _submit(deployment.api, camera_jpeg, arrays="true")
    assert doc["status"] == "succeeded", doc
    manifest = requests.get(doc["result"]["manifest_url"], timeout=30).json()
    assert manifest["input"] == {
        "format": "jpg",
        "width": 3000,
        "height": 4000,
        "mode": "RGB",
        "exif_orientation": 6,
        "frames": 1,
    }, manifest["input"]
    got = _maps(doc)

    stored = photos.stored_pixels(camera_jpeg)
    assert stored.shape[:2] == (3000, 4000)
    upright = _reference_maps(model, photos.upright(stored, 6))
    sideways = _reference_maps(model, stored)
    assert list(got) == list(upright)
    for name in got:
        np.testing.assert_allclose(got[name], upright[name], rtol=1e-5, atol=1e-5, err_msg=name)
    # The unrotated image gives clearly different maps: the check can tell the two apart.
    assert not np.allclose(got["conv1"], sideways["conv1"], rtol=1e-2, atol=1e-2)


def test_the_camera_jpeg_goes_through_a_chunked_request_body(deployment, camera_jpeg):
    boundary = "featuremaps-chunked-test"
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="image"; filename="IMG_0002.JPG"\r\n'
        "Content-Type: image/jpeg\r\n\r\n"
    ).encode()

    def body():
        yield head
        for start in range(0, len(camera_jpeg), 256 * 1024):
            yield camera_jpeg[start : start + 256 * 1024]
        yield f"\r\n--{boundary}--\r\n".encode()

    response = requests.post(
        f"{deployment.api}/jobs",
        data=body(),  # a generator: Transfer-Encoding: chunked, no Content-Length
        headers={"Content-Type": f"multipart/form-data; boundary={boundary}"},
        timeout=120,
    )
    assert response.status_code == 202, response.text
    assert wait_for_job(deployment.api, response.json()["id"])["status"] == "succeeded"


def test_an_image_a_kilobyte_under_the_limit_is_accepted(deployment):
    data = photos.padded_png(LIMIT_BYTES - 1024)
    doc = _submit(deployment.api, data, "scan.png")
    assert doc["status"] == "succeeded", doc


@pytest.mark.parametrize("over", [1024, 3 * 2**20], ids=["1KB-over", "3MB-over"])
def test_an_image_over_the_limit_is_413_naming_the_limit_and_nothing_is_stored(deployment, over):
    store = deployment.object_store()
    keys_before = set(store.list_keys(""))
    jobs_before = set(deployment.redis.scan_iter("featuremaps:job:*"))
    data = photos.padded_png(LIMIT_BYTES + over)
    response = requests.post(
        f"{deployment.api}/jobs", files={"image": ("scan.png", data)}, timeout=120
    )
    assert response.status_code == 413, response.text
    error = response.json()["error"]
    assert error["code"] == "too_large"
    assert f"{LIMIT_MB} MB" in error["message"], error["message"]
    assert set(store.list_keys("")) == keys_before
    assert set(deployment.redis.scan_iter("featuremaps:job:*")) == jobs_before


PHONE_AND_PRINT = {
    "24MP.png": photos.large_png,
    "IMG_0003.HEIC": photos.heic_photo,
    "IMG_0004.avif": photos.avif_photo,
    "print-cmyk.jpg": photos.cmyk_jpeg,
    "scan-16bit.png": photos.png16,
    "progressive.jpg": lambda: photos.camera_jpeg(orientation=None, progressive=True, seed=5),
}


@pytest.fixture(scope="module")
def phone_and_print() -> dict[str, bytes]:
    return {name: make() for name, make in PHONE_AND_PRINT.items()}


@pytest.mark.parametrize("name", list(PHONE_AND_PRINT))
def test_phone_and_print_formats_succeed_upright(deployment, phone_and_print, model, name):
    data = phone_and_print[name]
    assert len(data) < LIMIT_BYTES
    doc = _submit(deployment.api, data, name, arrays="true")
    assert doc["status"] == "succeeded", doc
    got = _maps(doc)
    assert len(got) == 17
    # None of these has an EXIF rotation: the marker stays top-left, so the maps must match
    # those of the stored pixels, decoded independently here (through Pillow's RGB view).
    if name.endswith(("png", "jpg")) and "cmyk" not in name and "16bit" not in name:
        want = _reference_maps(model, photos.stored_pixels(data))
        np.testing.assert_allclose(got["conv1"], want["conv1"], rtol=1e-5, atol=1e-5)


def test_the_client_submits_a_camera_photo_and_downloads_its_outputs(
    deployment, camera_jpeg, tmp_path, capsys
):
    from client.cli import main

    photo = tmp_path / "IMG_0005.JPG"
    photo.write_bytes(camera_jpeg)
    out = tmp_path / "out"
    code = main(["submit", str(photo), "--wait", "--download", str(out), "--api", deployment.api])
    assert code == 0, capsys.readouterr()
    downloaded = {path.name for path in out.iterdir()}
    assert {"feature_maps.jpg", "manifest.json"} <= downloaded, downloaded


def test_a_batch_archive_of_camera_and_phone_photos_succeeds_item_by_item(
    deployment, camera_jpeg, phone_and_print
):
    members = {
        "DCIM/IMG_0001.JPG": camera_jpeg,
        **{f"DCIM/{k}": v for k, v in phone_and_print.items()},
    }
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    assert buffer.tell() > LIMIT_BYTES  # larger than one image upload may be: archives stream
    response = requests.post(
        f"{deployment.api}/batches",
        files={"archive": ("holiday.zip", buffer.getvalue())},
        timeout=120,
    )
    assert response.status_code == 202, response.text
    doc = wait_for_batch(deployment.api, response.json()["id"], timeout_s=300)
    assert doc["status"] == "succeeded", doc
    assert doc["counts"]["succeeded"] == len(members) and doc["counts"]["failed"] == 0, doc
