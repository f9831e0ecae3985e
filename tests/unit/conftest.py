"""Fixtures for the core pipeline's unit tests: generated photos in every accepted format,
the real sample photo matplotlib ships, hostile and broken inputs, and one seeded random
ResNet-18 shared by the whole session (no downloads, no network)."""

from __future__ import annotations

import io
import struct
import zlib
from pathlib import Path

import matplotlib
import numpy as np
import pillow_heif
import pytest
from PIL import Image

ACCEPTED = {
    "jpg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "bmp": "BMP",
    "gif": "GIF",
    "tiff": "TIFF",
    "heic": "HEIF",
    "avif": "AVIF",
}
PHOTO_SIZE = (160, 120)

# Fixtures are encoded as HEIC through Pillow, which needs the plugin (shared.imaging
# registers it too; registering twice is harmless).
pillow_heif.register_heif_opener()


def encode(image: Image.Image, pil_format: str, **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, pil_format, **options)
    return buffer.getvalue()


def gradient_photo(size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    width, height = size
    x = np.linspace(0, 255, width)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height)[:, None].repeat(width, 1)
    rgb = np.stack([x, y, 255 - x], axis=-1).astype(np.uint8)
    return Image.fromarray(rgb)


def shapes_photo(size: tuple[int, int] = PHOTO_SIZE) -> Image.Image:
    from PIL import ImageDraw

    image = Image.new("RGB", size, (30, 60, 90))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 70, 70), fill=(240, 200, 40))
    draw.rectangle((80, 30, 150, 100), fill=(200, 30, 60))
    draw.line((0, 119, 159, 0), fill=(255, 255, 255), width=5)
    return image


def noise_photo(size: tuple[int, int] = PHOTO_SIZE, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8))


def _png_chunk(kind: bytes, body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


def _png(ihdr: bytes, idat: bytes) -> bytes:
    chunks = _png_chunk(b"IHDR", ihdr) + _png_chunk(b"IDAT", idat) + _png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + chunks


def png_header_only(width: int, height: int) -> bytes:
    """A valid PNG signature and IHDR declaring ``width``×``height``, one empty IDAT: costs
    nothing to build, and a decoder that trusted it would allocate width×height×3 bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return _png(ihdr, zlib.compress(b"\x00" * 64))


def png16(samples: np.ndarray) -> bytes:
    """A 16-bit-per-sample PNG of ``samples`` (H×W×3 for 48-bit RGB, H×W×4 for RGBA), which
    Pillow can read but not write."""
    height, width, channels = samples.shape
    color_type = {3: 2, 4: 6}[channels]
    rows = samples.astype(">u2").reshape(height, width * channels)
    raw = b"".join(b"\x00" + row.tobytes() for row in rows)
    ihdr = struct.pack(">IIBBBBB", width, height, 16, color_type, 0, 0, 0)
    return _png(ihdr, zlib.compress(raw))


@pytest.fixture(scope="session")
def grace_hopper_path() -> Path:
    return Path(matplotlib.get_data_path()) / "sample_data" / "grace_hopper.jpg"


@pytest.fixture(scope="session")
def grace_hopper(grace_hopper_path: Path) -> bytes:
    return grace_hopper_path.read_bytes()


@pytest.fixture(scope="session")
def photos() -> dict[tuple[str, str], bytes]:
    """(kind, ext) -> encoded bytes, for kinds gradient/shapes/noise and every accepted ext."""
    makers = {"gradient": gradient_photo, "shapes": shapes_photo, "noise": noise_photo}
    return {
        (kind, ext): encode(make(), pil_format)
        for kind, make in makers.items()
        for ext, pil_format in ACCEPTED.items()
    }


@pytest.fixture(scope="session")
def bad_inputs(photos) -> dict[str, tuple[bytes, str]]:
    """name -> (bytes, the error code they must give)."""
    jpeg = photos[("noise", "jpg")]
    rng = np.random.default_rng(1)
    return {
        "empty": (b"", "empty_image"),
        "truncated_jpeg": (jpeg[: len(jpeg) // 2], "truncated_image"),
        "truncated_png": (photos[("noise", "png")][:-2000], "truncated_image"),
        "png_magic_garbage": (b"\x89PNG\r\n\x1a\n" + rng.bytes(4000), "undecodable_image"),
        "html_named_jpg": (b"<html><script>alert(1)</script></html>\n", "unsupported_type"),
        "text": (b"just some words, not an image\n", "unsupported_type"),
        "psd": (b"8BPS\x00\x01" + b"\x00" * 64, "unsupported_type"),
        "eps": (b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n", "unsupported_type"),
        "eps_binary": (b"\xc5\xd0\xd3\xc6" + b"\x00" * 64, "unsupported_type"),
        "pdf": (b"%PDF-1.7\n1 0 obj\n<<>>\nendobj\n", "unsupported_type"),
        "fits": (b"SIMPLE  =                    T" + b" " * 50, "unsupported_type"),
        "pixel_bomb": (png_header_only(20000, 20000), "too_many_pixels"),
        # Above Pillow's warning threshold but below its own hard limit: our limit answers.
        "pixel_bomb_warning_zone": (png_header_only(10000, 10000), "too_many_pixels"),
    }


@pytest.fixture(scope="session")
def special_images() -> dict[str, bytes]:
    """Images whose mode or metadata needs care to become a faithful RGB picture."""
    photo = shapes_photo()
    half_transparent = photo.convert("RGBA")
    alpha = np.full((photo.height, photo.width), 255, dtype=np.uint8)
    alpha[:, : photo.width // 2] = 0
    half_transparent.putalpha(Image.fromarray(alpha))
    palette = photo.convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    sixteen = np.tile(np.linspace(0, 65535, 256, dtype=np.uint16), (32, 1))
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    return {
        "cmyk_jpeg": encode(photo.convert("CMYK"), "JPEG"),
        "gray16_png": encode(Image.fromarray(sixteen), "PNG"),
        "gray16_tiff": encode(Image.fromarray(sixteen), "TIFF"),
        "palette_transparent_png": encode(palette, "PNG", transparency=0),
        "rgba_png": encode(half_transparent, "PNG"),
        "la_png": encode(half_transparent.convert("LA"), "PNG"),
        "gray_jpeg": encode(photo.convert("L"), "JPEG"),
        "bilevel_bmp": encode(photo.convert("1"), "BMP"),
        "exif_rotated_jpeg": encode(gradient_photo((40, 20)), "JPEG", exif=exif),
        "animated_gif": _animated_gif(),
    }


def _animated_gif() -> bytes:
    frames = [Image.new("RGB", (32, 16), color) for color in ((255, 0, 0), (0, 0, 255))]
    return encode(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


@pytest.fixture(scope="session")
def random_model():
    from worker.compute.model import load_model

    return load_model("random", device="cpu", seed=0)


@pytest.fixture
def captions(monkeypatch) -> list[str]:
    """The caption of every figure the pipeline draws while the test runs, in order."""
    from worker.compute import pipeline

    drawn: list[str] = []
    real_draw = pipeline.draw_grid

    def spy(layers, **kwargs):
        drawn.append(kwargs["caption"])
        return real_draw(layers, **kwargs)

    monkeypatch.setattr(pipeline, "draw_grid", spy)
    return drawn
