"""The archive reader's safety checks, on archives built in memory (no services)."""

from __future__ import annotations

import io
import random
import tarfile
import zipfile

import pytest
from PIL import Image

from shared.archives import (
    ArchiveLimits,
    iter_archive,
    safe_name,
    sniff_archive,
)
from shared.errors import (
    ArchiveBomb,
    ArchiveMemberTooLarge,
    ArchiveTooLarge,
    ArchiveTooManyMembers,
    CorruptArchive,
    RefusedMember,
    UnsupportedType,
)
from tests.unit.conftest import encode
from worker.batches.expand import _block_items

LIMITS = ArchiveLimits(
    max_members=100, max_total_bytes=10_000_000, max_member_bytes=3_000_000, max_ratio=50
)


def _zip(entries: list[tuple[str, bytes]], *, symlink: str | None = None) -> io.BytesIO:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in entries:
            archive.writestr(name, data)
        if symlink:
            info = zipfile.ZipInfo(symlink)
            info.create_system = 3
            info.external_attr = (0o120777 << 16) | 0
            archive.writestr(info, "/etc/passwd")
    buffer.seek(0)
    return buffer


def _tar(build, mode: str = "w:gz") -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode=mode) as archive:
        build(archive)
    buffer.seek(0)
    return buffer


def _add(archive: tarfile.TarFile, name: str, data: bytes = b"", **attrs) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    archive.addfile(info, io.BytesIO(data) if data else None)


def _codes(members) -> dict[str, str | None]:
    return {m.name: (m.error.code if m.error else None) for m in members}


@pytest.mark.parametrize(
    "raw, expected",
    [("a/b.jpg", "a/b.jpg"), ("./a//b.jpg", "a/b.jpg"), ("a\\b.jpg", "a/b.jpg")],
)
def test_safe_names_are_normalised(raw, expected):
    assert safe_name(raw) == expected


@pytest.mark.parametrize(
    "raw, code",
    [
        ("/etc/passwd", "absolute_path"),
        ("C:\\x.jpg", "absolute_path"),
        ("\\\\server\\x.jpg", "absolute_path"),
        ("../x.jpg", "path_traversal"),
        ("a/../../x.jpg", "path_traversal"),
        ("a\\..\\..\\x.jpg", "path_traversal"),
        ("./", "bad_name"),
    ],
)
def test_unsafe_names_are_refused(raw, code):
    with pytest.raises(RefusedMember) as caught:
        safe_name(raw)
    assert caught.value.code == code


def test_sniff_archive_by_content():
    assert sniff_archive(_zip([("a", b"x")]).getvalue()[:512]) == "zip"
    assert sniff_archive(_tar(lambda t: _add(t, "a", b"x")).getvalue()[:512]) == "tar.gz"
    assert sniff_archive(_tar(lambda t: _add(t, "a", b"x"), "w").getvalue()[:512]) == "tar"
    with pytest.raises(UnsupportedType):
        sniff_archive(b"\xff\xd8\xff\xe0 a jpeg named .zip", "photos.zip")


def test_zip_members_refused_with_their_reason():
    nested = _zip([("inner.jpg", b"\xff\xd8\xff")]).getvalue()
    archive = _zip(
        [
            ("good/photo.jpg", b"\xff\xd8\xffdata"),
            ("../escape.jpg", b"x"),
            ("/abs.jpg", b"x"),
            ("inner.zip", nested),
            ("disguised.jpg", nested),
            ("dir/", b""),
        ],
        symlink="link.jpg",
    )
    members = list(iter_archive(archive, "zip", LIMITS))
    assert _codes(members) == {
        "good/photo.jpg": None,
        "../escape.jpg": "path_traversal",
        "/abs.jpg": "absolute_path",
        "inner.zip": "nested_archive",
        "disguised.jpg": "nested_archive",
        "link.jpg": "symlink",
    }
    assert members[0].data == b"\xff\xd8\xffdata"
    assert all(m.data is None for m in members[1:])
    assert [m.index for m in members] == list(range(6))


def test_tar_members_refused_with_their_reason():
    def build(archive):
        _add(archive, "ok.jpg", b"\xff\xd8\xffok")
        _add(archive, "../up.jpg", b"x")
        _add(archive, "/root.jpg", b"x")
        _add(archive, "sym.jpg", type=tarfile.SYMTYPE, linkname="/etc/shadow")
        _add(archive, "hard.jpg", type=tarfile.LNKTYPE, linkname="ok.jpg")
        _add(archive, "dev", type=tarfile.CHRTYPE, devmajor=1, devminor=3)
        _add(archive, "fifo", type=tarfile.FIFOTYPE)
        _add(archive, "sub", type=tarfile.DIRTYPE)
        _add(archive, "more.tgz", b"\x1f\x8b\x08junk")

    members = list(iter_archive(_tar(build), "tar.gz", LIMITS))
    assert _codes(members) == {
        "ok.jpg": None,
        "../up.jpg": "path_traversal",
        "/root.jpg": "absolute_path",
        "sym.jpg": "symlink",
        "hard.jpg": None,  # a link to an earlier member: resolved to its bytes
        "dev": "special_file",
        "fifo": "special_file",
        "more.tgz": "nested_archive",
    }
    assert [m.link for m in members if m.name == "hard.jpg"] == ["ok.jpg"]


def test_tar_is_read_as_a_stream():
    class ForwardOnly(io.RawIOBase):
        def __init__(self, data: bytes) -> None:
            self._inner = io.BytesIO(data)

        def readable(self) -> bool:
            return True

        def readinto(self, buffer) -> int:
            data = self._inner.read(len(buffer))
            buffer[: len(data)] = data
            return len(data)

    data = _tar(lambda t: [_add(t, f"{i}.jpg", b"\xff\xd8\xff" * 100) for i in range(5)])
    members = list(iter_archive(ForwardOnly(data.getvalue()), "tar.gz", LIMITS))
    assert [m.name for m in members] == [f"{i}.jpg" for i in range(5)]


def test_too_many_members_in_zip_is_refused_up_front():
    archive = _zip([(f"{i}.jpg", b"x") for i in range(101)])
    with pytest.raises(ArchiveTooManyMembers):
        next(iter_archive(archive, "zip", LIMITS))


def test_too_many_members_in_tar_stops_after_the_limit():
    archive = _tar(lambda t: [_add(t, f"{i}.jpg", b"x") for i in range(101)], "w")
    seen = []
    with pytest.raises(ArchiveTooManyMembers):
        for member in iter_archive(archive, "tar", LIMITS):
            seen.append(member)
    assert len(seen) == 100


def test_member_over_the_byte_limit():
    archive = _tar(lambda t: _add(t, "big.bmp", b"\x01\x02" * 1_600_000), "w")
    with pytest.raises(ArchiveMemberTooLarge):
        list(iter_archive(archive, "tar", LIMITS))


def test_total_over_the_byte_limit():
    blob = bytes(range(256)) * 10_000  # 2.56 MB, incompressible enough
    archive = _tar(lambda t: [_add(t, f"{i}.bin", blob) for i in range(5)], "w")
    with pytest.raises(ArchiveTooLarge):
        list(iter_archive(archive, "tar", LIMITS))


def test_zip_bomb_is_caught_by_ratio():
    archive = _zip([("zeros.bmp", b"\x00" * 2_900_000)])
    with pytest.raises(ArchiveBomb):
        list(iter_archive(archive, "zip", LIMITS))


def test_tar_gz_bomb_is_caught_by_ratio():
    archive = _tar(lambda t: _add(t, "zeros.bmp", b"\x00" * 2_900_000))
    with pytest.raises(ArchiveBomb):
        list(iter_archive(archive, "tar.gz", LIMITS))


def test_corrupt_archives():
    with pytest.raises(CorruptArchive):
        list(iter_archive(io.BytesIO(b"PK\x03\x04 not really"), "zip", LIMITS))
    noise = random.Random(0).randbytes(30_000)
    truncated = _tar(lambda t: _add(t, "a.jpg", noise)).getvalue()[:20_000]
    with pytest.raises(CorruptArchive):
        list(iter_archive(io.BytesIO(truncated), "tar.gz", LIMITS))


def test_phone_formats_in_a_zip_become_items_and_a_video_fails_alone():
    # Members are classified by the same sniffing as uploads: HEIC and AVIF become inputs
    # in their block's pack; an MP4 (the same container) is refused by itself.
    photo = Image.new("RGB", (32, 24), (200, 30, 60))
    mp4 = b"\x00\x00\x00\x18ftypisom\x00\x00\x02\x00isomiso2" + b"\x00" * 64
    entries = [
        ("DCIM/IMG_0001.HEIC", encode(photo, "HEIF")),
        ("DCIM/IMG_0002.avif", encode(photo, "AVIF")),
        ("DCIM/IMG_0003.MOV", mp4),
    ]
    members = list(iter_archive(_zip(entries), "zip", LIMITS))
    assert [member.error for member in members] == [None, None, None]
    (heic, avif, video), parts = _block_items("b1", members, "pack")
    # The two images go into the block's pack, one after the other; the video does not.
    assert parts == [entries[0][1], entries[1][1]]
    assert heic.input_key == avif.input_key == "pack"
    assert heic.input_range == (0, len(parts[0]))
    assert avif.input_range == (len(parts[0]), len(parts[1]))
    assert video.input_key is None and video.input_range is None
    assert video.error["code"] == "unsupported_type"
