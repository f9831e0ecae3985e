"""Safe image decoding, shared by the API (upload validation) and the worker.

The container type is identified from its magic bytes before any decoder runs, and Pillow is
then allowed to use only that one decoder, so a PSD, EPS or HTML file named ``.jpg`` never
reaches a parser it was not meant for. HEIC and AVIF are ISO-BMFF files: they are told apart
(and from MP4/MOV videos, which share the container) by the brands of their ``ftyp`` box.
The pixel count is checked from the header, on the frame that will be used, before the pixel
data is decoded.

What the decoded RGB picture is, for inputs that need a choice:

- orientation: the EXIF orientation tag is applied (the manifest records which one). HEIC
  is turned by libheif from the container's own ``irot``/``imir`` boxes, as the HEIF
  standard says; its EXIF tag (which on iPhones repeats them) is not applied a second time.
- several frames (animated GIF/WebP/AVIF): the first; HEIC: its primary image.
- transparency: composited on white.
- CMYK (including Adobe's inverted CMYK JPEGs): converted by Pillow, without ICC profiles.
- 16-bit samples: the top 8 bits; 16-bit grey becomes grey RGB; float samples are stretched
  onto 0..255; HDR HEIC/AVIF come out as 8 bits from their decoders.

Every failure is one of the :mod:`shared.errors` classes:

    EmptyImage          empty_image         no bytes at all
    UnsupportedType     unsupported_type    not JPEG, PNG, WebP, BMP, GIF, TIFF, HEIC or AVIF
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
import pillow_heif
from PIL import ExifTags, Image, ImageOps

from shared.errors import (
    EmptyImage,
    TooManyPixels,
    TruncatedImage,
    UndecodableImage,
    UnsupportedType,
)

ACCEPTED_EXTENSIONS = ("jpg", "png", "webp", "bmp", "gif", "tiff", "heic", "avif")
ACCEPTED_NAMES = "JPEG, PNG, WebP, BMP, GIF, TIFF, HEIC, AVIF"

# storage extension -> the only Pillow decoder allowed for it
_PIL_FORMATS = {
    "jpg": "JPEG",
    "png": "PNG",
    "webp": "WEBP",
    "bmp": "BMP",
    "gif": "GIF",
    "tiff": "TIFF",
    "heic": "HEIF",
    "avif": "AVIF",
}

# ISO-BMFF ftyp brands. MP4, MOV and 3GP use the same container with other brands. The AVIF
# and HEIC brands name the codec; the generic HEIF brands (mif1 for images, msf1 for image
# sequences) do not, and go to libheif (pillow-heif), which decodes what it has a codec for
# and answers undecodable_image for the rest.
_AVIF_BRANDS = frozenset({b"avif", b"avis"})
_HEIC_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx"})
_HEIF_BRANDS = frozenset({b"mif1", b"msf1"})
# Far more than any real ftyp box; a longer one is not read.
_FTYP_MAX_BYTES = 4096

# pillow-heif adds Pillow's "HEIF" plugin; nothing else in Pillow changes, and every open here
# names its one allowed format, so the plugin only ever sees data sniffed as HEIC.
pillow_heif.register_heif_opener()

# Composited under transparent pixels: white, like a browser page.
_BACKGROUND = (255, 255, 255)


@dataclass(frozen=True)
class ImageInfo:
    ext: str
    width: int
    height: int


@dataclass(frozen=True)
class DecodedImage:
    """The RGB picture and what was done to get it from the file."""

    image: Image.Image
    ext: str
    # the mode as stored, before conversion to RGB (e.g. "CMYK", "I;16", "RGBA", "P")
    mode: str
    # the EXIF orientation (1-8) that was applied; 1 when there was none to apply
    exif_orientation: int
    # frames (or top-level images) in the file, of which one is used; None when a later frame
    # is too broken to count
    frames: int | None
    # the upright picture's full size; ``image`` is smaller when a JPEG was decoded in draft
    # mode (DCT scaling), else this size
    size: tuple[int, int]

    def describe(self) -> dict:
        """The manifest's ``input`` entry: the size is that of the picture used, and
        ``decoded_size`` says how large it was decoded when that was smaller."""
        described = input_entry(self.ext, self.size, self.mode, self.exif_orientation, self.frames)
        if self.image.size != self.size:
            described["decoded_size"] = list(self.image.size)
        return described


def input_entry(
    ext: str, size: tuple[int, int], mode: str, exif_orientation: int, frames: int | None
) -> dict:
    """The manifest's ``input`` entry for a picture of upright ``size`` read from a file of
    type ``ext`` whatever decoded it (Pillow here, torchvision in
    worker/compute/device_stages.py)."""
    width, height = size
    return {
        "format": ext,
        "width": width,
        "height": height,
        "mode": mode,
        "exif_orientation": exif_orientation,
        "frames": frames,
    }


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
    if ext := _sniff_bmff(data):
        return ext
    raise UnsupportedType(f"not an accepted image type (accepted: {ACCEPTED_NAMES})")


def decode(data: bytes, *, max_pixels: int, draft_side: int | None = None) -> DecodedImage:
    """Decode ``data`` into a fully loaded RGB image with its EXIF orientation applied, with
    what the file held (format, mode, orientation, frames).

    ``draft_side``: a JPEG is decoded with libjpeg's DCT scaling to the smallest 1/2, 1/4 or
    1/8 scale whose sides are both at least this many pixels (Pillow's draft mode; several
    times faster on camera photos, a few levels off a full decode once resized). Other
    formats ignore it."""
    ext = sniff_format(data)
    try:
        with _decoder_warnings_silenced():
            return _decode(data, ext, max_pixels, draft_side)
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


@dataclass(frozen=True)
class JpegHeader:
    """What a JPEG's header says, read without decoding a pixel."""

    size: tuple[int, int]  # as stored
    mode: str
    exif_orientation: int

    def upright_size(self) -> tuple[int, int]:
        return self.size[::-1] if self.exif_orientation in (5, 6, 7, 8) else self.size

    def describe(self) -> dict:
        """The manifest's ``input`` entry of the (single-frame) JPEG, as decode() gives it."""
        return input_entry("jpg", self.upright_size(), self.mode, self.exif_orientation, 1)


def jpeg_header(data: bytes, *, max_pixels: int) -> JpegHeader | None:
    """The header of a complete JPEG within ``max_pixels``, for decoders other than Pillow
    (``worker/compute/device_stages.py``); None for anything that must go through :func:`decode`
    to be decoded or refused properly: another format, an unreadable or too large header, or
    data that does not end with the end-of-image marker (truncated, or a trailer after it)."""
    if not data.startswith(b"\xff\xd8\xff") or not data.rstrip(b"\x00").endswith(b"\xff\xd9"):
        return None
    try:
        with _decoder_warnings_silenced(), Image.open(io.BytesIO(data), formats=["JPEG"]) as image:
            _check_pixels(image.size, max_pixels)
            return JpegHeader(image.size, image.mode, _orientation(image))
    except Exception:  # whatever it is, decode() reports it with its proper code
        return None


def decode_image(data: bytes, *, max_pixels: int) -> Image.Image:
    """Decode ``data`` into a fully loaded RGB image with its EXIF orientation applied."""
    return decode(data, max_pixels=max_pixels).image


def validate_image(data: bytes, *, max_pixels: int) -> ImageInfo:
    """Check that ``data`` is an accepted, decodable image within ``max_pixels``."""
    decoded = decode(data, max_pixels=max_pixels)
    return ImageInfo(ext=decoded.ext, width=decoded.image.width, height=decoded.image.height)


def _sniff_bmff(data: bytes) -> str | None:
    """``heic`` or ``avif`` from an ISO-BMFF ``ftyp`` box, judged by the major brand first,
    then by the compatible ones, then by a generic HEIF brand (``heic``: libheif reads it);
    None for anything else (MP4, MOV, CR3...)."""
    if data[4:8] != b"ftyp":
        return None
    size = int.from_bytes(data[:4], "big")
    if not 16 <= size <= _FTYP_MAX_BYTES:
        return None
    body = data[8 : min(size, len(data))]
    brands = [body[:4]] + [body[offset : offset + 4] for offset in range(8, len(body) - 3, 4)]
    for group in (brands[:1], brands[1:]):
        if _AVIF_BRANDS.intersection(group):
            return "avif"
        if _HEIC_BRANDS.intersection(group):
            return "heic"
    return "heic" if _HEIF_BRANDS.intersection(brands) else None


def _decode(data: bytes, ext: str, max_pixels: int, draft_side: int | None) -> DecodedImage:
    image = Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[ext]])
    if ext != "heic":
        # HEIF opens on its primary image, the others on their first frame; say so anyway.
        image.seek(0)
    _check_pixels(image.size, max_pixels)
    mode, size = image.mode, image.size
    if draft_side and ext == "jpg":
        image.draft(None, (draft_side, draft_side))
    image.load()
    orientation = _orientation(image)
    ImageOps.exif_transpose(image, in_place=True)
    # Orientations 5-8 turn the picture a quarter: its upright size is the stored one swapped.
    upright = size[::-1] if orientation in (5, 6, 7, 8) else size
    rgb = _to_rgb(image)
    return DecodedImage(rgb, ext, mode, orientation, _frame_count(data, ext), upright)


def _frame_count(data: bytes, ext: str) -> int | None:
    """How many frames the file has, counted on a second opening so that the image in use is
    never moved; None when a frame after the first is too broken to count."""
    if ext in ("jpg", "bmp"):
        return 1
    try:
        # GIF and TIFF count by walking the frames' headers and data blocks, undecoded.
        return int(
            getattr(Image.open(io.BytesIO(data), formats=[_PIL_FORMATS[ext]]), "n_frames", 1)
        )
    except Exception:
        # The first frame decoded; damage after it must not fail the image (it did not
        # before frames were counted), so the count is reported as unknown instead.
        return None


def _orientation(image: Image.Image) -> int:
    # What exif_transpose applies: values outside 2..8 leave the image as it is.
    value = image.getexif().get(ExifTags.Base.Orientation, 1)
    return value if isinstance(value, int) and 2 <= value <= 8 else 1


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
    if ext in ("heic", "avif"):
        # libheif and libavif say "cannot identify" or "unexpected end of file" variously;
        # the boxes' sizes say whether the data stops early.
        return _bmff_is_cut(data)
    text = str(exc).lower()
    return isinstance(exc, OSError) and any(
        marker in text for marker in ("truncated", "broken data stream", "premature end")
    )


def _bmff_is_cut(data: bytes) -> bool:
    """Whether a top-level ISO-BMFF box claims more bytes than ``data`` holds."""
    offset = 0
    while offset < len(data):
        if len(data) - offset < 8:
            return True
        size = int.from_bytes(data[offset : offset + 4], "big")
        header = 8
        if size == 1:  # a 64-bit size follows the type
            if len(data) - offset < 16:
                return True
            size, header = int.from_bytes(data[offset + 8 : offset + 16], "big"), 16
        elif size == 0:  # the box runs to the end of the file
            return False
        if size < header:
            return False  # not a size at all: broken, not cut
        offset += size
    return offset > len(data)


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
