"""Where a zip is read through its central directory, by ranged reads, at any size.

A zip's directory sits at its end: the end-of-central-directory record (EOCD, or its zip64
form for more than 65,535 entries or offsets past 4 GiB) says where. :func:`find_directory`
reads it; :func:`iter_entries` walks the directory page by page, yielding one small
:class:`Entry` at a time (never a list of all of them: memory stays bounded at millions of
entries), each with its own byte offset in the directory so that a walk can be cut into
shards and resumed at any entry, its name decoded by the rules of shared/member_names.py
(with a batch's ``archive_encoding``). :func:`read_entry` inflates one member from its local
header, checking its size and CRC as it goes.

Every offset here is absolute in the file: data prepended to the archive (a self-extracting
stub) is accounted for once, in :class:`Directory`.
"""

from __future__ import annotations

import bz2
import struct
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, NamedTuple

from shared.errors import CORRUPT_MEMBER, CorruptArchive, RefusedMember
from shared.member_names import zip_name

_EOCD = struct.Struct("<4s4H2LH")
_EOCD_SIG = b"PK\x05\x06"
_ZIP64_LOCATOR = struct.Struct("<4sLQL")
_ZIP64_LOCATOR_SIG = b"PK\x06\x07"
_ZIP64_EOCD = struct.Struct("<4sQ2H2L4Q")
_ZIP64_EOCD_SIG = b"PK\x06\x06"
_CENTRAL = struct.Struct("<4s4B4H3L5H2L")
_CENTRAL_SIG = b"PK\x01\x02"
_LOCAL = struct.Struct("<4s2B4H3L2H")
_LOCAL_SIG = b"PK\x03\x04"
_ZIP64_EXTRA = 0x0001
_MAX_COMMENT = 0xFFFF
# The directory is read this much at a time.
PAGE_BYTES = 1024 * 1024
READ_BLOCK = 256 * 1024
STORED, DEFLATED, BZIP2 = 0, 8, 12


@dataclass(frozen=True)
class Directory:
    """Where the central directory is (``start``..``end``, absolute) and what it declares."""

    start: int
    end: int
    entries: int
    # Added to every header offset the directory records (data prepended to the archive).
    shift: int


class Entry(NamedTuple):
    """One central-directory entry, as much of it as reading the member needs."""

    name: str
    flags: int
    method: int
    crc: int
    compress_size: int
    file_size: int
    header_offset: int
    external_attr: int

    def is_dir(self) -> bool:
        return self.name.endswith("/")


def find_directory(stream: IO[bytes], size: int) -> Directory:
    """The directory of the zip in ``stream`` (``size`` bytes), from its EOCD record."""
    tail_start = max(0, size - _EOCD.size - _MAX_COMMENT)
    stream.seek(tail_start)
    tail = stream.read(size - tail_start)
    at = tail.rfind(_EOCD_SIG)
    while at >= 0 and len(tail) - at < _EOCD.size:
        at = tail.rfind(_EOCD_SIG, 0, at)
    if at < 0:
        raise CorruptArchive("the zip archive cannot be read: no end of central directory")
    _sig, _disk, _cd_disk, _n_disk, entries, cd_size, cd_offset, _comment = _EOCD.unpack_from(
        tail, at
    )
    eocd_at = tail_start + at
    record_at = eocd_at
    locator_at = at - _ZIP64_LOCATOR.size
    if locator_at >= 0 and tail[locator_at : locator_at + 4] == _ZIP64_LOCATOR_SIG:
        record_at, entries, cd_size, cd_offset = _zip64_record(stream, tail, locator_at, eocd_at)
    start = record_at - cd_size
    if start < 0 or cd_offset > start:
        raise CorruptArchive("the zip archive cannot be read: its central directory is truncated")
    return Directory(start=start, end=record_at, entries=entries, shift=start - cd_offset)


def _zip64_record(
    stream: IO[bytes], tail: bytes, locator_at: int, eocd_at: int
) -> tuple[int, int, int, int]:
    _sig, _disk, _record_offset, _disks = _ZIP64_LOCATOR.unpack_from(tail, locator_at)
    # The record sits right before its locator (its recorded offset ignores prepended data).
    record_at = eocd_at - _ZIP64_LOCATOR.size - _ZIP64_EOCD.size
    stream.seek(record_at)
    record = stream.read(_ZIP64_EOCD.size)
    if len(record) < _ZIP64_EOCD.size or record[:4] != _ZIP64_EOCD_SIG:
        raise CorruptArchive("the zip archive cannot be read: a broken zip64 directory record")
    fields = _ZIP64_EOCD.unpack(record)
    entries, cd_size, cd_offset = fields[7], fields[8], fields[9]
    return record_at, entries, cd_size, cd_offset


def iter_entries(
    stream: IO[bytes],
    directory: Directory,
    start: int | None = None,
    end: int | None = None,
    *,
    encoding: str | None = None,
) -> Iterator[tuple[int, Entry, int]]:
    """``(offset, entry, next_offset)`` for every directory entry from byte ``start`` (an
    entry's offset; default the first) to ``end`` (default the directory's end); names not
    marked UTF-8 and not valid UTF-8 are read in ``encoding`` (default CP437)."""
    position = directory.start if start is None else start
    end = directory.end if end is None else end
    page, page_start = b"", position
    while position < end:
        at = position - page_start
        if at + _CENTRAL.size > len(page) or at + _entry_length(page, at) > len(page):
            page_start = position
            stream.seek(position)
            page = stream.read(min(PAGE_BYTES, end - position))
            at = 0
            if len(page) < _CENTRAL.size or _entry_length(page, 0) > len(page):
                page = _longer_page(stream, position, end, page)
        entry, length = _parse_entry(page, at, directory.shift, encoding)
        yield position, entry, position + length
        position += length


def _longer_page(stream: IO[bytes], position: int, end: int, page: bytes) -> bytes:
    # One entry longer than a page (names, extras and comments reach 192 KiB in all).
    if len(page) < _CENTRAL.size:
        raise CorruptArchive("the zip archive cannot be read: its central directory is cut short")
    stream.seek(position)
    page = stream.read(min(end - position, _entry_length(page, 0)))
    if len(page) < _entry_length(page, 0):
        raise CorruptArchive("the zip archive cannot be read: its central directory is cut short")
    return page


def _entry_length(page: bytes, at: int) -> int:
    name, extra, comment = struct.unpack_from("<3H", page, at + 28)
    return _CENTRAL.size + name + extra + comment


def _parse_entry(page: bytes, at: int, shift: int, encoding: str | None) -> tuple[Entry, int]:
    fields = _CENTRAL.unpack_from(page, at)
    if fields[0] != _CENTRAL_SIG:
        raise CorruptArchive("the zip archive cannot be read: bad central directory entry")
    flags, method, crc, csize, usize = fields[5], fields[6], fields[9], fields[10], fields[11]
    name_len, extra_len, comment_len = fields[12], fields[13], fields[14]
    external_attr, offset = fields[17], fields[18]
    name_at = at + _CENTRAL.size
    raw_name = page[name_at : name_at + name_len]
    extra = page[name_at + name_len : name_at + name_len + extra_len]
    name = zip_name(raw_name, flags, extra, encoding)
    if 0xFFFFFFFF in (csize, usize, offset):
        usize, csize, offset = _zip64_sizes(extra, usize, csize, offset)
    entry = Entry(name, flags, method, crc, csize, usize, offset + shift, external_attr)
    return entry, _CENTRAL.size + name_len + extra_len + comment_len


def _zip64_sizes(extra: bytes, usize: int, csize: int, offset: int) -> tuple[int, int, int]:
    """The sizes and offset that the zip64 extra field holds in place of 0xFFFFFFFF ones."""
    at = 0
    while at + 4 <= len(extra):
        kind, length = struct.unpack_from("<2H", extra, at)
        if kind == _ZIP64_EXTRA:
            values = iter(struct.unpack_from(f"<{length // 8}Q", extra, at + 4))
            try:
                usize = next(values) if usize == 0xFFFFFFFF else usize
                csize = next(values) if csize == 0xFFFFFFFF else csize
                offset = next(values) if offset == 0xFFFFFFFF else offset
            except StopIteration as exc:
                raise CorruptArchive(
                    "the zip archive cannot be read: a short zip64 extra field"
                ) from exc
            return usize, csize, offset
        at += 4 + length
    raise CorruptArchive("the zip archive cannot be read: a zip64 entry without its extra field")


def read_entry(
    stream: IO[bytes], entry: Entry, limit: int, progress: Callable[[int], None]
) -> bytes:
    """The member's bytes, inflated from its local header on. ``limit`` caps what is inflated
    (the declared size); ``progress(bytes_so_far)`` may raise to stop early (a bomb).
    :class:`RefusedMember` (``corrupt_member``) when the data is not what the directory says."""
    stream.seek(entry.header_offset)
    header = stream.read(_LOCAL.size)
    if len(header) < _LOCAL.size or header[:4] != _LOCAL_SIG:
        raise _corrupt(entry, "no local header where the directory points")
    name_len, extra_len = _LOCAL.unpack(header)[-2:]
    stream.seek(entry.header_offset + _LOCAL.size + name_len + extra_len)
    inflate = _inflater(entry)
    blocks: list[bytes] = []
    size, crc, left = 0, 0, entry.compress_size
    while True:
        raw = stream.read(min(READ_BLOCK, left)) if left > 0 else b""
        left -= len(raw)
        if not raw and left > 0:
            raise _corrupt(entry, "the archive ends inside it")
        try:
            block = inflate.feed(raw, limit + 1 - size)
        except (zlib.error, OSError, EOFError) as exc:
            raise _corrupt(entry, str(exc)) from exc
        if not block and left == 0:
            break
        size += len(block)
        if size > limit:
            raise _corrupt(entry, f"it inflates past its declared {entry.file_size} bytes")
        progress(size)
        crc = zlib.crc32(block, crc)
        blocks.append(block)
    if size != entry.file_size or crc != entry.crc:
        raise _corrupt(entry, "Bad CRC-32 or size")
    return b"".join(blocks)


class _Inflate:
    """Takes compressed bytes, gives back at most ``room`` inflated bytes per call; what does
    not fit waits for the next call (which may bring no new bytes)."""

    def __init__(self, method: int) -> None:
        self._zlib = zlib.decompressobj(-15) if method == DEFLATED else None
        self._bz2 = bz2.BZ2Decompressor() if method == BZIP2 else None
        self._pending = b""

    def feed(self, raw: bytes, room: int) -> bytes:
        data = self._pending + raw
        if self._zlib is not None:
            block = self._zlib.decompress(data, room)
            self._pending = self._zlib.unconsumed_tail
            return block
        if self._bz2 is not None:
            return b"" if self._bz2.eof else self._bz2.decompress(raw, room)
        self._pending = data[room:]
        return data[:room]


def _inflater(entry: Entry) -> _Inflate:
    if entry.method not in (STORED, DEFLATED, BZIP2):
        raise _corrupt(entry, f"compression method {entry.method} is not supported")
    return _Inflate(entry.method)


def _corrupt(entry: Entry, why: str) -> RefusedMember:
    return RefusedMember(f"member {entry.name!r} cannot be read: {why}", code=CORRUPT_MEMBER)
