"""How member names are decoded and which members are skipped (shared/member_names.py), and
the archive reader on zips and tars as people's tools make them."""

from __future__ import annotations

import io
import tarfile

import pytest

from shared.archives import ArchiveLimits, Member, iter_archive
from shared.batches import Item, NewItem, item_id
from shared.errors import InvalidOption
from shared.member_names import skip_reason, tar_name, zip_name
from shared.options import parse_archive_encoding
from tests.archive_makers import (
    GBK_NAME,
    NAME,
    UTF8_FLAG,
    Raw,
    crafted_zip,
    finder_zip,
    gnu_tar,
    info_zip,
    photo_folder,
    unicode_path,
    windows_gbk_zip,
)
from worker.batches.expand import _block_items, _LinkTargets

LIMITS = ArchiveLimits(
    max_members=100, max_total_bytes=10_000_000, max_member_bytes=3_000_000, max_ratio=50
)
JPEG = b"\xff\xd8\xff\xe0" + b"\x00" * 60


def test_flagged_names_are_utf8():
    assert zip_name(NAME.encode(), UTF8_FLAG, b"") == NAME


def test_unflagged_utf8_is_tried_before_cp437():
    assert zip_name(NAME.encode(), 0, b"") == NAME
    # Not UTF-8: the zip spec's CP437 (a DOS name with an accent).
    assert zip_name("CAFÉ.JPG".encode("cp437"), 0, b"") == "CAFÉ.JPG"


def test_archive_encoding_reads_the_rest():
    raw = GBK_NAME.encode("gbk")
    assert zip_name(raw, 0, b"", "gbk") == GBK_NAME
    assert zip_name("写真/東京.jpg".encode("shift_jis"), 0, b"", "shift_jis") == "写真/東京.jpg"


def test_unicode_path_field_is_honoured_when_its_crc_matches():
    header = "照片/旧.jpg".encode("gbk")
    assert zip_name(header, 0, unicode_path(header, "照片/新年.jpg")) == "照片/新年.jpg"
    # A field written for another header name (the name was changed since) is stale.
    stale = unicode_path(b"other.jpg", "照片/新年.jpg")
    assert zip_name(header, 0, stale, "gbk") == "照片/旧.jpg"
    # Beside other extra fields (the Unix timestamp field comes first in Info-ZIP's).
    timestamp = b"UT\x05\x00\x03\x00\x00\x00\x00"
    assert zip_name(header, 0, timestamp + unicode_path(header, "a.jpg")) == "a.jpg"


def test_undecodable_bytes_keep_a_stable_readable_escape():
    # Flagged UTF-8 that is not, and a name the given codec cannot read.
    assert zip_name(b"bad\xff\xfe.jpg", UTF8_FLAG, b"") == "bad%FF%FE.jpg"
    assert zip_name(b"x\x80.jpg", 0, b"", "gbk") == "x%80.jpg"
    assert zip_name(b"x\x80.jpg", 0, b"", "gbk") == zip_name(b"x\x80.jpg", 0, b"", "gbk")
    # No backslash in an escape: it would be read as a directory separator.
    assert "\\" not in zip_name(b"\xff", UTF8_FLAG, b"")


def test_tar_names_are_utf8_then_the_archive_encoding():
    assert tar_name(NAME) == NAME
    gbk = GBK_NAME.encode("gbk").decode("utf-8", "surrogateescape")
    assert tar_name(gbk, "gbk") == GBK_NAME
    assert tar_name("a\udcff.jpg") == "a%FF.jpg"


@pytest.mark.parametrize(
    "raw, expected",
    [("gbk", "gbk"), ("Shift-JIS", "shift_jis"), ("cp936", "gbk"), (" big5 ", "big5"), ("", None)],
)
def test_archive_encoding_is_validated(raw, expected):
    assert parse_archive_encoding(raw) == expected


@pytest.mark.parametrize("raw", ["klingon", "base64", "zlib", "utf_16", "x" * 50, 3])
def test_unknown_or_binary_codecs_are_refused(raw):
    with pytest.raises(InvalidOption, match="archive_encoding") as refused:
        parse_archive_encoding(raw)
    assert "shift_jis" in refused.value.message


@pytest.mark.parametrize(
    "name, code",
    [
        ("__MACOSX/Fotos/._IMG_0001.jpg", "macos_metadata"),
        ("__MACOSX/Fotos/anything", "macos_metadata"),
        ("Fotos/._IMG_0001.jpg", "macos_metadata"),
        ("Fotos/.DS_Store", "macos_metadata"),
        (".DS_Store", "macos_metadata"),
        ("Fotos/Thumbs.db", "windows_metadata"),
        ("Fotos/thumbs.db", "windows_metadata"),
        ("desktop.ini", "windows_metadata"),
        ("Fotos/IMG_0001.jpg", None),
        ("Fotos/.hidden.jpg", None),
        ("MACOSX/a.jpg", None),
    ],
)
def test_junk_is_recognised(name, code):
    reason = skip_reason(name)
    assert (reason["code"] if reason else None) == code
    if reason:
        assert "skipped" in reason["message"]


def _outcomes(members):
    return {
        m.name: (
            "skipped"
            if m.skipped
            else (m.error.code if m.error else ("link" if m.link else "data"))
        )
        for m in members
    }


def test_a_finder_zip_reads_as_the_user_sees_it():
    members = list(iter_archive(io.BytesIO(finder_zip(JPEG)), "zip", LIMITS))
    assert _outcomes(members) == {
        NAME: "data",
        "Fotos/.DS_Store": "skipped",
        f"__MACOSX/Fotos/._{NAME.split('/')[1]}": "skipped",
    }
    items, parts = _block_items("b1", members, "pack")
    assert [item.status.value for item in items] == ["queued", "skipped", "skipped"]
    assert parts == [JPEG]
    assert items[1].info()["skip_reason"]["code"] == "macos_metadata"
    assert "error" not in items[1].info()


def test_a_windows_gbk_zip_with_its_encoding():
    members = list(iter_archive(io.BytesIO(windows_gbk_zip(JPEG)), "zip", LIMITS, "gbk"))
    assert _outcomes(members) == {
        GBK_NAME: "data",
        "照片/Thumbs.db": "skipped",
        "照片/desktop.ini": "skipped",
        "照片/新年.jpg": "data",
    }


def test_a_windows_gbk_zip_without_its_encoding_reads_as_cp437_not_an_error():
    members = list(iter_archive(io.BytesIO(windows_gbk_zip(JPEG)), "zip", LIMITS))
    assert members[0].name == GBK_NAME.encode("gbk").decode("cp437")
    # Junk is found by its ASCII name whatever the encoding.
    assert [bool(m.skipped) for m in members] == [False, True, True, False]


def test_info_zip_names(tmp_path):
    archive = info_zip(photo_folder(tmp_path / "src", JPEG), tmp_path / "photos.zip")
    with archive.open("rb") as stream:
        members = list(iter_archive(stream, "zip", LIMITS))
    assert {m.name for m in members} == {"Fotos/copy.jpg", NAME}
    assert all(m.data == JPEG for m in members)


@pytest.mark.parametrize("gzip", [False, True])
def test_gnu_tar_hard_link_resolves_to_the_earlier_member(tmp_path, gzip):
    folder = photo_folder(tmp_path / "src", JPEG)
    archive = gnu_tar(folder, tmp_path / "photos.tar", gzip=gzip)
    with archive.open("rb") as stream:
        members = list(iter_archive(stream, "tar.gz" if gzip else "tar", LIMITS))
    by_name = {m.name: m for m in members}
    # GNU tar stores the first name it meets with the bytes, the second as a link to it.
    first, second = sorted(by_name, key=lambda n: by_name[n].index)
    assert by_name[first].data == JPEG
    assert by_name[second].link == first
    items, parts = _block_items("b1", members, "pack")
    assert parts == [JPEG]
    assert [(i.status.value, i.input_key, i.input_range) for i in items] == [
        ("queued", "pack", (0, len(JPEG))),
        ("queued", "pack", (0, len(JPEG))),
    ]


def _tar(build) -> io.BytesIO:
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w", format=tarfile.GNU_FORMAT) as archive:
        build(archive)
    buffer.seek(0)
    return buffer


def _add(archive, name, data=b"", **attrs):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    for key, value in attrs.items():
        setattr(info, key, value)
    archive.addfile(info, io.BytesIO(data) if data else None)


def test_hard_links_that_leave_or_come_before_their_target_fail():
    def build(archive):
        _add(archive, "early.jpg", type=tarfile.LNKTYPE, linkname="later.jpg")
        _add(archive, "later.jpg", JPEG)
        _add(archive, "out.jpg", type=tarfile.LNKTYPE, linkname="../etc/passwd")
        _add(archive, "abs.jpg", type=tarfile.LNKTYPE, linkname="/etc/passwd")
        _add(archive, "nothing.jpg", type=tarfile.LNKTYPE, linkname="missing.jpg")
        _add(archive, "doc.txt", b"text, not an image")
        _add(archive, "doc-link.txt", type=tarfile.LNKTYPE, linkname="doc.txt")

    members = list(iter_archive(_tar(build), "tar", LIMITS))
    items, parts = _block_items("b1", members, "pack")
    assert parts == [JPEG]
    outcome = {i.name: (i.status.value, (i.error or {}).get("code")) for i in items}
    assert outcome == {
        "early.jpg": ("failed", "hardlink"),
        "later.jpg": ("queued", None),
        "out.jpg": ("failed", "hardlink"),
        "abs.jpg": ("failed", "hardlink"),
        "nothing.jpg": ("failed", "hardlink"),
        "doc.txt": ("failed", "unsupported_type"),
        "doc-link.txt": ("failed", "unsupported_type"),
    }


def test_a_gbk_tar_with_its_encoding():
    def build(archive):
        _add(archive, "x", JPEG)

    data = bytearray(_tar(build).getvalue())
    raw = GBK_NAME.encode("gbk")
    data[: len(raw)] = raw  # the name field, as an old Windows tar writes it
    header = bytes(data[:512])
    checksum = sum(header[:148]) + 8 * 32 + sum(header[156:512])
    data[148:156] = b"%06o\x00 " % checksum
    members = list(iter_archive(io.BytesIO(bytes(data)), "tar", LIMITS, "gbk"))
    assert [m.name for m in members] == [GBK_NAME]
    members = list(iter_archive(io.BytesIO(bytes(data)), "tar", LIMITS))
    assert "%" in members[0].name and members[0].data == JPEG


def test_a_crafted_zip_member_with_a_flagged_name():
    data = crafted_zip([Raw(NAME.encode(), JPEG, flags=UTF8_FLAG)])
    assert [m.name for m in iter_archive(io.BytesIO(data), "zip", LIMITS)] == [NAME]


class _RecordedItems:
    """The items an earlier slice recorded, as BatchStore answers for them."""

    def __init__(self, batch_id: str, items: list[NewItem]) -> None:
        self.batch_id = batch_id
        self.recorded = {item.id: Item(item.id, item.status, item.info()) for item in items}

    def items(self, batch_id, *, start, count):
        ids = [item_id(batch_id, n) for n in range(start, start + count)]
        return [self.recorded[i] for i in ids if i in self.recorded]

    def get_items(self, batch_id, ids):
        return {i: self.recorded[i] for i in ids if i in self.recorded}


def test_a_hard_link_finds_its_target_in_an_earlier_slice():
    earlier = [
        NewItem(item_id("b1", 0), "Fotos/a.jpg", input_key="pack0", input_range=(0, 9)),
        NewItem(item_id("b1", 1), "Fotos/notes.txt", error={"code": "unsupported_type"}),
    ]
    links = _LinkTargets(_RecordedItems("b1", earlier), "b1", first=128)
    members = [
        Member(128, "Fotos/b.jpg", link="Fotos/a.jpg"),
        Member(129, "Fotos/c.txt", link="Fotos/notes.txt"),
        Member(130, "Fotos/d.jpg", link="Fotos/gone.jpg"),
    ]
    for member in members:
        links.saw(member)
    items, parts = _block_items("b1", members, "pack1", links)
    assert parts == []
    assert (items[0].status.value, items[0].input_key, items[0].input_range) == (
        "queued",
        "pack0",
        (0, 9),
    )
    assert items[1].error == {"code": "unsupported_type"}
    assert items[2].error["code"] == "hardlink"
