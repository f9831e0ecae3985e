"""Batches on the worker side: expanding a source into items, running chunks of items, and
finalizing the batch. Plain functions that the thin tasks in ``worker/batch_tasks.py`` call.

Expansion reads the source member by member (an archive from storage as a stream, or every
key under an S3 prefix), uploads each image member to its own ``inputs/<item_id>/`` key,
records the items and dispatches a chunk task as soon as ``BATCH_CHUNK`` items are queued, so
workers start on the first chunk while later members are still being read.

A chunk requests all its inputs in parallel, runs them through the model in tensor batches
(:func:`worker.pipeline.process_images`; on the CPU in slices of ``CPU_MODEL_BATCH``, each
starting as soon as its inputs are in, while the previous slice's outputs upload), and
records all outcomes in one atomic step. Whoever records the batch's last outcome writes the
manifest and the bundle of figures (``BatchStore`` makes that exactly one caller), and then,
unless ``KEEP_INPUTS``, deletes the uploaded archive and the items' expanded inputs: no item
can run again once the batch is complete.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import threading
import zipfile
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from shared import keys
from shared.archives import (
    ArchiveLimits,
    Budget,
    Member,
    iter_archive,
    looks_like_archive,
    safe_name,
)
from shared.batches import Batch, BatchStore, ItemStatus, NewItem, item_id
from shared.errors import (
    ArchiveLimitExceeded,
    CorruptArchive,
    FeatureMapsError,
    NotFound,
    RefusedMember,
    StorageUnavailable,
)
from shared.imaging import sniff_format
from shared.options import JobOptions
from shared.storage import MIN_PART_SIZE, ObjectStore
from worker import metrics
from worker.execute import upload_outputs
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)

# Storage round trips overlap well; the model pass itself uses torch's own threads.
IO_THREADS = 8
# Archives up to this size are spooled in memory; larger ones go to an unnamed temp file.
SPOOL_MEMORY_BYTES = 32 * 1024 * 1024
MANIFEST_PAGE = 256

# How work is handed on: in a worker, tasks sent by name (worker/batch_tasks.py); in tests
# and benchmarks, plain calls.
Dispatch = Callable[[str, list[str]], None]
Finalize = Callable[[str], None]


def batch_store(ctx: WorkerContext) -> BatchStore:
    return BatchStore(ctx.redis, ttl_s=ctx.settings.job_ttl_s)


# -- expansion ---------------------------------------------------------------------------


def expand_batch(ctx: WorkerContext, batch_id: str, dispatch: Dispatch, finalize: Finalize) -> str:
    """Turn the batch's source into items and dispatch them in chunks; returns the batch's
    status afterwards. Archive limits and a corrupt archive end it ``failed``; storage errors
    propagate for the task to retry (items already created are found again by id)."""
    store = batch_store(ctx)
    outcome = store.begin_expansion(batch_id)
    if outcome != "ok":
        log.info("batch %s not expanded: %s", batch_id, outcome)
        return _end_expansion(store, batch_id, None, finalize)
    batch = store.get(batch_id)
    limits = ArchiveLimits.from_settings(ctx.settings)
    error: dict[str, str] | None = None
    with ThreadPoolExecutor(IO_THREADS) as pool:
        expander = _Expander(ctx, store, batch_id, dispatch, pool)
        try:
            with _open_members(ctx, batch, limits) as members:
                for member in members:
                    if not expander.add(member):
                        break
        except (ArchiveLimitExceeded, CorruptArchive) as exc:
            log.info("batch %s: expansion stopped: %s", batch_id, exc.message)
            error = exc.to_dict()
        except NotFound as exc:
            error = {"code": "source_missing", "message": exc.message}
        finally:
            # What was read before a limit or an error still runs ("items already
            # dispatched keep going"); a storage error propagates after this.
            expander.flush()
    return _end_expansion(store, batch_id, error, finalize)


def fail_expansion(
    ctx: WorkerContext, batch_id: str, code: str, message: str, finalize: Finalize
) -> str:
    """End an expansion that cannot go on (storage gone for good, time limit, a bug)."""
    error = {"code": code, "message": message}
    return _end_expansion(batch_store(ctx), batch_id, error, finalize)


def _end_expansion(
    store: BatchStore, batch_id: str, error: dict[str, str] | None, finalize: Finalize
) -> str:
    if store.end_expansion(batch_id, error):
        finalize(batch_id)
    return store.get(batch_id).status.value


class _Expander:
    """Collects members into items; uploads inputs and dispatches chunk by chunk."""

    def __init__(
        self,
        ctx: WorkerContext,
        store: BatchStore,
        batch_id: str,
        dispatch: Dispatch,
        pool: ThreadPoolExecutor,
    ) -> None:
        self.ctx = ctx
        self.store = store
        self.batch_id = batch_id
        self.dispatch = dispatch
        self.pool = pool
        self.chunk = ctx.settings.batch_chunk
        self.pending: list[tuple[NewItem, bytes | None]] = []
        self.queued_pending = 0
        self.canceled = False

    def add(self, member: Member) -> bool:
        """Take one member; False once the batch was canceled (stop reading)."""
        self.pending.append(_new_item(self.batch_id, member))
        if self.pending[-1][1] is not None:
            self.queued_pending += 1
        if self.queued_pending >= self.chunk:
            self.flush()
        return not self.canceled

    def flush(self) -> None:
        if not self.pending:
            return
        pending, self.pending, self.queued_pending = self.pending, [], 0
        uploads = [(item, data) for item, data in pending if data is not None]
        list(self.pool.map(lambda pair: self._upload(*pair), uploads))
        status, queued = self.store.add_items(self.batch_id, [item for item, _ in pending])
        self.canceled = status == "canceled"
        for start in range(0, len(queued), self.chunk):
            self.dispatch(self.batch_id, queued[start : start + self.chunk])

    def _upload(self, item: NewItem, data: bytes) -> None:
        if item.input_key is None:  # _new_item gives every member with data an input key
            raise ValueError(f"item {item.id} has data but no input key")
        self.ctx.store.put_bytes(item.input_key, data, "application/octet-stream")


def _new_item(batch_id: str, member: Member) -> tuple[NewItem, bytes | None]:
    new_id = item_id(batch_id, member.index)
    if member.error is not None or member.data is None:
        error = member.error or RefusedMember("no data", code="bad_name")
        return NewItem(new_id, member.name, error=error.to_dict()), None
    try:
        ext = sniff_format(member.data)
    except FeatureMapsError as exc:
        return NewItem(new_id, member.name, error=exc.to_dict()), None
    return NewItem(new_id, member.name, input_key=keys.input_key(new_id, ext)), member.data


class _open_members:
    """``with _open_members(ctx, batch, limits) as members``: the source's members, with
    whatever was opened for them closed afterwards."""

    def __init__(self, ctx: WorkerContext, batch: Batch, limits: ArchiveLimits) -> None:
        self.ctx = ctx
        self.source = batch.source
        self.limits = limits
        self._closers: list[Callable[[], None]] = []

    def __enter__(self) -> Iterator[Member]:
        source = self.source
        if source["kind"] == "s3":
            bucket = ObjectStore(
                self.ctx.store.client, source["bucket"], public_client=self.ctx.store.public_client
            )
            return iter_prefix(bucket, source["prefix"], self.limits)
        reader = self.ctx.store.open(source["key"])
        self._closers.append(reader.close)
        if source["archive"] != "zip":
            return iter_archive(reader, source["archive"], self.limits)
        # A zip's directory is at its end: spool the archive (not its members) to read it.
        spool = tempfile.SpooledTemporaryFile(max_size=SPOOL_MEMORY_BYTES)
        self._closers.append(spool.close)
        shutil.copyfileobj(reader, spool, 1024 * 1024)
        spool.seek(0)
        return iter_archive(spool, "zip", self.limits)  # type: ignore[arg-type]

    def __exit__(self, *_exc: object) -> None:
        for close in reversed(self._closers):
            close()


def iter_prefix(bucket: ObjectStore, prefix: str, limits: ArchiveLimits) -> Iterator[Member]:
    """Every object under ``prefix`` as a member, named relative to the prefix, under the
    same limits and refusals as an archive's members."""
    budget = Budget(limits)
    for index, key in enumerate(bucket.list_keys(prefix)):
        budget.count_member()
        raw = key[len(prefix) :]
        try:
            name = safe_name(raw)
            if looks_like_archive(name):
                raise RefusedMember(
                    f"{raw!r} is an archive itself; not opened", code="nested_archive"
                )
        except RefusedMember as exc:
            yield Member(index, raw, error=exc)
            continue
        with bucket.open(key) as reader:
            if reader.size is not None:
                budget.check_declared(raw, reader.size)
            data = budget.read_member(raw, reader, lambda _size: None)
        if looks_like_archive(name, data[:512]):
            error = RefusedMember(
                f"{raw!r} is an archive itself; not opened", code="nested_archive"
            )
            yield Member(index, raw, error=error)
            continue
        yield Member(index, raw, data=data)


# -- chunks ------------------------------------------------------------------------------


def run_chunk(
    ctx: WorkerContext, batch_id: str, ids: list[str], *, token: str, finalize: Finalize
) -> int:
    """Process the chunk's items that are still queued (or were started by this same
    delivery); returns how many were processed. Storage errors propagate for a retry."""
    store = batch_store(ctx)
    started = store.start_items(batch_id, ids, token=token)
    if not started:
        return 0
    batch = store.get(batch_id)
    options = JobOptions.from_mapping(batch.options)
    items = store.get_items(batch_id, started)
    step = _model_slice(ctx, len(started))
    with ThreadPoolExecutor(IO_THREADS) as pool:
        # Every input is requested at once; a slice goes through the model as soon as its
        # own inputs are in, and its outputs upload while the next slice computes.
        downloads = [pool.submit(_download, ctx, items[i].info["input_key"]) for i in started]
        uploads, results = [], []
        for start in range(0, len(started), step):
            part = started[start : start + step]
            inputs = [download.result() for download in downloads[start : start + step]]
            part_results = _process(ctx, inputs, options)
            results += part_results
            uploads += [
                pool.submit(_store_outcome, ctx, i, items[i].info, result)
                for i, result in zip(part, part_results, strict=True)
            ]
        outcomes = [upload.result() for upload in uploads]
    metrics.chunk_done(results)
    if store.finish_items(batch_id, outcomes):
        finalize(batch_id)
    ctx.jobs_done += len(started)
    return len(started)


def fail_chunk(
    ctx: WorkerContext,
    batch_id: str,
    ids: list[str],
    *,
    token: str,
    code: str,
    message: str,
    finalize: Finalize,
) -> None:
    """End the chunk's items that this delivery holds as failed (retries exhausted, time
    limit, a bug): one broken chunk must not leave its batch running for ever."""
    store = batch_store(ctx)
    started = store.start_items(batch_id, ids, token=token)
    items = store.get_items(batch_id, started)
    error = {"code": code, "message": message}
    outcomes = [(i, ItemStatus.FAILED, {**items[i].info, "error": error}) for i in started]
    metrics.images_failed("batch", code, len(outcomes))
    if outcomes and store.finish_items(batch_id, outcomes):
        finalize(batch_id)


def _model_slice(ctx: WorkerContext, count: int) -> int:
    """Images per model pass: the pipeline's CPU slice, or the whole chunk on a GPU."""
    from worker.pipeline import CPU_MODEL_BATCH

    return count if ctx.loaded.device.type == "cuda" else CPU_MODEL_BATCH


def _download(ctx: WorkerContext, key: str) -> bytes | FeatureMapsError:
    try:
        with metrics.timed("fetch"):
            return ctx.store.get_bytes(key)
    except NotFound as exc:
        return FeatureMapsError(f"the input is gone from storage: {exc.message}", code="lost")


def _process(
    ctx: WorkerContext, inputs: list[bytes | FeatureMapsError], options: JobOptions
) -> list[Any]:
    from worker.pipeline import process_images

    max_pixels = ctx.settings.max_image_pixels
    present = [i for i, data in enumerate(inputs) if isinstance(data, bytes)]
    results: list[Any] = list(inputs)
    try:
        batch_results = process_images(
            ctx.loaded, [inputs[i] for i in present], options, max_pixels=max_pixels
        )
    except (StorageUnavailable, MemoryError):
        raise
    except Exception:
        # One image that breaks the batched pass must not fail the others: run them one by
        # one so only the culprit fails.
        log.exception("batched pass failed; running the chunk's images one at a time")
        batch_results = [_process_one(ctx, inputs[i], options) for i in present]
    for position, result in zip(present, batch_results, strict=True):
        results[position] = result
    return results


def _process_one(ctx: WorkerContext, data: Any, options: JobOptions) -> Any:
    from worker.pipeline import process_images

    try:
        (result,) = process_images(
            ctx.loaded, [data], options, max_pixels=ctx.settings.max_image_pixels
        )
    except Exception as exc:
        log.exception("image failed on its own")
        return FeatureMapsError(f"{type(exc).__name__}: {exc}", code="internal_error")
    return result


# What an item's record keeps of its stored outputs (the items page presigns these).
_ITEM_KEYS = ("figure_key", "thumbnail_key", "manifest_key")


def _store_outcome(
    ctx: WorkerContext, item: str, info: dict, result: Any
) -> tuple[str, ItemStatus, dict]:
    if isinstance(result, FeatureMapsError):
        return item, ItemStatus.FAILED, {**info, "error": result.to_dict()}
    stored = upload_outputs(ctx, item, result, with_input_preview=False)
    kept = {k: stored[k] for k in _ITEM_KEYS if k in stored}
    return item, ItemStatus.SUCCEEDED, {**info, **kept}


# -- finalize ----------------------------------------------------------------------------


def finalize_batch(ctx: WorkerContext, batch_id: str) -> str:
    """Write ``manifest.jsonl`` (one line per member) and ``results.zip`` (every figure),
    each streamed into storage, then close the batch; returns its final status."""
    store = batch_store(ctx)
    batch = store.get(batch_id)
    fmt = batch.options.get("format", "jpg")
    lines = _manifest_lines(store, batch_id, fmt)
    manifest_key = keys.batch_manifest_key(batch_id)
    ctx.store.put_stream(
        manifest_key,
        _IterReader(line.encode() for line in lines),
        content_type="application/x-ndjson",
        part_size=MIN_PART_SIZE,
    )
    archive_key = keys.batch_results_key(batch_id)
    _stream_zip(ctx, archive_key, _figures(ctx, store, batch_id, fmt))
    status = store.complete(batch_id, {"manifest_key": manifest_key, "archive_key": archive_key})
    log.info("batch %s finalized: %s", batch_id, status)
    if not ctx.settings.keep_inputs:
        release_batch_inputs(ctx, store, batch)
    return status


def release_batch_inputs(ctx: WorkerContext, store: BatchStore, batch: Batch) -> None:
    """Delete a finalized batch's uploaded archive and its items' inputs; if storage is down
    now, the retention sweep deletes them with the rest of the batch's objects."""
    inputs = [
        item.info["input_key"]
        for item in store.iter_items(batch.id, page=MANIFEST_PAGE)
        if item.info.get("input_key")
    ]
    if batch.source.get("key"):
        inputs.append(batch.source["key"])
    try:
        ctx.store.delete_keys(inputs)
    except FeatureMapsError as exc:
        log.warning("batch %s: inputs not deleted now (retention will): %s", batch.id, exc)


def _manifest_lines(store: BatchStore, batch_id: str, fmt: str) -> Iterator[str]:
    names = _ArcNames(fmt)
    for item in store.iter_items(batch_id, page=MANIFEST_PAGE):
        line: dict[str, Any] = {"item_id": item.id, "name": item.name, "status": item.status}
        if item.status is ItemStatus.SUCCEEDED:
            line["figure"] = names.for_item(item.id, item.name)
            line["figure_key"] = item.info["figure_key"]
            line["manifest_key"] = item.info["manifest_key"]
        if item.info.get("error"):
            line["error"] = item.info["error"]
        yield json.dumps(line) + "\n"


def _figures(
    ctx: WorkerContext, store: BatchStore, batch_id: str, fmt: str
) -> Iterator[tuple[str, bytes]]:
    """(name in results.zip, figure bytes) for every succeeded item, fetched a page at a
    time in parallel so only one page of figures is in memory."""
    names = _ArcNames(fmt)
    succeeded = (i for i in store.iter_items(batch_id) if i.status is ItemStatus.SUCCEEDED)
    with ThreadPoolExecutor(IO_THREADS) as pool:
        for page in _pages(succeeded, IO_THREADS * 4):
            datas = pool.map(lambda i: ctx.store.get_bytes(i.info["figure_key"]), page)
            for item, data in zip(page, datas, strict=True):
                yield names.for_item(item.id, item.name), data


def _pages(items: Iterable, size: int) -> Iterator[list]:
    page: list = []
    for item in items:
        page.append(item)
        if len(page) == size:
            yield page
            page = []
    if page:
        yield page


class _ArcNames:
    """The figure's name inside results.zip: the member's name plus the figure's extension,
    made unique (archives may hold one name twice) and never absolute or climbing."""

    def __init__(self, fmt: str) -> None:
        self.fmt = fmt
        self.seen: set[str] = set()

    def for_item(self, item: str, name: str) -> str:
        try:
            base = safe_name(name)
        except RefusedMember:
            base = item
        arcname = f"figures/{base}.{self.fmt}"
        if arcname in self.seen:
            arcname = f"figures/{base}.{item}.{self.fmt}"
        self.seen.add(arcname)
        return arcname


def _stream_zip(ctx: WorkerContext, key: str, files: Iterator[tuple[str, bytes]]) -> None:
    """Write a zip of ``files`` into storage through a pipe: a thread writes the zip (an
    unseekable stream, so zipfile uses data descriptors), put_stream reads the other end."""
    read_fd, write_fd = os.pipe()
    failure: list[BaseException] = []

    def write() -> None:
        try:
            with (
                os.fdopen(write_fd, "wb") as sink,
                zipfile.ZipFile(sink, "w", zipfile.ZIP_STORED) as archive,
            ):
                for arcname, data in files:
                    archive.writestr(arcname, data)
        except BaseException as exc:  # handed to the caller, which re-raises it
            failure.append(exc)

    writer = threading.Thread(target=write, name=f"zip-{key}", daemon=True)
    writer.start()
    with os.fdopen(read_fd, "rb") as source:
        try:
            ctx.store.put_stream(
                key, source, content_type="application/zip", part_size=MIN_PART_SIZE
            )
        finally:
            # Closing the read end unblocks a writer whose reader gave up.
            source.close()
            writer.join()
    if failure:
        raise failure[0]


class _IterReader:
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
