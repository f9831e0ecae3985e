"""Where an archive member's stored name bytes become the name a user sees, and which
members are the junk that people's tools add (skipped, never processed).

Zip names, in order: the language-encoding flag (bit 11) means UTF-8; an Info-ZIP Unicode
Path extra field (0x7075) whose CRC matches the header name gives the UTF-8 name; an
unflagged name that is valid UTF-8 is UTF-8 (macOS writes it so); else the batch's
``archive_encoding`` when given, else CP437 (the zip spec's default). Tar names are UTF-8
(POSIX pax names always are), else ``archive_encoding``. Bytes that the chosen codec cannot
decode become ``%XX`` (two hex digits): stable and readable, never mojibake. docs/design.md
("Archives as people make them") has the rules.
"""

from __future__ import annotations

import codecs
import struct
import zlib

UTF8_FLAG = 0x800
UNICODE_PATH_EXTRA = 0x7075
_ESCAPE = "featuremaps.percent"
# What a skip reason's code is for each kind of junk.
MACOS_METADATA = "macos_metadata"
WINDOWS_METADATA = "windows_metadata"
_WINDOWS_JUNK = ("thumbs.db", "ehthumbs.db", "desktop.ini")


def _percent(exc: UnicodeError) -> tuple[str, int]:
    if not isinstance(exc, UnicodeDecodeError):
        raise exc
    bad = exc.object[exc.start : exc.end]
    return "".join(f"%{byte:02X}" for byte in bad), exc.end


codecs.register_error(_ESCAPE, _percent)


def decode(raw: bytes, encoding: str) -> str:
    """``raw`` in ``encoding``; undecodable bytes become ``%XX``."""
    return raw.decode(encoding, errors=_ESCAPE)


def zip_name(raw: bytes, flags: int, extra: bytes, encoding: str | None = None) -> str:
    """The name of a zip entry from its header's name bytes, flags and extra field."""
    if flags & UTF8_FLAG:
        return decode(raw, "utf-8")
    unicode_path = _unicode_path(raw, extra)
    if unicode_path is not None:
        return unicode_path
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return decode(raw, encoding or "cp437")


def tar_name(name: str, encoding: str | None = None) -> str:
    """The name of a tar member that tarfile decoded as UTF-8 with ``surrogateescape``."""
    raw = name.encode("utf-8", "surrogateescape")
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return decode(raw, encoding or "utf-8")


def _unicode_path(raw: bytes, extra: bytes) -> str | None:
    """The UTF-8 name of an Info-ZIP Unicode Path field (version 1) whose CRC-32 is that of
    the header's name, as the spec asks; None when there is none or it is stale."""
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<2H", extra, at)
        body = extra[at + 4 : at + 4 + length]
        at += 4 + length
        if kind != UNICODE_PATH_EXTRA or len(body) < 5 or body[0] != 1:
            continue
        (crc,) = struct.unpack_from("<L", body, 1)
        if crc != zlib.crc32(raw):
            return None
        try:
            return body[5:].decode("utf-8")
        except UnicodeDecodeError:
            return None
    return None


def skip_reason(name: str) -> dict[str, str] | None:
    """Why member ``name`` (already normalised) is skipped: the metadata files macOS and
    Windows put beside a user's files; None for anything else."""
    parts = name.split("/")
    base = parts[-1]
    if "__MACOSX" in parts[:-1] or base.startswith("._"):
        code, what = MACOS_METADATA, "a macOS resource fork (AppleDouble) file"
    elif base == ".DS_Store":
        code, what = MACOS_METADATA, "macOS Finder metadata"
    elif base.lower() in _WINDOWS_JUNK:
        code, what = WINDOWS_METADATA, "Windows Explorer metadata"
    else:
        return None
    return {"code": code, "message": f"{base!r} is {what}, not a file anyone sent; skipped"}
