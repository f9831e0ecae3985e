"""shared.imaging: type sniffing, safe decoding, and one clear error per kind of bad input."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from shared.errors import FeatureMapsError, TooManyPixels, UndecodableImage
from shared.imaging import ImageInfo, decode_image, sniff_format, validate_image
from tests.unit.conftest import ACCEPTED, PHOTO_SIZE, encode, noise_photo

LIMIT = 50_000_000


@pytest.mark.parametrize("ext", ACCEPTED)
@pytest.mark.parametrize("kind", ["gradient", "shapes", "noise"])
def test_accepted_formats_decode_to_rgb(photos, kind, ext):
    data = photos[(kind, ext)]
    assert sniff_format(data) == ext
    image = decode_image(data, max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert image.size == PHOTO_SIZE
    assert validate_image(data, max_pixels=LIMIT) == ImageInfo(ext, *PHOTO_SIZE)


@pytest.mark.parametrize("ext", ["png", "bmp", "tiff", "webp"])
def test_lossless_formats_keep_the_pixels(ext):
    photo = noise_photo()
    options = {"lossless": True} if ext == "webp" else {}
    decoded = decode_image(encode(photo, ACCEPTED[ext], **options), max_pixels=LIMIT)
    assert np.array_equal(np.asarray(decoded), np.asarray(photo))


def test_real_photo(grace_hopper):
    info = validate_image(grace_hopper, max_pixels=LIMIT)
    assert info == ImageInfo("jpg", 512, 600)


def test_every_bad_input_has_its_own_code(bad_inputs):
    for name, (data, code) in bad_inputs.items():
        with pytest.raises(FeatureMapsError) as caught:
            decode_image(data, max_pixels=LIMIT)
        assert caught.value.code == code, name
        with pytest.raises(FeatureMapsError) as caught:
            validate_image(data, max_pixels=LIMIT)
        assert caught.value.code == code, name


def test_pixel_limit_uses_the_header_not_the_pixels(photos):
    # 160×120 = 19200 pixels; the limit is ours, not Pillow's global one.
    data = photos[("gradient", "png")]
    assert decode_image(data, max_pixels=19200).size == PHOTO_SIZE
    with pytest.raises(TooManyPixels, match="19200"):
        decode_image(data, max_pixels=19199)


def test_bad_input_never_escapes_as_a_library_error(photos):
    """Seeded corruptions of valid files: the only failures are our own error classes."""
    rng = np.random.default_rng(7)
    outcomes = set()
    for (kind, _ext), data in photos.items():
        if kind != "shapes":
            continue
        for _ in range(40):
            corrupted = bytearray(data)
            for position in rng.integers(0, len(corrupted), size=8):
                corrupted[position] = rng.integers(0, 256)
            cut = int(rng.integers(len(data) // 4, len(data) + 1))
            try:
                decode_image(bytes(corrupted[:cut]), max_pixels=LIMIT)
                outcomes.add("decoded")
            except FeatureMapsError as exc:
                outcomes.add(exc.code)
    assert outcomes <= {
        "decoded",
        "truncated_image",
        "undecodable_image",
        "too_many_pixels",
        "unsupported_type",
    }


def test_unexpected_decoder_exceptions_become_undecodable(photos, monkeypatch):
    def explode(self):
        raise ValueError("decoder bug")

    monkeypatch.setattr(Image.Image, "load", explode)
    monkeypatch.setattr("PIL.ImageFile.ImageFile.load", explode)
    with pytest.raises(UndecodableImage, match="decoder bug"):
        decode_image(photos[("shapes", "png")], max_pixels=LIMIT)


def test_cmyk_becomes_rgb(special_images):
    image = decode_image(special_images["cmyk_jpeg"], max_pixels=LIMIT)
    assert image.mode == "RGB"
    # The yellow disc stays yellow-ish: strong red and green, weak blue.
    red, green, blue = image.getpixel((40, 40))
    assert red > 180 and green > 150 and blue < 100


@pytest.mark.parametrize("name", ["gray16_png", "gray16_tiff"])
def test_sixteen_bit_is_scaled_not_clipped(special_images, name):
    image = decode_image(special_images[name], max_pixels=LIMIT)
    row = np.asarray(image)[0, :, 0].astype(int)
    assert image.mode == "RGB"
    assert row[0] == 0 and row[-1] == 255
    assert np.all(np.diff(row) >= 0)  # a ramp, not a saturated band


@pytest.mark.parametrize("name", ["rgba_png", "la_png"])
def test_transparency_is_composited_on_white(special_images, name):
    image = decode_image(special_images[name], max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert image.getpixel((5, 100)) == (255, 255, 255)  # left half fully transparent
    assert image.getpixel((120, 60)) != (255, 255, 255)  # the opaque red rectangle


def test_palette_with_transparency(special_images):
    image = decode_image(special_images["palette_transparent_png"], max_pixels=LIMIT)
    assert image.mode == "RGB"


@pytest.mark.parametrize("name", ["gray_jpeg", "bilevel_bmp", "animated_gif"])
def test_other_modes_become_rgb(special_images, name):
    assert decode_image(special_images[name], max_pixels=LIMIT).mode == "RGB"


def test_gif_gives_its_first_frame(special_images):
    image = decode_image(special_images["animated_gif"], max_pixels=LIMIT)
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_exif_orientation_is_applied(special_images):
    # Stored 40×20 with "rotate 90° to display": shown 20×40.
    image = decode_image(special_images["exif_rotated_jpeg"], max_pixels=LIMIT)
    assert image.size == (20, 40)
    assert validate_image(special_images["exif_rotated_jpeg"], max_pixels=LIMIT).height == 40


def test_bmp_needs_more_than_two_letters():
    with pytest.raises(FeatureMapsError) as caught:
        sniff_format(b"BM is how this sentence starts")
    assert caught.value.code == "unsupported_type"
