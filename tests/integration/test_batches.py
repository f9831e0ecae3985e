"""Batches end to end: archives and S3 prefixes through gunicorn, real Celery workers on a real
redis-server, and a real S3 server; the archives hold planted hostile members."""

from __future__ import annotations

import io
import json
import random
import tarfile
import time
import uuid
import zipfile
from pathlib import Path

import numpy as np
import pytest
import requests
from PIL import Image, ImageDraw

from shared.storage import ObjectStore
from stack.services import wait_until
from tests.archive_makers import (
    GBK_NAME,
    NAME,
    finder_zip,
    gnu_tar,
    info_zip,
    photo_folder,
    windows_gbk_zip,
)
from tests.helpers import png, submit_archive, wait_for_batch, wait_for_job, worker_caught_up
from tests.integration.deployment import Deployment

# The colour of this module's generated images.
DARK = (10, 20, 30)

CHUNK = 4
MAX_MEMBERS = 80
MAX_BYTES = 70_000_000
MAX_MEMBER_BYTES = 4_000_000
MAX_PIXELS = 1_000_000
# The one bucket prefix this deployment lets batches read (FEATUREMAPS_SOURCE_ALLOW).
SOURCE_BUCKET = f"src-{uuid.uuid4().hex[:8]}"


def photo(seed: int, size: tuple[int, int] = (64, 48)) -> bytes:
    """A small photo-like JPEG: a gradient, a few shapes and noise."""
    rng = np.random.default_rng(seed)
    width, height = size
    x = np.linspace(0, 1, width)[None, :, None]
    y = np.linspace(0, 1, height)[:, None, None]
    base = (x * rng.uniform(50, 200, 3) + y * rng.uniform(50, 200, 3)) % 256
    pixels = np.clip(base + rng.normal(0, 12, (height, width, 3)), 0, 255).astype(np.uint8)
    image = Image.fromarray(pixels)
    draw = ImageDraw.Draw(image)
    for _ in range(3):
        x0, y0 = rng.integers(0, width // 2), rng.integers(0, height // 2)
        draw.ellipse(
            (x0, y0, x0 + width // 3, y0 + height // 3), fill=tuple(rng.integers(0, 255, 3))
        )
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", quality=85)
    return buffer.getvalue()


def _inner_zip() -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("inside.jpg", photo(999))
    return buffer.getvalue()


# name -> (bytes, expected failure code); written into zips and tars alike.
BAD_FILES = {
    "bad/truncated.jpg": (photo(1, (320, 240))[:1500], "truncated_image"),
    "bad/notes.jpg": (b"this is a text file, not a photo\n", "unsupported_type"),
    "bad/empty.jpg": (b"", "empty_image"),
    "bad/bomb.png": (png((1200, 1000), DARK), "too_many_pixels"),
    "../escape.jpg": (photo(2), "path_traversal"),
    "/etc/abs.jpg": (photo(3), "absolute_path"),
    "bad/nested.zip": (_inner_zip(), "nested_archive"),
}
SYMLINK = ("bad/link.jpg", "symlink")
# The bad members that still look like images (they fail in the model pass, not before).
IMAGE_BAD = ("bad/truncated.jpg", "bad/bomb.png")


def make_zip(goods: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in goods.items():
            archive.writestr(name, data)
        for name, (data, _code) in BAD_FILES.items():
            archive.writestr(name, data)
        link = zipfile.ZipInfo(SYMLINK[0])
        link.create_system = 3
        link.external_attr = 0o120777 << 16
        archive.writestr(link, "../../etc/passwd")
    return buffer.getvalue()


def make_tar(goods: dict[str, bytes], mode: str = "w:gz") -> bytes:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        for name, data in [*goods.items(), *((n, d) for n, (d, _c) in BAD_FILES.items())]:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo(SYMLINK[0])
        link.type = tarfile.SYMTYPE
        link.linkname = "/etc/passwd"
        archive.addfile(link)
    return buffer.getvalue()


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("batches"),
        redis_server,
        s3_server,
        name="bat",
        db=4,
        worker="b1",
        batch_chunk=CHUNK,
        max_archive_members=MAX_MEMBERS,
        max_archive_bytes=MAX_BYTES,
        max_archive_member_bytes=MAX_MEMBER_BYTES,
        max_image_pixels=MAX_PIXELS,
        source_allow=f"s3://{SOURCE_BUCKET}/incoming/",
        # These tests look at the inputs a finished batch leaves (KEEP_INPUTS=false, the
        # default, is tested in test_security.py).
        keep_inputs="true",
    ) as dep:
        yield dep


@pytest.fixture(scope="module")
def store(deployment):
    return deployment.object_store()


def all_items(api: str, batch_id: str, limit: int = 7) -> list[dict]:
    items, cursor = [], "0"
    while cursor is not None:
        page = requests.get(
            f"{api}/batches/{batch_id}/items", params={"cursor": cursor, "limit": limit}, timeout=10
        ).json()
        items += page["items"]
        cursor = page["next_cursor"]
    return items


def goods(count: int, seed: int = 0) -> dict[str, bytes]:
    return {f"photos/img_{i:03d}.jpg": photo(seed + i) for i in range(count)}


@pytest.mark.parametrize("kind", ["zip", "tar.gz"])
def test_archive_with_planted_bad_members(deployment, store, kind):
    good = goods(20 if kind == "zip" else 10)
    data = make_zip(good) if kind == "zip" else make_tar(good)
    response = submit_archive(deployment.api, f"photos.{kind}", data)
    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]
    assert response.headers["Location"] == f"/batches/{batch_id}"

    doc = wait_for_batch(deployment.api, batch_id)
    # Past the point where the closer deletes inputs unless KEEP_INPUTS (checked below).
    worker_caught_up(deployment.api)
    expected_bad = {name: code for name, (_d, code) in BAD_FILES.items()}
    expected_bad[SYMLINK[0]] = SYMLINK[1]
    members = len(good) + len(expected_bad)
    assert doc["status"] == "succeeded", doc
    assert doc["counts"] == {
        "total": members,
        "queued": 0,
        "running": 0,
        "succeeded": len(good),
        "failed": len(expected_bad),
        "canceled": 0,
        "skipped": 0,
    }
    assert doc["progress"] == 1.0

    items = all_items(deployment.api, batch_id)
    assert len(items) == members
    by_name = {item["name"]: item for item in items}
    for name in good:
        assert by_name[name]["status"] == "succeeded", by_name[name]
        figure = requests.get(by_name[name]["figure_url"], timeout=10)
        assert Image.open(io.BytesIO(figure.content)).format == "JPEG"
    for name, code in expected_bad.items():
        assert by_name[name]["status"] == "failed"
        assert by_name[name]["error"]["code"] == code, by_name[name]
        assert by_name[name]["figure_url"] is None

    manifest = requests.get(doc["result"]["manifest_url"], timeout=10).text.splitlines()
    lines = [json.loads(line) for line in manifest]
    assert len(lines) == members and len({line["item_id"] for line in lines}) == members
    assert {line["name"] for line in lines} == set(by_name)
    assert all(
        line["error"]["code"] == expected_bad[line["name"]]
        for line in lines
        if line["status"] == "failed"
    )

    bundle = zipfile.ZipFile(
        io.BytesIO(requests.get(doc["result"]["archive_url"], timeout=10).content)
    )
    assert sorted(bundle.namelist()) == sorted(f"figures/{name}.jpg" for name in good)

    # Nothing outside the batch's own keys: its source, results and the items' keys.
    outside = [
        key
        for key in store.list_keys("")
        if not key.startswith(
            (f"batches/{batch_id}/", f"inputs/{batch_id}-", f"results/{batch_id}-")
        )
        and batch_id in key
    ]
    assert outside == []
    mine = [key for key in store.list_keys("") if batch_id in key]
    assert all(
        key.startswith((f"batches/{batch_id}/", f"inputs/{batch_id}-", f"results/{batch_id}-"))
        for key in mine
    )
    for name in ("escape", "abs.jpg", "link", "nested", "passwd", "inside"):
        assert not [key for key in store.list_keys("") if name in key]
    # Inputs are one pack per block of 128 members, none of them under inputs/.
    packs = [key for key in mine if key.startswith(f"batches/{batch_id}/inputs/")]
    assert packs == [f"batches/{batch_id}/inputs/000000.pack"]
    assert not [key for key in mine if key.startswith("inputs/")]
    # Only members that look like images are in it: the good ones and the bad images.
    packed = [*good.values(), *(BAD_FILES[name][0] for name in IMAGE_BAD)]
    assert store.size(packs[0]) == sum(len(data) for data in packed)
    # KEEP_INPUTS=true: the uploaded archive stays after finalisation too.
    assert [key for key in mine if key.startswith(f"batches/{batch_id}/source.")]


def test_non_archive_and_missing_field_are_refused(deployment, store):
    before = set(store.list_keys(""))
    response = submit_archive(deployment.api, "photos.zip", photo(5))
    assert response.status_code == 415 and response.json()["error"]["code"] == "unsupported_type"
    response = requests.post(
        f"{deployment.api}/batches", files={"photos": ("a.zip", b"PK")}, timeout=10
    )
    assert response.status_code == 400 and response.json()["error"]["code"] == "missing_field"
    response = submit_archive(deployment.api, "a.zip", make_zip(goods(1)), mode="sideways")
    assert response.status_code == 400 and response.json()["error"]["code"] == "invalid_option"
    assert set(store.list_keys("")) == before
    assert requests.get(f"{deployment.api}/batches/nope", timeout=10).status_code == 404


def _noise(size: int, seed: int) -> bytes:
    return random.Random(seed).randbytes(size)


def _low_entropy(size: int, seed: int) -> bytes:
    """Bytes that gzip shrinks about twofold: under the ratio limit, over the byte limit."""
    return np.random.default_rng(seed).integers(0, 16, size, dtype=np.uint8).tobytes()


LIMIT_CASES = {
    "too many members": (
        lambda: make_zip({f"{i}.jpg": photo(i) for i in range(MAX_MEMBERS)}),
        "archive_too_many_members",
    ),
    "too many bytes": (
        lambda: make_tar({f"big{i}.bin": _low_entropy(3_500_000, i) for i in range(21)}),
        "archive_too_large",
    ),
    "zip bomb": (
        lambda: make_zip({"zeros.bmp": b"\0" * 3_900_000}),
        "archive_bomb",
    ),
}


@pytest.mark.parametrize("case", list(LIMIT_CASES))
def test_limits_fail_the_batch_with_a_clear_code(deployment, case):
    build, code = LIMIT_CASES[case]
    data = build()
    name = "a.tar.gz" if data[:2] == b"\x1f\x8b" else "a.zip"
    response = submit_archive(deployment.api, name, data)
    assert response.status_code == 202, response.text
    doc = wait_for_batch(deployment.api, response.json()["id"])
    assert doc["status"] == "failed"
    assert doc["error"]["code"] == code, doc["error"]
    counts = doc["counts"]
    assert counts["queued"] == counts["running"] == 0
    assert counts["total"] == counts["succeeded"] + counts["failed"] + counts["canceled"]


def test_upload_is_streamed_not_held_in_memory(deployment, store):
    # Stored (uncompressed) noise members: a 64 MB archive, 900× the form memory limit. The
    # upload path holds a few 5 MiB multipart parts at a time (~20 MB), whatever the size.
    members = {f"noise/{i:02d}.bin": _noise(2_000_000, 100 + i) for i in range(32)}
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_STORED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    data = buffer.getvalue()
    peaks_before = _api_peak_rss(deployment)
    response = submit_archive(deployment.api, "noise.zip", data)
    assert response.status_code == 202, response.text
    growth = max(_api_peak_rss(deployment)[pid] - peak for pid, peak in peaks_before.items())
    assert growth < len(data) // 2, f"an API process grew by {growth} bytes for {len(data)}"
    batch_id = response.json()["id"]
    with store.open(f"batches/{batch_id}/source.zip") as reader:
        assert reader.read() == data
    doc = wait_for_batch(deployment.api, batch_id)
    assert doc["status"] == "succeeded" and doc["counts"]["failed"] == 32


def _api_peak_rss(deployment) -> dict[int, int]:
    """Peak resident memory (VmHWM) of each gunicorn worker process of the API."""
    (api,) = [p for p in deployment.processes if p.name == "api"]
    peaks = {}
    for child in Path(f"/proc/{api.pid}/task/{api.pid}/children").read_text().split():
        status = Path(f"/proc/{child}/status").read_text()
        (line,) = [line for line in status.splitlines() if line.startswith("VmHWM:")]
        peaks[int(child)] = int(line.split()[1]) * 1024
    return peaks


def test_two_workers_split_one_batch_each_item_once(deployment):
    second = deployment.start_worker("b2")
    first = deployment.workers[0].hostname

    def done() -> dict[str, int]:
        return {w["hostname"]: w["jobs_done"] for w in _live(deployment)}

    before = done()
    try:
        response = submit_archive(deployment.api, "many.zip", make_zip(goods(24, seed=200)))
        doc = wait_for_batch(deployment.api, response.json()["id"])
        # Heartbeats come every few seconds: wait until both workers' count this batch's items.
        wait_until(
            lambda: (
                done().get(second.hostname, 0) > 0 and done().get(first, 0) > before.get(first, 0)
            ),
            timeout_s=30,
            what="both workers' heartbeats to count items of the batch",
        )
    finally:
        second.stop()
    assert doc["status"] == "succeeded"
    assert doc["counts"]["succeeded"] == 24
    items = all_items(deployment.api, doc["id"], limit=100)
    good = [item for item in items if item["status"] == "succeeded"]
    assert len(good) == len({item["id"] for item in good}) == 24


def _live(deployment) -> list[dict]:
    from shared.heartbeat import live_workers

    return live_workers(deployment.redis)


def test_single_job_is_not_stuck_behind_a_big_batch(deployment):
    response = submit_archive(deployment.api, "big.tar.gz", make_tar(goods(32, seed=300)))
    batch_id = response.json()["id"]
    _wait_until(lambda: _doc(deployment, batch_id)["counts"]["succeeded"] >= 1)
    job = requests.post(
        f"{deployment.api}/jobs", files={"image": ("one.jpg", photo(7))}, timeout=30
    ).json()
    job_doc = wait_for_job(deployment.api, job["id"])
    counts_then = _doc(deployment, batch_id)["counts"]
    batch_doc = wait_for_batch(deployment.api, batch_id)
    assert job_doc["status"] == "succeeded"
    assert job_doc["finished_at"] < batch_doc["finished_at"]
    # Long before: the job went ahead of the chunks already waiting, so when it finished
    # most of the batch was still to do.
    assert counts_then["queued"] + counts_then["running"] >= counts_then["total"] // 2, counts_then


def test_cancel_mid_batch(deployment):
    response = submit_archive(deployment.api, "cancel.zip", make_zip(goods(32, seed=400)))
    batch_id = response.json()["id"]
    _wait_until(lambda: _doc(deployment, batch_id)["counts"]["succeeded"] >= 1)
    canceled = requests.delete(f"{deployment.api}/batches/{batch_id}", timeout=10)
    assert canceled.status_code == 202, canceled.text
    assert canceled.json()["status"] == "canceled"
    doc = wait_for_batch(deployment.api, batch_id)
    counts = doc["counts"]
    assert doc["status"] == "canceled"
    assert counts["queued"] == counts["running"] == 0
    assert counts["canceled"] > 0 and counts["succeeded"] >= 1
    assert counts["total"] == counts["succeeded"] + counts["failed"] + counts["canceled"]
    statuses = [item["status"] for item in all_items(deployment.api, batch_id, limit=100)]
    assert statuses.count("canceled") == counts["canceled"]
    again = requests.delete(f"{deployment.api}/batches/{batch_id}", timeout=10)
    assert again.status_code == 409


def test_s3_prefix_source(deployment, store):
    source = ObjectStore(store.client, SOURCE_BUCKET)
    source.ensure_bucket()
    for i in range(6):
        source.put_bytes(f"incoming/set1/{i}.jpg", photo(500 + i), "image/jpeg")
    source.put_bytes("incoming/set1/readme.txt", b"not an image", "text/plain")
    source.put_bytes("incoming/set1/.DS_Store", b"\x00\x00\x00\x01Bud1", "text/plain")
    source.put_bytes("incoming/other/skip.jpg", photo(600), "image/jpeg")
    response = requests.post(
        f"{deployment.api}/batches",
        json={"source": f"s3://{source.bucket}/incoming/set1/", "format": "png"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    doc = wait_for_batch(deployment.api, response.json()["id"])
    assert doc["status"] == "succeeded"
    assert doc["counts"]["succeeded"] == 6 and doc["counts"]["failed"] == 1
    assert doc["counts"]["skipped"] == 1
    names = {item["name"]: item for item in all_items(deployment.api, doc["id"])}
    assert set(names) == {*(f"{i}.jpg" for i in range(6)), "readme.txt", ".DS_Store"}
    assert names["readme.txt"]["error"]["code"] == "unsupported_type"
    assert names[".DS_Store"]["status"] == "skipped" and names[".DS_Store"]["error"] is None
    refused = requests.post(
        f"{deployment.api}/batches",
        json={"source": f"s3://{source.bucket}/incoming/set1/", "archive_encoding": "gbk"},
        timeout=10,
    )
    assert refused.status_code == 400 and "archive_encoding" in refused.text
    figure = requests.get(names["0.jpg"]["figure_url"], timeout=10).content
    assert Image.open(io.BytesIO(figure)).format == "PNG"
    private = requests.post(
        f"{deployment.api}/batches",
        json={"source": f"s3://{deployment.bucket}/results/"},
        timeout=10,
    )
    assert private.status_code == 400


def _doc(deployment, batch_id: str) -> dict:
    return requests.get(f"{deployment.api}/batches/{batch_id}", timeout=10).json()


def _wait_until(check, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.1)


def test_cli_batch_streams_the_archive_waits_and_downloads(deployment, tmp_path, capsys):
    from client.cli import main

    archive = tmp_path / "photos.zip"
    archive.write_bytes(make_zip(goods(6, seed=700)))
    out = tmp_path / "out"
    code = main(["batch", str(archive), "--download", str(out), "--api", deployment.api])
    assert code == 0, capsys.readouterr().err
    lines = (out / "manifest.jsonl").read_text().splitlines()
    assert len(lines) == 6 + len(BAD_FILES) + 1
    figures = sorted(p.relative_to(out / "figures").as_posix() for p in out.rglob("*.jpg"))
    assert figures == sorted(f"photos/img_{i:03d}.jpg.jpg" for i in range(6))
    assert '"succeeded": 6' in capsys.readouterr().out


def test_openapi_and_metrics_know_batches(deployment):
    spec = requests.get(f"{deployment.api}/openapi.json", timeout=10).json()
    assert {"/batches", "/batches/{batch_id}", "/batches/{batch_id}/items"} <= set(spec["paths"])
    metrics = requests.get(f"{deployment.api}/metrics", timeout=10).text
    assert 'featuremaps_queue_depth{queue="batch"}' in metrics


def _people_archive(kind: str, tmp_path: Path) -> tuple[bytes, dict[str, str], dict[str, str]]:
    """(archive bytes, the form fields it needs, what each member name a user sees in their
    file manager becomes: succeeded or skipped)."""
    image = photo(800)
    if kind == "finder":
        apple_double = f"__MACOSX/Fotos/._{NAME.split('/')[1]}"
        expected = {NAME: "succeeded", "Fotos/.DS_Store": "skipped", apple_double: "skipped"}
        return finder_zip(image), {}, expected
    if kind == "windows-gbk":
        expected = {
            GBK_NAME: "succeeded",
            "照片/Thumbs.db": "skipped",
            "照片/desktop.ini": "skipped",
            "照片/新年.jpg": "succeeded",  # named by its Info-ZIP Unicode Path field
        }
        return windows_gbk_zip(image), {"archive_encoding": "gbk"}, expected
    folder = photo_folder(tmp_path / "src", image)
    expected = {NAME: "succeeded", "Fotos/copy.jpg": "succeeded"}
    if kind == "info-zip":
        return info_zip(folder, tmp_path / "photos.zip").read_bytes(), {}, expected
    # GNU tar stores the second name as a hard link to the first.
    return gnu_tar(folder, tmp_path / "photos.tgz", gzip=True).read_bytes(), {}, expected


@pytest.mark.parametrize("kind", ["finder", "windows-gbk", "info-zip", "gnu-tar"])
def test_archives_as_people_make_them(deployment, tmp_path, kind):
    data, fields, expected = _people_archive(kind, tmp_path)
    response = submit_archive(deployment.api, "Fotos.zip", data, **fields)
    assert response.status_code == 202, response.text
    doc = wait_for_batch(deployment.api, response.json()["id"])
    succeeded = [name for name, status in expected.items() if status == "succeeded"]
    skipped = len(expected) - len(succeeded)
    assert doc["status"] == "succeeded", doc
    assert doc["counts"] == {
        "total": len(expected),
        "queued": 0,
        "running": 0,
        "succeeded": len(succeeded),
        "failed": 0,
        "canceled": 0,
        "skipped": skipped,
    }
    assert doc["progress"] == 1.0
    items = {item["name"]: item for item in all_items(deployment.api, doc["id"])}
    assert {name: item["status"] for name, item in items.items()} == expected
    for item in items.values():
        assert item["error"] is None
        if item["status"] == "skipped":
            assert item["skip_reason"]["code"] in ("macos_metadata", "windows_metadata")
            assert item["figure_url"] is None
    manifest = requests.get(doc["result"]["manifest_url"], timeout=10).text.splitlines()
    lines = {line["name"]: line for line in map(json.loads, manifest)}
    assert {name: line["status"] for name, line in lines.items()} == expected
    assert all("error" not in line for line in lines.values())
    bundle = zipfile.ZipFile(
        io.BytesIO(requests.get(doc["result"]["archive_url"], timeout=10).content)
    )
    assert sorted(bundle.namelist()) == sorted(f"figures/{name}.jpg" for name in succeeded)


def test_unknown_archive_encoding_is_refused(deployment):
    response = submit_archive(
        deployment.api, "photos.zip", make_zip(goods(1)), archive_encoding="klingon"
    )
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "invalid_option"
    assert "archive_encoding" in response.json()["error"]["message"]
