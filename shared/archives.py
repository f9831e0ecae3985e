"""Reading user archives safely, member by member, as a stream.

Nothing is ever extracted to disk and no member name is ever used as a path: a member is its
name (for the manifest) and its bytes (in memory, bounded by ``max_member_bytes``), or the
reason it was refused. ``.tar`` and ``.tar.gz`` are read in tarfile's stream mode (``r|*``)
from wherever the stream stands (a resumed expansion seeks to its last checkpoint);
``.zip`` is read through its central directory (shared/zipdir.py) from a seekable file,
in practice a ranged reader over the object (:meth:`shared.storage.ObjectStore.open_ranged`),
and can be planned in shards that are read independently.

Names are decoded as shared/member_names.py says (UTF-8, a zip's Unicode Path field, the
batch's ``archive_encoding``). The metadata files macOS and Windows add (``__MACOSX/``,
``._*``, ``.DS_Store``, ``Thumbs.db``, ``desktop.ini``) are never read: the member carries
its skip reason and becomes a ``skipped`` item. A tar hard link carries the name of the
earlier member it links to (``link``); whoever numbers the items resolves it
(worker/batches/expand.py).

Per member, without stopping the archive (a failed item with this code):

    absolute_path, path_traversal, bad_name    a name that could escape a directory
    symlink, special_file                      anything but a regular file or a hard link
    hardlink                                   a hard link whose target is unsafe, or not
                                               an earlier member of the archive
    encrypted                                  an encrypted zip member
    nested_archive                             an archive inside the archive (never opened)
    corrupt_member                             a zip member whose data fails its CRC

Limits that end the whole expansion (:class:`shared.errors.ArchiveLimitExceeded`):

    archive_too_many_members    more than ``max_members`` entries
    archive_member_too_large    one member over ``max_member_bytes``
    archive_too_large           members over ``max_total_bytes`` in all
    archive_bomb                uncompressed / compressed over ``max_ratio``

A broken archive ends it too, as :class:`shared.errors.CorruptArchive`.
"""

from __future__ import annotations

import io
import re
import stat
import tarfile
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any

from shared.errors import (
    ABSOLUTE_PATH,
    BAD_NAME,
    ENCRYPTED,
    HARDLINK,
    NESTED_ARCHIVE,
    PATH_TRAVERSAL,
    SPECIAL_FILE,
    SYMLINK,
    ArchiveBomb,
    ArchiveMemberTooLarge,
    ArchiveTooLarge,
    ArchiveTooManyMembers,
    CorruptArchive,
    FeatureMapsError,
    RefusedMember,
    UnsupportedType,
)
from shared.member_names import skip_reason, tar_name
from shared.zipdir import Directory, Entry, find_directory, iter_entries, read_entry

ARCHIVE_KINDS = ("zip", "tar", "tar.gz")
# Storage extension of the uploaded source for each kind.
SOURCE_EXTENSIONS = {"zip": "zip", "tar": "tar", "tar.gz": "tar.gz"}
# The compression ratio is judged only once this much has been inflated: a few kilobytes of
# a flat-colour image legitimately compress a thousandfold.
RATIO_FLOOR_BYTES = 1024 * 1024
READ_BLOCK = 256 * 1024
# How many bytes of an upload to look at before deciding what archive it is.
SNIFF_BYTES = 512
_NESTED_EXTENSIONS = (
    ".zip",
    ".tar",
    ".tgz",
    ".gz",
    ".bz2",
    ".tbz2",
    ".xz",
    ".txz",
    ".zst",
    ".7z",
    ".rar",
    ".jar",
)
_NESTED_MAGIC = (b"PK\x03\x04", b"PK\x05\x06", b"\x1f\x8b", b"BZh", b"\xfd7zXZ\x00", b"7z\xbc\xaf")
_DRIVE = re.compile(r"^[A-Za-z]:")


@dataclass(frozen=True)
class ArchiveLimits:
    max_members: int
    max_total_bytes: int
    max_member_bytes: int
    max_ratio: float

    @classmethod
    def from_settings(cls, settings: Any) -> ArchiveLimits:
        return cls(
            max_members=settings.max_archive_members,
            max_total_bytes=settings.max_archive_bytes,
            max_member_bytes=settings.max_archive_member_bytes,
            max_ratio=settings.max_compression_ratio,
        )


@dataclass(frozen=True)
class Member:
    """One archive entry that is a file: its bytes, why it was refused, why it is skipped,
    or the earlier member it is a hard link to (exactly one of them)."""

    index: int
    name: str
    data: bytes | None = None
    error: FeatureMapsError | None = None
    skipped: dict[str, str] | None = None
    link: str | None = None


def sniff_archive(head: bytes, filename: str = "") -> str:
    """The archive kind of an upload, from its first bytes (the name only breaks a tie)."""
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        return "zip"
    if head.startswith(b"\x1f\x8b"):
        return "tar.gz"
    if len(head) >= 262 and head[257:262] == b"ustar":
        return "tar"
    if filename.lower().endswith(".tar") and len(head) >= 512 and _is_tar_header(head[:512]):
        return "tar"
    raise UnsupportedType(
        "not an accepted archive (accepted: .zip, .tar, .tar.gz/.tgz, judged by content)"
    )


def safe_name(raw: str) -> str:
    """The member's name normalised (``./a//b`` → ``a/b``), or :class:`RefusedMember` for a
    name that is absolute, climbs out with ``..``, or is empty or holds a NUL."""
    name = raw.replace("\\", "/")
    if name.startswith("/") or _DRIVE.match(name):
        raise RefusedMember(f"absolute path {raw!r} refused", code=ABSOLUTE_PATH)
    parts = [part for part in name.split("/") if part not in ("", ".")]
    if ".." in parts:
        raise RefusedMember(f"path {raw!r} climbs out with '..'; refused", code=PATH_TRAVERSAL)
    if not parts or "\x00" in name:
        raise RefusedMember(f"member name {raw!r} is not usable", code=BAD_NAME)
    return "/".join(parts)


def looks_like_archive(name: str, head: bytes = b"") -> bool:
    if name.lower().endswith(_NESTED_EXTENSIONS):
        return True
    return head.startswith(_NESTED_MAGIC) or (len(head) >= 262 and head[257:262] == b"ustar")


class Budget:
    """Counts members and inflated bytes against the limits; raises when one is crossed."""

    def __init__(self, limits: ArchiveLimits) -> None:
        self.limits = limits
        self.members = 0
        self.total_bytes = 0

    def count_member(self) -> None:
        self.members += 1
        if self.members > self.limits.max_members:
            raise self.too_many(self.members)

    def check_declared(self, name: str, size: int) -> None:
        if size > self.limits.max_member_bytes:
            raise ArchiveMemberTooLarge(
                f"member {name!r} is {size} bytes, over the limit of "
                f"{self.limits.max_member_bytes} (MAX_ARCHIVE_MEMBER_BYTES); expansion stopped"
            )
        if self.total_bytes + size > self.limits.max_total_bytes:
            raise self.too_large(self.total_bytes + size)

    def add_bytes(self, count: int) -> None:
        self.total_bytes += count
        if self.total_bytes > self.limits.max_total_bytes:
            raise self.too_large(self.total_bytes)

    def check_ratio(self, inflated: int, compressed: int, what: str) -> None:
        if inflated < RATIO_FLOOR_BYTES:
            return
        if inflated > self.limits.max_ratio * max(compressed, 1):
            raise ArchiveBomb(
                f"{what} inflates {inflated} bytes from {compressed}, a ratio over the limit of "
                f"{self.limits.max_ratio:g} (MAX_COMPRESSION_RATIO); expansion stopped"
            )

    def read_member(
        self, name: str, stream: IO[bytes], check_ratio: Callable[[int], None]
    ) -> bytes:
        """All of ``stream``, read in blocks so that no limit is trusted to a declared size;
        ``check_ratio(bytes_so_far)`` raises :class:`ArchiveBomb` as soon as it can tell."""
        blocks: list[bytes] = []
        size = 0
        while block := stream.read(READ_BLOCK):
            size += len(block)
            self.check_declared(name, size)
            check_ratio(size)
            blocks.append(block)
        self.add_bytes(size)
        return b"".join(blocks)

    def too_many(self, members: int) -> ArchiveTooManyMembers:
        return ArchiveTooManyMembers(
            f"the archive has {members} members or more, over the limit of "
            f"{self.limits.max_members} (MAX_ARCHIVE_MEMBERS); expansion stopped"
        )

    def too_large(self, total: int) -> ArchiveTooLarge:
        return ArchiveTooLarge(
            f"the archive's members add up to {total} bytes or more, over the limit of "
            f"{self.limits.max_total_bytes} (MAX_ARCHIVE_BYTES); expansion stopped"
        )


def iter_archive(
    stream: IO[bytes], kind: str, limits: ArchiveLimits, encoding: str | None = None
) -> Iterator[Member]:
    """Every file entry of the archive, in archive order; directories are passed over.

    ``stream`` must be seekable for ``zip``. Limit errors and :class:`CorruptArchive` are
    raised out of the iteration after the members before them were yielded. Hard links are
    yielded unresolved (``link``).
    """
    if kind == "zip":
        yield from _iter_zip(stream, Budget(limits), encoding)
    elif kind in ("tar", "tar.gz"):
        yield from _iter_tar(stream, Budget(limits), encoding)
    else:
        raise UnsupportedType(f"unknown archive kind {kind!r}; one of {', '.join(ARCHIVE_KINDS)}")


def _iter_zip(stream: IO[bytes], budget: Budget, encoding: str | None) -> Iterator[Member]:
    size = stream.seek(0, io.SEEK_END)
    directory, _shards = plan_zip(stream, size, budget.limits, shard_members=None)
    index = 0
    for _offset, entry, _next in iter_entries(stream, directory, encoding=encoding):
        if entry.is_dir():
            continue
        yield zip_member(stream, entry, index, budget)
        index += 1


@dataclass(frozen=True)
class ZipShard:
    """A run of a zip's directory: the entries from byte ``start`` to ``end``, whose
    ``count`` file members are numbered from ``first``."""

    start: int
    end: int
    first: int
    count: int


def plan_zip(
    stream: IO[bytes], size: int, limits: ArchiveLimits, *, shard_members: int | None
) -> tuple[Directory, list[ZipShard]]:
    """The zip's directory, walked once: the member and size limits checked against what it
    declares (before anything is dispatched), and its file members cut into shards of
    ``shard_members`` (one shard when None). Directories are not numbered."""
    directory = find_directory(stream, size)
    budget = Budget(limits)
    if directory.entries > limits.max_members:
        raise budget.too_many(directory.entries)
    shards: list[ZipShard] = []
    start, first, members, declared = directory.start, 0, 0, 0
    for offset, entry, _next in iter_entries(stream, directory):
        budget.count_member()
        if entry.is_dir():
            continue
        if shard_members is not None and members - first == shard_members:
            shards.append(ZipShard(start, offset, first, members - first))
            start, first = offset, members
        declared += entry.file_size
        members += 1
    if declared > limits.max_total_bytes:
        raise budget.too_large(declared)
    shards.append(ZipShard(start, directory.end, first, members - first))
    return directory, shards


def zip_member(stream: IO[bytes], entry: Entry, index: int, budget: Budget) -> Member:
    """The member of directory ``entry`` (numbered ``index``), read from ``stream``, or why it
    is refused; limit errors are raised."""
    raw = entry.name
    mode = entry.external_attr >> 16
    try:
        name = safe_name(raw)
        if skipped := skip_reason(name):
            return Member(index, raw, skipped=skipped)
        if mode and stat.S_ISLNK(mode):
            raise RefusedMember(f"symlink {raw!r} refused", code=SYMLINK)
        if stat.S_IFMT(mode) not in (0, stat.S_IFREG):
            raise RefusedMember(f"{raw!r} is not a regular file; refused", code=SPECIAL_FILE)
        if entry.flags & 0x1:
            raise RefusedMember(f"{raw!r} is encrypted; refused", code=ENCRYPTED)
        if looks_like_archive(name):
            raise nested_refusal(raw)
    except RefusedMember as exc:
        return Member(index, raw, error=exc)
    budget.check_declared(raw, entry.file_size)
    what = f"member {raw!r}"
    budget.check_ratio(entry.file_size, entry.compress_size, what)
    try:
        data = read_entry(
            stream,
            entry,
            entry.file_size,
            lambda size: budget.check_ratio(size, entry.compress_size, what),
        )
    except RefusedMember as exc:
        return Member(index, raw, error=exc)
    budget.add_bytes(len(data))
    if looks_like_archive(name, data[:SNIFF_BYTES]):
        return Member(index, raw, error=nested_refusal(raw))
    return Member(index, raw, data=data)


def _iter_tar(stream: IO[bytes], budget: Budget, encoding: str | None) -> Iterator[Member]:
    for member, _next in iter_tar_from(
        stream, budget, start_index=0, compressed=None, encoding=encoding
    ):
        yield member


def iter_tar_from(
    stream: IO[bytes],
    budget: Budget,
    *,
    start_index: int,
    compressed: Callable[[], int] | None,
    encoding: str | None = None,
) -> Iterator[tuple[Member, int]]:
    """``(member, next_header)`` for every file entry of the (uncompressed) tar stream from
    where ``stream`` stands, which must be a header: a resumed expansion seeks there. Members
    are numbered from ``start_index``; ``next_header`` is the stream offset, relative to where
    it started, of the header after the member: where a later resumption seeks to.
    ``compressed()`` tells how many compressed bytes were read so far (for the archive's ratio;
    without it the stream's own bytes count, as for a plain tar or a gzip stream read here).
    Names that are not UTF-8 are read in ``encoding``."""
    counted = _CountingReader(stream)
    so_far = compressed or (lambda: counted.count)
    index = start_index
    mode = "r|" if compressed is not None else "r|*"
    try:
        with tarfile.open(
            fileobj=counted, mode=mode, encoding="utf-8", errors="surrogateescape"
        ) as archive:
            for info in archive:
                budget.count_member()
                if info.isdir():
                    continue
                member = _tar_member(archive, info, index, budget, so_far, encoding)
                yield member, archive.offset
                index += 1
    except (tarfile.TarError, zlib.error, EOFError, OSError) as exc:
        raise CorruptArchive(f"the tar archive cannot be read: {exc}") from exc


def _tar_member(
    archive: tarfile.TarFile,
    info: tarfile.TarInfo,
    index: int,
    budget: Budget,
    compressed: Callable[[], int],
    encoding: str | None,
) -> Member:
    raw = tar_name(info.name, encoding)
    try:
        name = safe_name(raw)
        if skipped := skip_reason(name):
            return Member(index, raw, skipped=skipped)
        if info.issym():
            raise RefusedMember(f"symlink {raw!r} → {info.linkname!r} refused", code=SYMLINK)
        if info.islnk():
            return Member(index, raw, link=_link_target(raw, tar_name(info.linkname, encoding)))
        if not info.isreg():
            raise RefusedMember(f"{raw!r} is not a regular file; refused", code=SPECIAL_FILE)
        if looks_like_archive(name):
            raise nested_refusal(raw)
    except RefusedMember as exc:
        return Member(index, raw, error=exc)
    budget.check_declared(raw, info.size)
    member_stream = archive.extractfile(info)
    if member_stream is None:  # isreg() was checked; tarfile returns None only otherwise
        return Member(index, raw, error=RefusedMember(f"{raw!r} has no data", code=BAD_NAME))
    # The whole stream's inflated bytes against the compressed bytes read so far.
    data = budget.read_member(
        raw,
        member_stream,
        lambda size: budget.check_ratio(budget.total_bytes + size, compressed(), "the archive"),
    )
    if looks_like_archive(name, data[:SNIFF_BYTES]):
        return Member(index, raw, error=nested_refusal(raw))
    return Member(index, raw, data=data)


def _link_target(raw: str, target: str) -> str:
    """The normalised name of a hard link's target; :class:`RefusedMember` when it could
    name anything outside the archive."""
    try:
        return safe_name(target)
    except RefusedMember as exc:
        raise RefusedMember(
            f"hardlink {raw!r} → {target!r} leaves the archive; refused", code=HARDLINK
        ) from exc


def nested_refusal(raw: str) -> RefusedMember:
    """Why a member that is an archive itself is refused (it is never opened)."""
    return RefusedMember(f"{raw!r} is an archive itself; not opened", code=NESTED_ARCHIVE)


def _is_tar_header(block: bytes) -> bool:
    # A pre-POSIX tar has no "ustar" magic; its header checksum still identifies it.
    try:
        stored = int(block[148:156].split(b"\x00", 1)[0].strip() or b"-1", 8)
    except ValueError:
        return False
    return stored == sum(block[:148]) + 8 * 32 + sum(block[156:512])


class _CountingReader:
    """Passes reads through and counts the bytes, for the overall compression ratio."""

    def __init__(self, stream: IO[bytes]) -> None:
        self._stream = stream
        self.count = 0

    def read(self, size: int = -1) -> bytes:
        data = self._stream.read(size)
        self.count += len(data)
        return data
