"""Fuzzing uploads: seeded, deterministic mutations of real JPEG, PNG, WebP, GIF and TIFF files
(bit flips, truncations, duplicated chunks, corrupted header fields) through upload
validation and the worker's decode and pipeline in-process, and a few hundred through the
real API and worker. No mutant may crash anything or get a 5xx; every refusal is one of the
imaging error codes."""

from __future__ import annotations

import collections
import io
import random
import struct
import zlib
from collections.abc import Iterator

import numpy as np
import pytest
import requests
from PIL import Image

from shared.errors import FeatureMapsError
from shared.heartbeat import live_workers
from shared.imaging import decode_image, validate_image
from shared.options import JobOptions
from tests.helpers import wait_for_job
from tests.integration.deployment import Deployment

IN_PROCESS_MUTANTS = 1250
OVER_HTTP_MUTANTS = 250
PIPELINE_SAMPLE = 128
MAX_PIXELS = 4_000_000
IMAGING_CODES = {
    "empty_image",
    "unsupported_type",
    "too_many_pixels",
    "truncated_image",
    "undecodable_image",
}
HTTP_REFUSALS = {400, 413, 415, 422}


def _seed_files() -> dict[str, bytes]:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 255, (40, 56, 3), dtype=np.uint8)
    pixels[:, :, 0] = np.linspace(0, 255, 56, dtype=np.uint8)
    image = Image.fromarray(pixels)
    variants = {
        "jpeg": (image, "JPEG", {"quality": 80}),
        "jpeg-progressive": (image, "JPEG", {"progressive": True}),
        "png": (image, "PNG", {}),
        "png-palette": (image.convert("P"), "PNG", {}),
        "png-rgba": (image.convert("RGBA"), "PNG", {}),
        "webp": (image, "WEBP", {"quality": 70}),
        "webp-lossless": (image, "WEBP", {"lossless": True}),
        "gif": (image.convert("P"), "GIF", {}),
        "gif-animated": (
            image.convert("P"),
            "GIF",
            {"save_all": True, "append_images": [image.rotate(90).convert("P")]},
        ),
        "tiff": (image, "TIFF", {}),
        "tiff-lzw": (image, "TIFF", {"compression": "tiff_lzw"}),
    }
    files = {}
    for name, (img, fmt, kwargs) in variants.items():
        buf = io.BytesIO()
        img.save(buf, fmt, **kwargs)
        files[name] = buf.getvalue()
    return files


SEEDS = _seed_files()


def _png_chunks(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each chunk after the signature."""
    spans, at = [], 8
    while at + 8 <= len(data):
        length = struct.unpack(">I", data[at : at + 4])[0]
        end = at + 12 + length
        spans.append((at, min(end, len(data))))
        at = end
    return spans


def _with_crc(kind_and_body: bytes) -> bytes:
    return kind_and_body + struct.pack(">I", zlib.crc32(kind_and_body) & 0xFFFFFFFF)


def _corrupt_header_field(data: bytes, rng: random.Random) -> bytes:
    """Put an extreme value into a dimension field, keeping the file otherwise well formed."""
    value = rng.choice([0, 1, 255, 65_535, 2**31 - 1, 2**32 - 1, rng.randrange(2**16)])
    d = bytearray(data)
    if data.startswith(b"\x89PNG"):
        start, _ = _png_chunks(data)[0]  # IHDR
        field = rng.choice([16, 20])  # width, height
        d[start + field - 8 : start + field - 4] = struct.pack(">I", value)
        body = bytes(d[start + 4 : start + 4 + 4 + 13])
        d[start + 4 : start + 4 + 4 + 13 + 4] = _with_crc(body)
    elif data.startswith(b"\xff\xd8"):
        # SOF0/SOF2: marker, length, precision, then height and width.
        at = max(data.find(b"\xff\xc0"), data.find(b"\xff\xc2")) + 5 + rng.choice([0, 2])
        d[at : at + 2] = struct.pack(">H", value & 0xFFFF)
    elif data.startswith(b"GIF"):
        at = 6 + rng.choice([0, 2])  # logical screen width, height
        d[at : at + 2] = struct.pack("<H", value & 0xFFFF)
    elif data.startswith(b"RIFF"):
        d[4:8] = struct.pack("<I", value)
    else:  # TIFF: rewrite the first IFD entry's value
        little = data.startswith(b"II")
        ifd = struct.unpack("<I" if little else ">I", data[4:8])[0]
        entry = ifd + 2 + 12 * rng.randrange(4)
        d[entry + 8 : entry + 12] = struct.pack("<I" if little else ">I", value)
    return bytes(d)


def mutate(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    kind = rng.choice(["flip", "truncate", "duplicate", "header", "field", "zero", "combined"])
    d = bytearray(data)
    if kind in ("flip", "combined"):
        for _ in range(rng.randint(1, 16)):
            i = rng.randrange(len(d))
            d[i] ^= 1 << rng.randrange(8)
    if kind == "truncate":
        d = d[: rng.randrange(1, len(d))]
    if kind in ("duplicate", "combined"):
        if data.startswith(b"\x89PNG") and rng.random() < 0.5:
            start, end = rng.choice(_png_chunks(bytes(d)))
        else:
            start = rng.randrange(len(d))
            end = min(len(d), start + rng.randint(1, 512))
        at = rng.randrange(8, len(d))
        d[at:at] = d[start:end] * rng.randint(1, 4)
    if kind == "header":
        for _ in range(rng.randint(1, 4)):
            d[rng.randrange(min(64, len(d)))] = rng.choice(
                [0, 0xFF, 0x7F, 0x80, rng.randrange(256)]
            )
    if kind == "field":
        d = bytearray(_corrupt_header_field(bytes(d), rng))
    if kind == "zero":
        start = rng.randrange(len(d))
        d[start : start + 64] = bytes(len(d[start : start + 64]))
    return kind, bytes(d)


def mutants(seeds: range) -> Iterator[tuple[str, str, bytes]]:
    names = sorted(SEEDS)
    for n in seeds:
        name = names[n % len(names)]
        kind, data = mutate(SEEDS[name], random.Random(n))
        yield f"{name}#{n}", kind, data


def _classify(data: bytes) -> str:
    """'ok' or the error code; anything other than our errors propagates (a crash)."""
    try:
        validate_image(data, max_pixels=MAX_PIXELS)
    except FeatureMapsError as exc:
        return exc.code
    return "ok"


@pytest.fixture(scope="module")
def validated() -> dict[str, bytes]:
    """Every in-process mutant's outcome is checked here; those that validate are returned."""
    outcomes: collections.Counter[str] = collections.Counter()
    per_format: collections.Counter[str] = collections.Counter()
    accepted: dict[str, bytes] = {}
    for name, _kind, data in mutants(range(IN_PROCESS_MUTANTS)):
        per_format[name.split("-")[0].split("#")[0]] += 1
        outcome = _classify(data)
        outcomes[outcome] += 1
        if outcome == "ok":
            accepted[name] = data
    return {"outcomes": outcomes, "per_format": per_format, "accepted": accepted}


def test_validation_refuses_every_mutant_with_a_known_code_or_accepts_it(validated):
    outcomes, per_format = validated["outcomes"], validated["per_format"]
    assert sum(outcomes.values()) == IN_PROCESS_MUTANTS
    assert set(outcomes) <= {"ok"} | IMAGING_CODES, outcomes
    assert set(per_format) == {"jpeg", "png", "webp", "gif", "tiff"}
    assert min(per_format.values()) >= 200, per_format
    # The mutations are not all trivially refused or trivially harmless.
    assert outcomes["ok"] >= 100 and sum(outcomes.values()) - outcomes["ok"] >= 500, outcomes


def test_worker_decode_and_pipeline_handle_the_mutants_that_validate(validated):
    from worker.compute.model import load_model
    from worker.compute.pipeline import process_images

    loaded = load_model("random", device="cpu")
    accepted = list(validated["accepted"].items())
    for _name, data in accepted:
        image = decode_image(data, max_pixels=MAX_PIXELS)
        assert image.mode == "RGB" and image.width > 0 and image.height > 0
    # The model pass and rendering for an evenly spread sample (the API test sends many
    # more through the real worker); the odd geometries that header mutations create
    # (1-pixel-wide, 65535-long) are all kept.
    odd = [item for item in accepted if min(Image.open(io.BytesIO(item[1])).size) < 8]
    accepted = accepted[:: max(1, len(accepted) // PIPELINE_SAMPLE)] + odd
    results = []
    for start in range(0, len(accepted), 32):
        chunk = [data for _, data in accepted[start : start + 32]]
        results += process_images(loaded, chunk, JobOptions(), max_pixels=MAX_PIXELS)
    for (name, _), result in zip(accepted, results, strict=True):
        if isinstance(result, FeatureMapsError):
            assert result.code in IMAGING_CODES, (name, result)
        else:
            assert len(result.layers) == 17 and result.figure, name


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("fuzz"),
        redis_server,
        s3_server,
        name="fuzz",
        db=6,
        max_image_pixels=MAX_PIXELS,
    ) as dep:
        yield dep


def test_api_and_worker_answer_every_mutant_without_5xx_or_crash(deployment):
    (beat,) = live_workers(deployment.redis)
    accepted, statuses = [], collections.Counter()
    for name, _kind, data in mutants(range(100_000, 100_000 + OVER_HTTP_MUTANTS)):
        ext = name.split("#")[0].split("-")[0]
        response = requests.post(
            f"{deployment.api}/jobs", files={"image": (f"m.{ext}", data)}, timeout=30
        )
        statuses[response.status_code] += 1
        if response.status_code == 202:
            accepted.append(response.json()["id"])
            continue
        assert response.status_code in HTTP_REFUSALS, (name, response.status_code, response.text)
        assert response.json()["error"]["code"] in IMAGING_CODES, (name, response.text)
    assert statuses[202] >= 20 and sum(statuses.values()) - statuses[202] >= 100, statuses

    # What validation accepts, the worker decodes and renders: every accepted job succeeds.
    for job_id in accepted:
        doc = wait_for_job(deployment.api, job_id, timeout_s=300)
        assert doc["status"] == "succeeded", doc
    # The same pool process did every job: it never died and was never replaced.
    (after,) = live_workers(deployment.redis)
    assert after["pid"] == beat["pid"] and after["model_loads"] == 1
