"""The pieces of sharded expansion that need no servers: the ranged reader's buffering, the
zip directory walk (zip64 included) and its shards, and a tar stream resumed at a checkpoint."""

from __future__ import annotations

import io
import random
import tarfile
import zipfile

import pytest

from shared.archives import (
    ArchiveLimits,
    Budget,
    iter_archive,
    iter_tar_from,
    plan_zip,
    zip_member,
)
from shared.errors import ArchiveTooLarge, ArchiveTooManyMembers, NotFound
from shared.storage import RangedReader
from shared.zipdir import find_directory, iter_entries
from worker.batches import expand

LIMITS = ArchiveLimits(
    max_members=1_000_000, max_total_bytes=10**9, max_member_bytes=10**7, max_ratio=200.0
)


class BytesStore:
    """Stands in for ObjectStore.get_range over one object's bytes; counts the GETs."""

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.ranges: list[tuple[int, int]] = []

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        self.ranges.append((offset, length))
        return self.data[offset : offset + length]


def ranged(data: bytes, read_ahead: int = 64) -> tuple[RangedReader, BytesStore]:
    store = BytesStore(data)
    return RangedReader(store, "k", len(data), read_ahead=read_ahead), store  # type: ignore[arg-type]


def test_ranged_reader_reads_seeks_and_buffers():
    data = bytes(range(256)) * 10
    reader, store = ranged(data, read_ahead=100)
    assert reader.read(10) == data[:10]
    assert reader.read(20) == data[10:30]
    assert store.ranges == [(0, 100)]  # served from the read-ahead buffer
    reader.seek(2000)
    assert reader.tell() == 2000
    assert reader.read(300) == data[2000:2300]  # longer than the read-ahead: one GET of it
    assert store.ranges[-1] == (2000, 300)
    reader.seek(-5, io.SEEK_END)
    assert reader.read() == data[-5:]
    assert reader.read(10) == b""
    reader.seek(0)
    assert io.BufferedReader(reader).read() == data
    with pytest.raises(ValueError):
        reader.seek(-1)


def make_zip(names: list[str], *, force_zip64: bool = False) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name in names:
            if name.endswith("/"):
                archive.writestr(name, b"")
                continue
            info = zipfile.ZipInfo(name)
            info.compress_type = zipfile.ZIP_DEFLATED
            with archive.open(info, "w", force_zip64=force_zip64) as member:
                member.write(name.encode() * 3)
    return buffer.getvalue()


def test_directory_walk_matches_zipfile_and_is_cut_in_shards():
    names = ["top/"] + [f"top/{i}.txt" for i in range(300)] + ["more/"] + ["z.txt"]
    data = make_zip(names)
    reader, _ = ranged(data, read_ahead=4096)
    directory, shards = plan_zip(reader, len(data), LIMITS, shard_members=128)
    assert directory.entries == len(names)
    assert [(s.first, s.count) for s in shards] == [(0, 128), (128, 128), (256, 45)]
    assert shards[0].start == directory.start and shards[-1].end == directory.end
    # Each shard read on its own gives exactly its members, numbered densely, in order.
    files = [n for n in names if not n.endswith("/")]
    read = []
    for shard in shards:
        index = shard.first
        for _offset, entry, _next in iter_entries(reader, directory, shard.start, shard.end):
            if entry.is_dir():
                continue
            member = zip_member(reader, entry, index, Budget(LIMITS))
            read.append((member.index, member.name, member.data))
            index += 1
    assert read == [(i, name, name.encode() * 3) for i, name in enumerate(files)]


def test_zip64_directory_with_more_than_65535_entries():
    names = [f"{i}" for i in range(70_000)]
    data = make_zip(names)
    reader, _ = ranged(data, read_ahead=1 << 20)
    directory = find_directory(reader, len(data))
    assert directory.entries == 70_000
    seen = [entry.name for _o, entry, _n in iter_entries(reader, directory)]
    assert seen == names
    members = list(iter_archive(io.BytesIO(data), "zip", LIMITS))
    assert members[-1].index == 69_999 and members[-1].data == b"69999" * 3


def test_zip64_extra_fields_and_prepended_data():
    data = b"#!stub\n" * 100 + make_zip(["a.txt", "b.txt"], force_zip64=True)
    members = list(iter_archive(io.BytesIO(data), "zip", LIMITS))
    assert [(m.name, m.data) for m in members] == [("a.txt", b"a.txt" * 3), ("b.txt", b"b.txt" * 3)]


def test_corrupt_member_and_planning_limits():
    data = bytearray(make_zip(["a.txt", "b.txt"]))
    at = data.index(b"PK\x03\x04") + 30 + len("a.txt")
    data[at + 2] ^= 0xFF
    members = list(iter_archive(io.BytesIO(bytes(data)), "zip", LIMITS))
    assert members[0].error is not None and members[0].error.code == "corrupt_member"
    assert members[1].data == b"b.txt" * 3
    few = ArchiveLimits(max_members=2, max_total_bytes=10**9, max_member_bytes=10**7, max_ratio=200)
    small = ArchiveLimits(max_members=9, max_total_bytes=20, max_member_bytes=10**7, max_ratio=200)
    archive = make_zip(["a.txt", "b.txt", "c.txt"])
    with pytest.raises(ArchiveTooManyMembers):
        plan_zip(io.BytesIO(archive), len(archive), few, shard_members=None)
    with pytest.raises(ArchiveTooLarge):
        plan_zip(io.BytesIO(archive), len(archive), small, shard_members=None)


def make_tar(count: int, *, pax: bool = False) -> bytes:
    buffer = io.BytesIO()
    fmt = tarfile.PAX_FORMAT if pax else tarfile.GNU_FORMAT
    with tarfile.open(fileobj=buffer, mode="w", format=fmt) as archive:
        for i in range(count):
            if i % 10 == 3:
                archive.addfile(_dir(f"dir{i}"))
            name = f"{'long/' * 30 if i % 7 == 0 else ''}m{i}.txt"
            data = f"member {i}".encode() * (i % 5 + 1)
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return buffer.getvalue()


def _dir(name: str) -> tarfile.TarInfo:
    info = tarfile.TarInfo(name)
    info.type = tarfile.DIRTYPE
    return info


@pytest.mark.parametrize("pax", [False, True])
def test_tar_resumed_at_a_checkpoint_reads_each_member_once(pax):
    data = make_tar(40, pax=pax)
    whole = [(m.index, m.name, m.data) for m in iter_archive(io.BytesIO(data), "tar", LIMITS)]
    assert len(whole) == 40
    resumed: list[tuple] = []
    offset, index, budget = 0, 0, Budget(LIMITS)
    # Stop after every 7th member, as a slice would, and resume from the checkpoint.
    while True:
        reader, _ = ranged(data, read_ahead=512)
        reader.seek(offset)
        base, taken = offset, 0
        for member, next_header in iter_tar_from(
            reader, budget, start_index=index, compressed=reader.tell
        ):
            resumed.append((member.index, member.name, member.data))
            offset, index, taken = base + next_header, member.index + 1, taken + 1
            if taken == 7:
                break
        if taken == 0:
            break
    assert resumed == whole
    assert budget.total_bytes == sum(len(d) for _i, _n, d in whole)


class IndexStore:
    """Stands in for the ObjectStore that keeps a tar.gz's gzip index between slices."""

    def __init__(self) -> None:
        self.objects: dict[str, bytes] = {}

    def put_bytes(self, key: str, data: bytes) -> None:
        self.objects[key] = data

    def get_bytes(self, key: str) -> bytes:
        if key not in self.objects:
            raise NotFound(key)
        return self.objects[key]


def test_tar_gz_continuation_seeks_through_the_saved_gzip_index(monkeypatch):
    monkeypatch.setattr(expand, "GZIP_SPACING", 64 * 1024)
    rng = random.Random(5)
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w:gz") as archive:
        for i in range(600):
            data = rng.randbytes(2000)  # incompressible: the gzip stream is ~1.4 MB
            info = tarfile.TarInfo(f"m{i}.bin")
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    data = buffer.getvalue()
    whole = [(m.index, m.name, m.data) for m in iter_archive(io.BytesIO(data), "tar.gz", LIMITS)]
    index_store = IndexStore()
    # The first slice reads 400 members from the start and saves the index.
    raw, _ = ranged(data, read_ahead=32 * 1024)
    stream = expand._open_gzip(index_store, "b1", raw, 0)
    budget = Budget(LIMITS)
    first = []
    for member, next_header in iter_tar_from(stream, budget, start_index=0, compressed=raw.tell):
        first.append((member.index, member.name, member.data))
        offset = next_header
        if len(first) == 400:
            break
    expand._save_gzip_index(index_store, "b1", stream)
    # The continuation seeks there through the index: it never reads the stream's start.
    raw, gets = ranged(data, read_ahead=32 * 1024)
    stream = expand._open_gzip(index_store, "b1", raw, offset)
    stream.seek(offset)
    rest = [
        (member.index, member.name, member.data)
        for member, _next in iter_tar_from(stream, budget, start_index=400, compressed=raw.tell)
    ]
    assert first + rest == whole
    assert min(start for start, _length in gets.ranges) > len(data) // 3
