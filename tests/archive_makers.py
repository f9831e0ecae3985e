"""Archives as people's tools make them, for the tests: zips crafted byte by byte the way
macOS Finder, Archive Utility and Chinese Windows write them (names in raw bytes, with or
without the UTF-8 flag, an Info-ZIP Unicode Path field), and archives made by the real
Info-ZIP ``zip`` and GNU ``tar`` commands (installed by ``make setup`` and ``.ci/run``)."""

from __future__ import annotations

import os
import struct
import subprocess  # nosec B404: runs the archivers the tests compare against
import zlib
from dataclasses import dataclass
from pathlib import Path

UTF8_FLAG = 0x800
# What a user sees in their file manager, and so in the manifest, items and results.
NAME = "Fotos/Straße_Ünïcødé_写真.jpg"
GBK_NAME = "照片/北京_天安门.jpg"


@dataclass(frozen=True)
class Raw:
    """One stored (uncompressed) zip member: its name bytes as written, flags and extra."""

    name: bytes
    data: bytes
    flags: int = 0
    extra: bytes = b""


def crafted_zip(members: list[Raw]) -> bytes:
    """A zip holding ``members`` stored, their names exactly as given."""
    out, central = bytearray(), bytearray()
    for member in members:
        crc, size, offset = zlib.crc32(member.data), len(member.data), len(out)
        fixed = (20, member.flags, 0, 0, 0x21, crc, size, size, len(member.name), len(member.extra))
        out += b"PK\x03\x04" + struct.pack("<5H3L2H", *fixed) + member.name + member.extra
        out += member.data
        central += b"PK\x01\x02" + struct.pack(
            "<6H3L5H2L",
            0x031E,
            *fixed,
            0,
            0,
            0,
            0o100644 << 16,
            offset,
        )
        central += member.name + member.extra
    end = struct.pack("<4H2LH", 0, 0, len(members), len(members), len(central), len(out), 0)
    return bytes(out + central + b"PK\x05\x06" + end)


def unicode_path(header_name: bytes, name: str) -> bytes:
    """An Info-ZIP Unicode Path extra field (0x7075) naming ``name`` for ``header_name``."""
    body = b"\x01" + struct.pack("<L", zlib.crc32(header_name)) + name.encode()
    return struct.pack("<2H", 0x7075, len(body)) + body


def finder_zip(photo: bytes) -> bytes:
    """A folder compressed by macOS: UTF-8 names without the flag, an AppleDouble file
    beside every photo under ``__MACOSX/``, and a ``.DS_Store``."""
    apple_double = b"\x00\x05\x16\x07\x00\x02\x00\x00Mac OS X        " + b"\x00" * 64
    return crafted_zip(
        [
            Raw(NAME.encode(), photo),
            Raw(b"Fotos/.DS_Store", b"\x00\x00\x00\x01Bud1" + b"\x00" * 32),
            Raw(f"__MACOSX/Fotos/._{NAME.split('/')[1]}".encode(), apple_double),
        ]
    )


def windows_gbk_zip(photo: bytes) -> bytes:
    """A folder zipped on Chinese Windows: GBK names without the flag, a ``Thumbs.db`` and a
    ``desktop.ini``; one more name carried by a Unicode Path field, as Info-ZIP writes it."""
    stale = "照片/旧.jpg".encode("gbk")
    return crafted_zip(
        [
            Raw(GBK_NAME.encode("gbk"), photo),
            Raw("照片/Thumbs.db".encode("gbk"), b"\xd0\xcf\x11\xe0" + b"\x00" * 60),
            Raw("照片/desktop.ini".encode("gbk"), b"[.ShellClassInfo]\r\n"),
            Raw(stale, photo, extra=unicode_path(stale, "照片/新年.jpg")),
        ]
    )


def info_zip(folder: Path, out: Path) -> Path:
    """``zip -r`` of ``folder`` (Info-ZIP, as Debian ships it), run from its parent."""
    _run(["zip", "-q", "-r", str(out), folder.name], folder.parent)
    return out


def gnu_tar(folder: Path, out: Path, *, gzip: bool = False) -> Path:
    """``tar -c`` of ``folder`` (GNU tar): a file with two names is stored once, then as a
    hard link to its first name."""
    _run(["tar", "-czf" if gzip else "-cf", str(out), folder.name], folder.parent)
    return out


def photo_folder(root: Path, photo: bytes) -> Path:
    """A folder as a user has it: a photo with a non-ASCII name and a second name for it
    (a hard link), ready for ``info_zip`` or ``gnu_tar``."""
    folder = root / "Fotos"
    folder.mkdir(parents=True)
    first = root / NAME
    first.write_bytes(photo)
    os.link(first, folder / "copy.jpg")
    return folder


def _run(command: list[str], cwd: Path) -> None:
    env = {**os.environ, "LC_ALL": "C.UTF-8"}
    subprocess.run(command, cwd=cwd, env=env, check=True, capture_output=True)  # nosec B603
