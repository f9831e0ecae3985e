"""Photos like the ones people send, generated with the imaging libraries: camera-size JPEGs
with EXIF and sensor noise, PNGs padded to an exact byte size, phone formats (HEIC, AVIF),
CMYK and 16-bit files. Unit and integration tests share them; every generator is seeded, so
a test gets the same bytes on every run.

A "scene" is a low-frequency colour field (a tiny random image upscaled) with per-pixel
noise added, which compresses like a photo: a 12 MP JPEG at quality 92 is 3-6 MB.
"""

from __future__ import annotations

import io
import struct
import zlib

import numpy as np
from PIL import Image

EXIF_ORIENTATION = 0x0112
# Stored-pixel corner that the marker is drawn in, and where it must appear once upright.
MARKER_FRACTION = 0.2


def scene(width: int, height: int, *, noise: int = 8, seed: int = 0) -> np.ndarray:
    """An H×W×3 uint8 photo-like array: smooth colour regions plus uniform noise ±``noise``."""
    rng = np.random.default_rng(seed)
    coarse = rng.integers(0, 256, (max(2, height // 100), max(2, width // 100), 3), np.uint8)
    base = Image.fromarray(coarse).resize((width, height), Image.BILINEAR)
    if not noise:
        return np.asarray(base)
    grain = rng.integers(-noise, noise + 1, (height, width, 3), dtype=np.int16)
    return np.clip(np.asarray(base, dtype=np.int16) + grain, 0, 255).astype(np.uint8)


def with_marker(pixels: np.ndarray) -> np.ndarray:
    """A copy with a white square in the stored top-left corner and a black bar along the
    stored bottom edge, so any rotation or flip of the image moves them somewhere else."""
    out = pixels.copy()
    height, width = out.shape[:2]
    side = int(min(width, height) * MARKER_FRACTION)
    out[:side, :side] = 255
    out[-side // 4 :, :] = 0
    return out


def exif(orientation: int | None = None, **tags: str) -> Image.Exif:
    data = Image.Exif()
    data[0x010F] = tags.get("make", "Canon")
    data[0x0110] = tags.get("model", "EOS 90D")
    if orientation is not None:
        data[EXIF_ORIENTATION] = orientation
    return data


def camera_jpeg(
    width: int = 4000,
    height: int = 3000,
    *,
    orientation: int | None = 6,
    quality: int = 92,
    seed: int = 0,
    progressive: bool = False,
) -> bytes:
    """A 12 MP (by default) camera JPEG of 3-6 MB with EXIF (make, model, orientation) and the
    orientation marker of :func:`with_marker` in its stored pixels."""
    pixels = with_marker(scene(width, height, noise=12, seed=seed))
    buf = io.BytesIO()
    Image.fromarray(pixels).save(
        buf, "JPEG", quality=quality, exif=exif(orientation), progressive=progressive
    )
    return buf.getvalue()


def stored_pixels(data: bytes) -> np.ndarray:
    """The pixels as stored in the file, EXIF orientation *not* applied."""
    with Image.open(io.BytesIO(data)) as image:
        return np.asarray(image.convert("RGB"))


def upright(pixels: np.ndarray, orientation: int) -> np.ndarray:
    """Apply an EXIF orientation to stored pixels with numpy alone (TIFF/EXIF 2.32 table), as a
    reference independent of Pillow's ``exif_transpose``."""
    ops = {
        1: lambda a: a,
        2: lambda a: a[:, ::-1],
        3: lambda a: a[::-1, ::-1],
        4: lambda a: a[::-1],
        5: lambda a: np.swapaxes(a, 0, 1),
        6: lambda a: np.rot90(a, k=-1),
        7: lambda a: np.rot90(a, k=1)[::-1],
        8: lambda a: np.rot90(a, k=1),
    }
    return np.ascontiguousarray(ops[orientation](pixels))


def png_bytes(pixels: np.ndarray, *, compress_level: int = 3) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, "PNG", compress_level=compress_level)
    return buf.getvalue()


def padded_png(size_bytes: int, *, seed: int = 0) -> bytes:
    """A valid noise PNG of exactly ``size_bytes`` (≥ 1 MB): the pixels fill most of it, a
    ``tEXt`` chunk before IEND makes up the rest. Noise does not compress, so this is the
    upload-path worst case at a given size."""
    rng = np.random.default_rng(seed)
    side = int(((size_bytes * 0.95) / 3) ** 0.5)
    noise = rng.integers(0, 256, (side, side, 3), dtype=np.uint8)
    data = png_bytes(noise, compress_level=1)
    iend = data.rindex(b"IEND") - 4
    room = size_bytes - len(data) - 12  # a chunk adds length, type and CRC
    if room < len(b"Comment\x00"):
        raise ValueError(f"{size_bytes} bytes is too small for a padded {side}² PNG")
    body = b"tEXt" + b"Comment\x00" + b"x" * (room - len(b"Comment\x00"))
    chunk = struct.pack(">I", len(body) - 4) + body + struct.pack(">I", zlib.crc32(body))
    out = data[:iend] + chunk + data[iend:]
    assert len(out) == size_bytes
    return out


def large_png(width: int = 6000, height: int = 4000, *, seed: int = 0) -> bytes:
    """A 24 MP PNG (about 16 MB: smooth content, as exported renders are)."""
    return png_bytes(with_marker(scene(width, height, noise=0, seed=seed)))


def heic_photo(width: int = 4032, height: int = 3024, *, orientation: int | None = None) -> bytes:
    """An iPhone-size HEIC, encoded by libheif through pillow-heif."""
    from pillow_heif import register_heif_opener

    register_heif_opener()
    image = Image.fromarray(with_marker(scene(width, height, noise=0, seed=1)))
    buf = io.BytesIO()
    image.save(buf, "HEIF", quality=60, exif=exif(orientation, make="Apple", model="iPhone 15"))
    return buf.getvalue()


def avif_photo(width: int = 4032, height: int = 3024) -> bytes:
    """A 12 MP AVIF, encoded by Pillow's own AVIF plugin."""
    image = Image.fromarray(with_marker(scene(width, height, noise=6, seed=2)))
    buf = io.BytesIO()
    image.save(buf, "AVIF", quality=70, speed=8)
    return buf.getvalue()


def cmyk_jpeg(width: int = 3000, height: int = 2000) -> bytes:
    """A print-workflow CMYK JPEG (Adobe marker, as Photoshop writes it)."""
    image = Image.fromarray(with_marker(scene(width, height, seed=3))).convert("CMYK")
    buf = io.BytesIO()
    image.save(buf, "JPEG", quality=90)
    return buf.getvalue()


def png16(width: int = 3000, height: int = 2000) -> bytes:
    """A 16-bit grayscale PNG, as scientific cameras and raw converters write."""
    gray = with_marker(scene(width, height, seed=4))[..., 0].astype(np.uint16) * 257
    buf = io.BytesIO()
    Image.fromarray(gray).save(buf, "PNG")
    return buf.getvalue()
