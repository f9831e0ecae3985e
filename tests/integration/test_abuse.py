"""Bad input and abuse over HTTP against a real deployment (gunicorn API, Celery worker,
Redis, S3): every row answers with its documented status and code, nothing is stored for a
refused request, and the worker never sees it. Rows already covered by test_service.py
(missing field, empty file, text/script/PDF named .jpg, truncated JPEG, pixel bomb, body
over the limit with and without Content-Length, unknown job, other token's job, bad token)
are not repeated here, nor are the archive attacks of test_batches.py (path traversal,
absolute paths, symlinks, nested archives, member/byte/ratio limits)."""

from __future__ import annotations

import io
import socket
import struct
import tarfile
import zipfile
import zlib
from urllib.parse import urlsplit

import pytest
import requests

from shared import imaging
from shared.errors import UnsupportedType
from tests.helpers import png, submit_archive, wait_for_batch, wait_for_job, worker_caught_up
from tests.integration.deployment import Deployment

MAX_UPLOAD_MB = 1
MAX_PIXELS = 1_000_000
MAX_FORM_PARTS = 12
RATE_LIMIT = 6
ALICE = {"Authorization": "Bearer alice-token"}
BOB = {"Authorization": "Bearer bob-token"}


def _png_header_only(width: int, height: int) -> bytes:
    """A PNG that declares width×height but carries almost no pixel data."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 64))
        + chunk(b"IEND", b"")
    )


def _gif_header_only(width: int, height: int) -> bytes:
    screen = struct.pack("<HHBBB", width, height, 0, 0, 0)
    image = b"\x2c" + struct.pack("<HHHHB", 0, 0, width, height, 0)
    return b"GIF89a" + screen + image + b"\x02\x02\x44\x01\x00\x3b"


# Formats we do not accept, with real magic bytes, so a generic decoder *could* parse them.
FOREIGN_FORMATS = {
    "psd": b"8BPS\x00\x01" + b"\x00" * 6 + b"\x00\x03\x00\x00\x00\x10\x00\x00\x00\x10\x00\x08",
    "eps": b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\nshowpage\n",
    "eps-binary": b"\xc5\xd0\xd3\xc6" + b"\x20\x00\x00\x00" + b"\x00" * 24,
    "fits": b"SIMPLE  =                    T" + b" " * 50 + b"BITPIX  =                    8",
    "pdf": b"%PDF-1.4\n1 0 obj<<>>endobj\ntrailer<<>>\n%%EOF\n",
    "svg": b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
    "ico": b"\x00\x00\x01\x00\x01\x00\x10\x10\x00\x00\x01\x00\x20\x00" + b"\x00" * 32,
    "html": b"<!doctype html><script>alert(1)</script>",
    "elf": b"\x7fELF\x02\x01\x01" + b"\x00" * 57,
    "zip": b"PK\x03\x04" + b"\x00" * 26,
}


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("abuse"),
        redis_server,
        s3_server,
        name="abuse",
        db=5,
        max_upload_mb=MAX_UPLOAD_MB,
        max_image_pixels=MAX_PIXELS,
        max_form_parts=MAX_FORM_PARTS,
        api_tokens="alice-token,bob-token",
        # Tests here look at the input keys jobs and batches leave behind.
        keep_inputs="true",
    ) as dep:
        dep.limited_api = dep.start_api("api-limited", rate_limit_per_minute=RATE_LIMIT)
        yield dep


@pytest.fixture(scope="module")
def store(deployment):
    return deployment.object_store()


@pytest.fixture
def nothing_created(deployment, store):
    """Asserts, after the test, that no object and no job record appeared."""
    keys_before = set(store.list_keys(""))
    jobs_before = set(deployment.redis.scan_iter("featuremaps:job:*"))
    yield
    assert set(store.list_keys("")) == keys_before
    assert set(deployment.redis.scan_iter("featuremaps:job:*")) == jobs_before


def _post(api, files, data=None, headers=ALICE, **kwargs):
    return requests.post(
        f"{api}/jobs", files=files, data=data, headers=headers, timeout=30, **kwargs
    )


def _error(response, status: int) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["Content-Type"].startswith("application/json")
    error = response.json()["error"]
    assert error["code"] and error["message"]
    return error


# --- type, size and structure of the upload ------------------------------------------------


@pytest.mark.parametrize("kind", sorted(FOREIGN_FORMATS))
def test_foreign_formats_are_415_without_reaching_a_decoder(
    deployment, nothing_created, monkeypatch, kind
):
    data = FOREIGN_FORMATS[kind]
    response = _post(deployment.api, {"image": ("photo.jpg", data, "image/jpeg")})
    assert _error(response, 415)["code"] == "unsupported_type"

    # The same bytes in-process: refused from the magic bytes, Pillow never opens them.
    def no_decoder(*_args, **_kwargs):
        raise AssertionError(f"a decoder was reached for {kind}")

    monkeypatch.setattr(imaging.Image, "open", no_decoder)
    with pytest.raises(UnsupportedType):
        imaging.validate_image(data, max_pixels=MAX_PIXELS)


def test_too_many_form_parts_is_413(deployment, nothing_created):
    fields = {f"f{i}": "x" for i in range(MAX_FORM_PARTS + 5)}
    response = _post(deployment.api, {"image": ("a.png", png())}, data=fields)
    assert _error(response, 413)["code"] == "too_large"


def test_an_oversized_form_field_is_413(deployment, nothing_created):
    response = _post(deployment.api, {"image": ("a.png", png())}, data={"mode": "chain" * 40_000})
    assert _error(response, 413)["code"] == "too_large"


def test_declared_content_length_over_the_limit_is_413_before_the_body(deployment):
    """The server answers from the header alone; it does not wait for a gigabyte."""
    url = urlsplit(deployment.api)
    head = (
        f"POST /jobs HTTP/1.1\r\nHost: {url.netloc}\r\n"
        f"Authorization: Bearer alice-token\r\n"
        f"Content-Type: multipart/form-data; boundary=xyz\r\n"
        f"Content-Length: {10**9}\r\nConnection: close\r\n\r\n"
    )
    with socket.create_connection((url.hostname, url.port), timeout=30) as sock:
        sock.sendall(head.encode() + b"--xyz\r\n")
        answer = b""
        while b"\r\n\r\n" not in answer:
            chunk = sock.recv(4096)
            if not chunk:
                break
            answer += chunk
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]


def test_not_multipart_is_400(deployment, nothing_created):
    for kwargs in ({"json": {"image": "aGVsbG8="}}, {"data": b"\xff\xd8\xff raw bytes"}):
        response = requests.post(f"{deployment.api}/jobs", headers=ALICE, timeout=30, **kwargs)
        assert _error(response, 400)["code"] == "missing_field"


@pytest.mark.parametrize(
    "data, code",
    [
        (_png_header_only(100_000, 100_000), "too_many_pixels"),
        (_png_header_only(2**31 - 1, 2**31 - 1), "too_many_pixels"),
        (_gif_header_only(65_535, 65_535), "too_many_pixels"),
        (_png_header_only(0, 10), "undecodable_image"),
        (png()[:60], "truncated_image"),
        (png()[:8] + b"\x00" * 200, "undecodable_image"),
    ],
    ids=["png-10g-pixels", "png-max-dims", "gif-4g-pixels", "png-zero-width", "png-cut", "junk"],
)
def test_bombs_and_broken_images_are_422(deployment, nothing_created, data, code):
    assert _error(_post(deployment.api, {"image": ("a.png", data)}), 422)["code"] == code


@pytest.mark.parametrize(
    "form",
    [
        {"format": "gif"},
        {"format": "JPG "},
        {"colormap": "not-a-colormap"},
        {"reduction": ""},
        {"normalize": "imagenet\x00"},
        {"mode": "chain; rm -rf /"},
        {"renderer": "opengl"},
        {"per_layer": "maybe"},
        {"arrays": "2"},
        {"mode": "ｃｈａｉｎ"},
        {"layers": "999"},
        {"image_url": "http://169.254.169.254/"},
    ],
    ids=lambda form: next(iter(form)),
)
def test_options_out_of_range_are_400(deployment, nothing_created, form):
    error = _error(_post(deployment.api, {"image": ("a.png", png())}, data=form), 400)
    assert error["code"] == "invalid_option"


def test_client_file_name_is_never_used_as_a_key(deployment, store):
    response = _post(deployment.api, {"image": ("../../../etc/passwd.png", png())})
    assert response.status_code == 202, response.text
    job_id = response.json()["id"]
    assert wait_for_job(deployment.api, job_id, headers=ALICE)["status"] == "succeeded"
    # KEEP_INPUTS=true: the input outlives its job, after the point where it would be deleted.
    worker_caught_up(deployment.api, headers=ALICE)
    assert list(store.list_keys(f"inputs/{job_id}/")) == [f"inputs/{job_id}/0.png"]
    # The record as created goes when the job ends, inputs kept or not (keeper/restore.py).
    assert not list(store.list_keys(f"accepted/jobs/{job_id}"))
    assert not [k for k in store.list_keys("") if "passwd" in k or ".." in k]


# --- who may call -------------------------------------------------------------------------


@pytest.mark.parametrize(
    "header",
    ["", "Bearer", "Bearer ", "Basic YWxpY2U6dG9rZW4=", "bearer alice-token-x", "alice-token"],
)
def test_malformed_or_wrong_authorization_is_401(deployment, nothing_created, header):
    headers = {"Authorization": header} if header else {}
    response = _post(deployment.api, {"image": ("a.png", png())}, headers=headers)
    assert _error(response, 401)["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")


@pytest.mark.parametrize(
    "job_id", ["..%2F..%2Fetc%2Fpasswd", "a" * 65, "x" * 3000, "%00", "job:1", "*"]
)
def test_odd_job_ids_are_404(deployment, job_id):
    for method in ("GET", "DELETE"):
        response = requests.request(
            method, f"{deployment.api}/jobs/{job_id}", headers=ALICE, timeout=30
        )
        assert _error(response, 404)["code"] == "not_found"


def test_wrong_method_is_405_json(deployment):
    response = requests.put(f"{deployment.api}/jobs", headers=ALICE, timeout=30)
    assert _error(response, 405)["code"] == "method_not_allowed"
    assert {m.strip() for m in response.headers["Allow"].split(",")} == {"POST", "OPTIONS"}


# --- rate limiting ------------------------------------------------------------------------


def test_rate_limit_is_per_token_with_retry_after_and_workers_unaffected(deployment, store):
    api = deployment.limited_api
    answers = []
    # A fixed one-minute window: 2·limit+1 requests span at most two windows, so at least
    # one window sees more than the limit whenever the burst starts.
    for i in range(2 * RATE_LIMIT + 1):
        answers.append(_post(api, {"image": ("a.png", png(color=(i, 1, 1)))}))
    statuses = [r.status_code for r in answers]
    assert set(statuses) == {202, 429}, statuses
    limited = [r for r in answers if r.status_code == 429]
    for response in limited:
        assert _error(response, 429)["code"] == "rate_limited"
        assert 1 <= int(response.headers["Retry-After"]) <= 60

    # Bob has his own budget: Alice's burst does not limit him.
    assert requests.get(f"{api}/jobs/unknown", headers=BOB, timeout=30).status_code == 404

    # Every accepted job runs; refused ones created nothing.
    accepted = [r.json()["id"] for r in answers if r.status_code == 202]
    for job_id in accepted:
        assert wait_for_job(deployment.api, job_id, headers=ALICE)["status"] == "succeeded"
    owned = {
        key.decode().rsplit(":", 1)[1] for key in deployment.redis.scan_iter("featuremaps:job:*")
    }
    assert set(accepted) <= owned
    assert len(accepted) == statuses.count(202)
    ready = requests.get(f"{deployment.api}/readyz", timeout=30).json()
    assert ready["checks"]["workers"]["count"] >= 1


# --- archives (rows not in test_batches.py: links, devices, encryption, CRC, truncation) ------


def _tar(members: list[tuple[tarfile.TarInfo, bytes]]) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w:gz") as archive:
        for info, data in members:
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data) if data else None)
    return buf.getvalue()


def _tar_member(name: str, kind: bytes = tarfile.REGTYPE, **fields) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = kind
    for key, value in fields.items():
        setattr(info, key, value)
    return info


def _zip_with_bad_members() -> bytes:
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as archive:
        archive.writestr("ok.png", png())
        archive.writestr("secret.png", png(color=(1, 1, 1)))
        archive.writestr("crc.png", png(color=(2, 2, 2)))
    data = bytearray(buf.getvalue())
    # zipfile cannot write encrypted members: set the "encrypted" flag bit of secret.png in
    # its local header and its central directory entry.
    for signature, flag_offset in ((b"PK\x03\x04", 6), (b"PK\x01\x02", 8)):
        at = _header_of(data, signature, b"secret.png")
        data[at + flag_offset] |= 0x01
    # Flip a byte inside crc.png's stored data: its CRC no longer matches.
    at = data.rfind(b"IDAT") + 8
    data[at] ^= 0xFF
    return bytes(data)


def _header_of(data: bytearray, signature: bytes, name: bytes) -> int:
    """Offset of the zip header with ``signature`` whose file name is ``name``."""
    name_offset = 30 if signature == b"PK\x03\x04" else 46
    at = data.find(signature)
    while data[at + name_offset : at + name_offset + len(name)] != name:
        at = data.find(signature, at + 1)
        assert at >= 0, f"no {signature!r} header for {name!r}"
    return at


def _item_codes(api: str, batch_id: str) -> dict[str, str | None]:
    page = requests.get(
        f"{api}/batches/{batch_id}/items", params={"limit": 100}, headers=ALICE, timeout=30
    ).json()
    return {item["name"]: (item["error"] or {}).get("code") for item in page["items"]}


@pytest.mark.parametrize("kind", ["tar-links-and-devices", "zip-encrypted-and-bad-crc"])
def test_archive_members_that_must_never_be_read_fail_alone(deployment, store, kind):
    if kind == "tar-links-and-devices":
        data = _tar(
            [
                (_tar_member("ok.png"), png()),
                # A hard link to an earlier member runs on that member's bytes (no copy);
                # one that leaves the archive, or names nothing before it, is refused.
                (_tar_member("hard.png", tarfile.LNKTYPE, linkname="ok.png"), b""),
                (_tar_member("out.png", tarfile.LNKTYPE, linkname="../../etc/passwd"), b""),
                (_tar_member("ahead.png", tarfile.LNKTYPE, linkname="later.png"), b""),
                (_tar_member("dev", tarfile.CHRTYPE, devmajor=1, devminor=3), b""),
                (_tar_member("fifo", tarfile.FIFOTYPE), b""),
            ]
        )
        name = "a.tar.gz"
        good = {"ok.png": None, "hard.png": None}
        expected = {
            "out.png": "hardlink",
            "ahead.png": "hardlink",
            "dev": "special_file",
            "fifo": "special_file",
        }
    else:
        data, name = _zip_with_bad_members(), "a.zip"
        good = {"ok.png": None}
        expected = {"secret.png": "encrypted", "crc.png": "corrupt_member"}
    response = submit_archive(deployment.api, name, data, headers=ALICE)
    assert response.status_code == 202, response.text
    batch_id = response.json()["id"]
    doc = wait_for_batch(deployment.api, batch_id, headers=ALICE)
    assert doc["status"] == "succeeded", doc
    assert _item_codes(deployment.api, batch_id) == {**good, **expected}
    assert doc["counts"]["succeeded"] == len(good)
    assert doc["counts"]["failed"] == len(expected)
    # Refused members never became inputs: the batch's one input pack holds the good image
    # alone; nothing was written outside the batch's keys.
    (pack,) = store.list_keys(f"batches/{batch_id}/inputs/")
    assert store.get_bytes(pack) == png()
    assert not [k for k in store.list_keys("") if "passwd" in k or "/dev" in k]


def test_truncated_archive_fails_the_batch_as_corrupt(deployment):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        for i in range(4):
            archive.writestr(f"{i}.png", png(color=(i, i, i)))
    data = buf.getvalue()[: len(buf.getvalue()) // 2]
    # It starts like a zip, so it is accepted and stored; reading it ends the batch.
    response = submit_archive(deployment.api, "a.zip", data, headers=ALICE)
    assert response.status_code == 202, response.text
    doc = wait_for_batch(deployment.api, response.json()["id"], headers=ALICE)
    assert doc["status"] == "failed" and doc["error"]["code"] == "corrupt_archive", doc
    assert doc["counts"]["total"] == 0
