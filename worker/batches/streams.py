"""Generic streaming helpers: iterators of bytes as readable streams, a zip written into
storage through a pipe, and pages of an iterator. Nothing here knows about batches."""

from __future__ import annotations

import os
import threading
import zipfile
from collections.abc import Iterable, Iterator

from shared.storage import MIN_PART_SIZE, ObjectStore


def pages(items: Iterable, size: int) -> Iterator[list]:
    """``items`` in lists of ``size`` (the last one shorter)."""
    page: list = []
    for item in items:
        page.append(item)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page


def stream_zip(
    store: ObjectStore,
    key: str,
    files: Iterator[tuple[str, bytes]],
    *,
    date_time: tuple[int, int, int, int, int, int] = (1980, 1, 1, 0, 0, 0),
) -> None:
    """Write a zip of ``files`` into storage through a pipe: a thread writes the zip (an
    unseekable stream, so zipfile uses data descriptors), put_stream reads the other end.
    Every entry carries ``date_time``, not the clock's, so the same files make the same
    bytes."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def write() -> None:
        try:
            with (
                os.fdopen(write_fd, "wb") as sink,
                zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as archive,
            ):
                for arcname, data in files:
                    entry = zipfile.ZipInfo(arcname, date_time=date_time)
                    entry.external_attr = 0o600 << 16  # what writestr gives a name
                    archive.writestr(entry, data)
        except BaseException as exc:  # handed to the caller, which re-raises it
            failure.append(exc)

    writer = threading.Thread(target=write, name=f"zip-{key}", daemon=True)
    writer.start()
    with os.fdopen(read_fd, "rb") as source:
        try:
            store.put_stream(key, source, content_type="application/zip", part_size=MIN_PART_SIZE)
        finally:
            # Closing the read end unblocks a writer whose reader gave up.
            source.close()
            writer.join()
    if failure:
        raise failure[0]


class IterReader:
    """A readable stream over an iterator of byte strings."""

    def __init__(self, chunks: Iterable[bytes]) -> None:
        self._chunks = iter(chunks)
        self._buffer = bytearray()

    def read(self, size: int = -1) -> bytes:
        while size < 0 or len(self._buffer) < size:
            chunk = next(self._chunks, None)
            if chunk is None:
                break
            self._buffer += chunk
        count = len(self._buffer) if size < 0 else min(size, len(self._buffer))
        data = bytes(self._buffer[:count])
        del self._buffer[:count]
        return data
