"""Safe image decoding, shared by the API (upload validation) and the worker.

The container type is identified from its magic bytes before any decoder runs, and Pillow is
then allowed to use only that one decoder, so a PSD, EPS or HTML file named ``.jpg`` never
reaches a parser it was not meant for. The pixel count is checked from the header before the
pixel data is decoded. Every failure is one of the :mod:`shared.errors` classes:

    EmptyImage          empty_image         no bytes at all
    UnsupportedType     unsupported_type    not JPEG, PNG, WebP, BMP, GIF or TIFF
    TooManyPixels       too_many_pixels     width × height over ``max_pixels``
    TruncatedImage      truncated_image     the data stops before the image does
    UndecodableImage    undecodable_image   anything else the decoder rejects
"""

from __future__ import annotations

import contextlib
import io
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

from shared.errors import (
    EmptyImage,
    TooManyPixels,
    TruncatedImage,
    UndecodableImage,
    UnsupportedType,
)

ACCEPTED_EXTENSIONS = ("jpg", "png", "webp", "bmp", "gif", "tiff")

# storage extension -> the only Pillow decoder allowed for it
_PIL_FORMATS = {
    "jpg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "bmp": "BMP",
    "gif": "GIF",
    "tiff": "TIFF",
}

# Composited under transparent pixels: white, like a browser page.
_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class ImageInfo:
    ext: str
    width: int
    height: int


def sniff_format(data: bytes) -> str:
    """Return the storage extension for ``data`` judged by its magic bytes alone."""
    if not data:
        raise EmptyImage("the image is empty (0 bytes)")
    if data.startswith(b"\xff\xd8\xff"):
        return "jpg"
    if data.startswith(b"\x89PNG\r\n\x1a\n"):
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    if data.startswith((b"GIF87a", b"GIF89a")):
        return "gif"
    if data.startswith((b"II*\x00", b"MM\x00*")):
        return "tiff"
    # "BM" alone is two printable letters; also require the DIB header size of a real BMP.
    if data[:2] == b"BM" and len(data) >= 18 and data[14] in (12, 40, 52, 56, 64, 108, 124):
        return "bmp"
    raise UnsupportedType("not an accepted image type (accepted: JPEG, PNG, WebP, BMP, GIF, TIFF)")


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode ``data`` into a fully loaded RGB image with its EXIF orientation applied."""
    return _decode(data, max_pixels=max_pixels)[1]


def validate_image(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Check that ``data`` is an accepted, decodable image within ``max_pixels``."""
    ext, image = _decode(data, max_pixels=max_pixels)
    return ImageInfo(ext=ext, width=image.width, height=image.height)


def _decode(data: bytes, *, max_pixels: int) -> tuple[str, Image.Image]:
    ext = sniff_format(data)
    try:
        with _decoder_warnings_silenced():
            image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[ext]])
            _check_pixels(image.size, max_pixels)
            image.load()
            ImageOps.exif_transpose(image, in_place=True)
            return ext, _to_rgb(image)
    except (TooManyPixels, UndecodableImage):
        raise
    except Image.DecompressionBombError as exc:
        # Pillow's own ceiling (2 × MAX_IMAGE_PIXELS) only matters if max_pixels is above it.
        raise TooManyPixels(f"the image has too many pixels: {exc}") from exc
    except Exception as exc:
        # Decoders fail in many ways on hostile input (OSError, ValueError, SyntaxError,
        # struct.error, MemoryError, ...); none of them may escape as a raw library error.
        if _is_truncation(exc, ext, data):
            raise TruncatedImage(f"the {ext} data is truncated: {exc}") from exc
        if isinstance(exc, Image.UnidentifiedImageError):
            raise UndecodableImage(f"the data starts like {ext} but is not a valid {ext}") from exc
        raise UndecodableImage(f"the {ext} data cannot be decoded: {exc}") from exc


@contextlib.contextmanager
def _decoder_warnings_silenced() -> Iterator[None]:
    # Pillow warns above its global MAX_IMAGE_PIXELS (our own limit is checked instead) and
    # about malformed metadata in hostile files; the outcome is a decoded image or one of our
    # errors, so such warnings carry nothing actionable.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


def _check_pixels(size: tuple[int, int], max_pixels: int) -> None:
    width, height = size
    if width <= 0 or height <= 0:
        raise UndecodableImage(f"the image declares an invalid size {width}×{height}")
    if width * height > max_pixels:
        raise TooManyPixels(
            f"the image is {width}×{height} = {width * height} pixels, "
            f"over the limit of {max_pixels}"
        )


def _is_truncation(exc: BaseException, ext: str, data: bytes) -> bool:
    if isinstance(exc, EOFError):
        return True
    if ext == "webp":
        # libwebp only says "could not create decoder object"; the RIFF header says how long
        # the file should be.
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    text = str(exc).lower()
    return isinstance(exc, OSError) and any(
        marker in text for marker in ("truncated", "broken data stream", "premature end")
    )


def _to_rgb(image: Image.Image) -> Image.Image:
    mode = image.mode
    if mode == "RGB":
        return image
    if mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
        # 16-bit samples (PNG/TIFF): keep the top 8 bits of the 0..65535 range.
        samples = np.asarray(image, dtype=np.int64)
        return _gray_to_rgb(np.clip(samples, 0, 65535) // 257)
    if mode == "F":
        # Float samples have no fixed range; stretch what is there onto 0..255.
        samples = np.nan_to_num(np.asarray(image, dtype=np.float64))
        low, high = samples.min(), samples.max()
        scaled = (samples - low) * (255.0 / (high - low)) if high > low else samples * 0.0
        return _gray_to_rgb(np.rint(scaled))
    if mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (*_BACKGROUND, 255))
        return Image.alpha_composite(background, rgba).convert("RGB")
    return image.convert("RGB")


def _gray_to_rgb(samples: np.ndarray) -> Image.Image:
    return Image.fromarray(samples.astype(np.uint8)).convert("RGB")
