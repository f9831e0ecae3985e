"""shared.imaging: type sniffing, safe decoding, and one clear error per kind of bad input."""

from __future__ import annotations

import io

import numpy as np
import pytest
from PIL import AvifImagePlugin, Image, ImageFile
from pillow_heif.as_plugin import HeifImageFile

from shared.errors import FeatureMapsError, TooManyPixels, UndecodableImage
from shared.imaging import ImageInfo, decode, decode_image, sniff_format, validate_image
from tests.unit.conftest import (
    ACCEPTED,
    PHOTO_SIZE,
    encode,
    gradient_photo,
    noise_photo,
    png16,
    shapes_photo,
)

RED, BLUE, WHITE = (255, 0, 0), (0, 0, 255), (255, 255, 255)

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


def _near(pixel: tuple[int, ...], color: tuple[int, int, int], tolerance: int = 12) -> bool:
    return all(abs(got - want) <= tolerance for got, want in zip(pixel, color, strict=True))


def _red_corner(size: tuple[int, int]) -> Image.Image:
    """Blue, with the top-left quadrant red: shows where the stored top-left corner went."""
    width, height = size
    image = Image.new("RGB", size, BLUE)
    image.paste(RED, (0, 0, width // 2, height // 2))
    return image


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _ftyp(major: bytes, *compatible: bytes) -> bytes:
    body = major + b"\x00\x00\x00\x00" + b"".join(compatible)
    return (8 + len(body)).to_bytes(4, "big") + b"ftyp" + body + b"\x00\x00\x00\x08free"


@pytest.mark.parametrize(
    ("header", "ext"),
    [
        (_ftyp(b"heic", b"mif1", b"heic"), "heic"),  # iPhone
        (_ftyp(b"heix", b"mif1", b"heix"), "heic"),  # 10-bit
        (_ftyp(b"mif1", b"mif1", b"heic", b"miaf"), "heic"),  # generic major brand
        (_ftyp(b"msf1", b"msf1", b"hevc"), "heic"),  # HEVC image sequence
        (_ftyp(b"avif", b"avif", b"mif1", b"miaf"), "avif"),
        (_ftyp(b"avis", b"avif", b"avis", b"msf1"), "avif"),  # AVIF sequence
        (_ftyp(b"mif1", b"mif1", b"avif"), "avif"),
        # Plain HEIF: the codec is in the file's items, libheif's to read.
        (_ftyp(b"mif1", b"mif1", b"miaf"), "heic"),
        (_ftyp(b"msf1", b"msf1", b"iso8"), "heic"),
    ],
)
def test_heic_and_avif_are_sniffed_by_their_brands(header, ext):
    assert sniff_format(header) == ext


def test_plain_heif_branded_mif1_decodes():
    """A HEIF whose ftyp names only the generic brands (mif1, miaf), as some cameras and
    converters write it: the same HEVC image as an iPhone's, decoded by pillow-heif."""
    heic = encode(shapes_photo(), ACCEPTED["heic"], quality=90)
    size = int.from_bytes(heic[:4], "big")
    compatible = ([b"mif1", b"miaf"] * size)[: (size - 16) // 4]
    plain = heic[:8] + b"mif1" + b"\x00\x00\x00\x00" + b"".join(compatible) + heic[size:]
    assert b"heic" not in plain[:size] and sniff_format(plain) == "heic"
    assert (
        decode(plain, max_pixels=LIMIT).image.tobytes()
        == decode(heic, max_pixels=LIMIT).image.tobytes()
    )


@pytest.mark.parametrize(
    "header",
    [
        _ftyp(b"isom", b"isom", b"iso2", b"avc1", b"mp41"),  # MP4
        _ftyp(b"qt  ", b"qt  "),  # MOV
        _ftyp(b"mp42", b"mp42", b"isom"),
        _ftyp(b"3gp5", b"3gp5", b"isom"),
        _ftyp(b"M4A ", b"M4A ", b"mp42"),
        _ftyp(b"crx ", b"crx "),  # Canon CR3 raw
        b"\x00\x00\x00\x08ftyp",  # a box too short for a major brand
        b"\xff\xff\xff\xffftypheic",  # a size no real ftyp has
    ],
)
def test_videos_and_other_iso_bmff_files_are_415(header):
    with pytest.raises(FeatureMapsError) as caught:
        validate_image(header + b"\x00" * 64, max_pixels=LIMIT)
    assert caught.value.code == "unsupported_type"
    assert caught.value.http_status == 415
    assert "HEIC, AVIF" in caught.value.message


@pytest.mark.parametrize("ext", ["heic", "avif"])
def test_heic_and_avif_decode_to_their_pixels(ext):
    data = encode(shapes_photo(), ACCEPTED[ext], quality=90)
    decoded = decode(data, max_pixels=LIMIT)
    assert decoded.describe() == {
        "format": ext,
        "width": 160,
        "height": 120,
        "mode": "RGB",
        "exif_orientation": 1,
        "frames": 1,
    }
    # Lossy, so near: the yellow disc, the red rectangle and the dark blue background.
    assert _near(decoded.image.getpixel((40, 40)), (240, 200, 40), 24)
    assert _near(decoded.image.getpixel((115, 65)), (200, 30, 60), 24)
    assert _near(decoded.image.getpixel((150, 110)), (30, 60, 90), 24)


@pytest.mark.parametrize("ext", ["heic", "avif"])
@pytest.mark.parametrize("keep", [0.25, 0.5, 0.98])
def test_truncated_heic_and_avif_are_truncated_image(ext, keep):
    # The box sizes tell a cut file from a broken one, whatever the library says.
    data = encode(noise_photo(), ACCEPTED[ext])
    with pytest.raises(FeatureMapsError) as caught:
        validate_image(data[: int(len(data) * keep)], max_pixels=LIMIT)
    assert caught.value.code == "truncated_image"


@pytest.mark.parametrize("ext", ["heic", "avif"])
def test_heic_and_avif_junk_after_the_header_is_undecodable(ext):
    data = encode(noise_photo(), ACCEPTED[ext])
    ftyp = data[: int.from_bytes(data[:4], "big")]
    with pytest.raises(FeatureMapsError) as caught:
        validate_image(ftyp + b"\x00\x00\x00\x10junk" + b"\x00" * 8, max_pixels=LIMIT)
    assert caught.value.code == "undecodable_image"


@pytest.mark.parametrize("ext", ["heic", "avif"])
def test_heic_and_avif_pixel_limit_is_checked_before_decoding(ext, monkeypatch):
    data = encode(gradient_photo(), ACCEPTED[ext])
    assert decode_image(data, max_pixels=160 * 120).size == PHOTO_SIZE

    def tripwire(self):
        raise AssertionError("the pixel data was decoded")

    for plugin in (HeifImageFile, AvifImagePlugin.AvifImageFile, ImageFile.ImageFile):
        monkeypatch.setattr(plugin, "load", tripwire)
    with pytest.raises(TooManyPixels, match="19200"):
        decode_image(data, max_pixels=160 * 120 - 1)


# Where the stored top-left corner is displayed, for each EXIF orientation.
_CORNER = {1: "tl", 2: "tr", 3: "br", 4: "bl", 5: "tl", 6: "tr", 7: "br", 8: "bl"}


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_puts_the_corner_where_it_belongs(orientation):
    data = encode(_red_corner((64, 48)), "JPEG", exif=_exif(orientation))
    decoded = decode(data, max_pixels=LIMIT)
    image = decoded.image
    assert image.size == ((48, 64) if orientation >= 5 else (64, 48))
    assert decoded.exif_orientation == orientation
    width, height = image.size
    right, bottom = width - 5, height - 5
    corners = {"tl": (4, 4), "tr": (right, 4), "bl": (4, bottom), "br": (right, bottom)}
    for corner, point in corners.items():
        expected = RED if corner == _CORNER[orientation] else BLUE
        assert _near(image.getpixel(point), expected, 40), (corner, image.getpixel(point))


def test_phone_sized_jpeg_with_orientation_6():
    # 4000×3000 as the sensor stored it; "rotate 90° clockwise to display".
    data = encode(_red_corner((4000, 3000)), "JPEG", exif=_exif(6), quality=90)
    decoded = decode(data, max_pixels=LIMIT)
    assert decoded.image.size == (3000, 4000)
    assert decoded.describe()["exif_orientation"] == 6
    pixels = np.asarray(decoded.image)
    # The red quadrant is now the top-right one, 1500 wide and 2000 high.
    assert _near(tuple(pixels[:1990, 1510:].mean(axis=(0, 1))), RED, 2)
    assert _near(tuple(pixels[:1990, :1490].mean(axis=(0, 1))), BLUE, 2)
    assert _near(tuple(pixels[2010:, :].mean(axis=(0, 1))), BLUE, 2)


def test_avif_rotation_is_applied():
    # Pillow writes the orientation as AVIF's irot box and reads it back as EXIF orientation.
    data = encode(_red_corner((64, 48)), "AVIF", exif=_exif(6), quality=90)
    decoded = decode(data, max_pixels=LIMIT)
    assert decoded.image.size == (48, 64)
    assert decoded.exif_orientation == 6
    assert _near(decoded.image.getpixel((43, 4)), RED, 40)
    assert _near(decoded.image.getpixel((4, 4)), BLUE, 40)


def test_heic_exif_orientation_is_not_applied_over_the_container():
    # HEIC is turned by libheif from its irot/imir boxes; the EXIF tag (which iPhones set to
    # the same turn) is not applied again. This file has the tag but no irot: left as stored.
    data = encode(_red_corner((64, 48)), "HEIF", exif=_exif(6), quality=90)
    decoded = decode(data, max_pixels=LIMIT)
    assert decoded.image.size == (64, 48)
    assert decoded.exif_orientation == 1
    assert _near(decoded.image.getpixel((4, 4)), RED, 40)


def test_images_without_exif_are_not_turned(photos):
    decoded = decode(photos[("gradient", "jpg")], max_pixels=LIMIT)
    assert decoded.exif_orientation == 1
    assert decoded.image.size == PHOTO_SIZE


def test_adobe_cmyk_red_stays_red():
    # Pillow writes CMYK JPEGs as Photoshop does: inverted samples under an Adobe marker.
    data = encode(Image.new("CMYK", (32, 32), (0, 255, 255, 0)), "JPEG", quality=95)
    assert b"Adobe" in data
    decoded = decode(data, max_pixels=LIMIT)
    assert decoded.mode == "CMYK"
    assert _near(decoded.image.getpixel((16, 16)), RED, 4)


def test_sixteen_bit_rgb_png_keeps_the_top_byte():
    samples = np.zeros((8, 8, 3), dtype=np.uint16)
    samples[..., 0], samples[..., 1], samples[..., 2] = 0xFFFF, 0x8000, 0x00FF
    samples[4:, :, 0] = 0x1234
    image = decode_image(png16(samples), max_pixels=LIMIT)
    assert image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 128, 0)
    assert image.getpixel((0, 7)) == (0x12, 128, 0)


def test_sixteen_bit_rgba_png_is_composited_on_white():
    samples = np.zeros((8, 8, 4), dtype=np.uint16)
    samples[..., 0] = 0xFFFF  # red
    samples[:, :4, 3] = 0xFFFF  # left half opaque, right half transparent
    image = decode_image(png16(samples), max_pixels=LIMIT)
    assert image.getpixel((1, 1)) == RED
    assert image.getpixel((6, 1)) == WHITE


def test_half_transparent_red_is_pink_on_white():
    data = encode(Image.new("RGBA", (8, 8), (255, 0, 0, 128)), "PNG")
    image = decode_image(data, max_pixels=LIMIT)
    assert _near(image.getpixel((3, 3)), (255, 127, 127), 1)


@pytest.mark.parametrize("pil_format", ["PNG", "JPEG"])
def test_grayscale_becomes_equal_channels(pil_format):
    ramp = Image.fromarray(np.tile(np.arange(0, 256, 4, dtype=np.uint8), (16, 1)))
    decoded = decode(encode(ramp, pil_format, quality=95), max_pixels=LIMIT)
    pixels = np.asarray(decoded.image).astype(int)
    assert decoded.mode == "L"
    assert np.array_equal(pixels[..., 0], pixels[..., 1])
    assert np.array_equal(pixels[..., 0], pixels[..., 2])
    assert np.abs(pixels[..., 0] - np.asarray(ramp)).max() <= 3


def _two_frames(pil_format: str, **options) -> bytes:
    first, second = Image.new("RGB", (32, 16), RED), Image.new("RGB", (32, 16), BLUE)
    return encode(first, pil_format, save_all=True, append_images=[second], **options)


@pytest.mark.parametrize("ext", ["gif", "webp", "avif", "heic"])
def test_animations_give_their_first_frame(ext):
    decoded = decode(_two_frames(ACCEPTED[ext]), max_pixels=LIMIT)
    assert decoded.frames == 2
    assert decoded.image.size == (32, 16)
    assert _near(decoded.image.getpixel((8, 8)), RED, 12)


def test_heic_gives_its_primary_image_and_checks_its_size():
    # A HEIF collection: a 64×64 blue image first, the 16×8 red primary second.
    big, primary = Image.new("RGB", (64, 64), BLUE), Image.new("RGB", (16, 8), RED)
    data = encode(big, "HEIF", save_all=True, append_images=[primary], primary_index=1)
    decoded = decode(data, max_pixels=16 * 8)
    assert decoded.frames == 2
    assert decoded.image.size == (16, 8)
    assert _near(decoded.image.getpixel((4, 4)), RED, 12)
    with pytest.raises(TooManyPixels):
        decode(data, max_pixels=16 * 8 - 1)


def test_progressive_jpeg_decodes_like_baseline():
    photo = gradient_photo((640, 480))
    progressive = encode(photo, "JPEG", progressive=True, quality=90)
    assert Image.open(io.BytesIO(progressive)).info.get("progressive")
    baseline = decode_image(encode(photo, "JPEG", quality=90), max_pixels=LIMIT)
    image = decode_image(progressive, max_pixels=LIMIT)
    difference = np.abs(np.asarray(image, dtype=int) - np.asarray(baseline, dtype=int))
    assert image.size == (640, 480) and difference.max() <= 2


def test_wide_panorama_within_the_limit():
    panorama = Image.new("RGB", (12000, 1000), BLUE)
    panorama.paste(RED, (0, 0, 1000, 1000))
    data = encode(panorama, "JPEG", quality=90)
    image = decode_image(data, max_pixels=12_000_000)
    assert image.size == (12000, 1000)
    assert _near(image.getpixel((500, 500)), RED, 4)
    assert _near(image.getpixel((11500, 500)), BLUE, 4)
    with pytest.raises(TooManyPixels):
        decode_image(data, max_pixels=11_999_999)


def test_a_broken_later_frame_leaves_the_count_unknown(special_images):
    # Cut inside the second frame's headers: the first frame decodes as it always did.
    data = special_images["animated_gif"]
    second_frame = data.index(b"\x21\xf9\x04", data.index(b"\x21\xf9\x04") + 1)
    decoded = decode(data[: second_frame + 12], max_pixels=LIMIT)
    assert decoded.frames is None
    assert decoded.image.getpixel((0, 0)) == RED
