"""Where a batch's source is read: expanding an archive (or an S3 prefix) into items.

The source is read member by member; each image member is uploaded to its own
``inputs/<item_id>/`` key, the items are recorded, and a chunk is dispatched as soon as
``BATCH_CHUNK`` items are queued, so workers start on the first chunk while later members are
still being read. Archive limits and a corrupt archive end the batch ``failed``; what was read
before still runs.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

from shared import keys
from shared.archives import (
    ArchiveLimits,
    Budget,
    Member,
    iter_archive,
    looks_like_archive,
    safe_name,
)
from shared.batches import Batch, BatchStore, NewItem, item_id
from shared.errors import (
    ArchiveLimitExceeded,
    CorruptArchive,
    FeatureMapsError,
    NotFound,
    RefusedMember,
)
from shared.imaging import sniff_format
from shared.storage import ObjectStore
from worker.batches import IO_THREADS, Dispatch, Finalize, batch_store
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)

# Archives up to this size are spooled in memory; larger ones go to an unnamed temp file.
SPOOL_MEMORY_BYTES = 32 * 1024 * 1024


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
            with SourceMembers(ctx, batch, limits) as members:
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


class SourceMembers:
    """``with SourceMembers(ctx, batch, limits) as members``: the source's members, with
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
