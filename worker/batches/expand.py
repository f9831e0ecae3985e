"""Where a batch's source is read: expanding an archive (or an S3 prefix) into items, in
shards and slices, at any size.

Planning (:func:`expand_batch`) cuts the source into shards and dispatches one
``expand_batch_shard`` task per shard: a zip is planned from its central directory (read by
ranged GETs; the member and size limits are checked against it before anything runs) into
shards of ``EXPAND_SHARD_MEMBERS`` members that run in parallel; a tar, a tar.gz or an S3
prefix is one shard, read as a stream.

A shard (:func:`expand_shard`) reads its members block by block (``BLOCK_ITEMS`` consecutive
member indexes): per block it uploads ONE pack object (the image members' bytes
concatenated), records the block's items, hands their chunks to the scheduler
(shared/schedule.py), and commits its checkpoint (worker/batches/checkpoints.py). After
``EXPAND_SLICE_S``, or at its soft time limit, it sends a continuation of itself that resumes
from that checkpoint: a zip at its next directory entry, a tar at its next header (a tar.gz
through its saved gzip index), a prefix after its last key. The shard that ends last ends
the expansion. Archive limits and a corrupt archive end it ``failed``; what was read before
still runs.

Names are decoded with the batch's ``archive_encoding`` (``source["encoding"]``); junk
members become ``skipped`` items. A tar hard link becomes an item on the bytes its target
already has in an input pack (:class:`_LinkTargets`), across slices too.
"""

from __future__ import annotations

import io
import logging
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any

from celery.exceptions import SoftTimeLimitExceeded

from shared import keys
from shared.archives import (
    ArchiveLimits,
    Budget,
    Member,
    iter_tar_from,
    looks_like_archive,
    nested_refusal,
    plan_zip,
    safe_name,
    zip_member,
)
from shared.batches import BLOCK_ITEMS, Batch, BatchStore, NewItem, item_id
from shared.errors import (
    BAD_NAME,
    HARDLINK,
    SOURCE_MISSING,
    ArchiveLimitExceeded,
    CorruptArchive,
    FeatureMapsError,
    NotFound,
    RefusedMember,
)
from shared.imaging import sniff_format
from shared.item_codec import member_index
from shared.leases import UNFENCED, Fence
from shared.member_names import skip_reason
from shared.storage import RANGED_READ_AHEAD, ObjectStore, RangedReader
from shared.zipdir import PAGE_BYTES, Directory, iter_entries
from worker.batches import IO_THREADS, Dispatch, ExpandShard, Finalize
from worker.batches.checkpoints import ExpansionState
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)

# An S3 prefix is listed this many keys at a time.
LIST_PAGE = 1000
# A tar.gz's gzip index gets a seek point every this many bytes, and is saved for the
# continuations every this many inflated bytes (and whenever a shard hands on).
GZIP_SPACING = 32 * 1024 * 1024
GZIP_INDEX_EVERY = 512 * 1024 * 1024
# A hard link's target in an earlier slice is looked for this many item positions at a time.
LINK_PAGE = 64 * BLOCK_ITEMS

# (member, the cursor that resumes right after it)
Positioned = tuple[Member, dict[str, Any]]


def expand_batch(
    ctx: WorkerContext,
    batch_id: str,
    expand_shard_task: ExpandShard,
    finalize: Finalize,
) -> str:
    """Plan the batch's expansion and dispatch its shards; returns the batch's status.
    A redelivery finds the plan and dispatches the shards that have not ended again (with a
    newer generation, so that an older copy still running stops)."""
    store = ctx.batches
    outcome = store.begin_expansion(batch_id)
    if outcome != "ok":
        log.info("batch %s not expanded: %s", batch_id, outcome)
        return _end_expansion(store, batch_id, None, finalize)
    state = _state(ctx, batch_id)
    if state.planned():
        shards = state.unfinished()
    else:
        try:
            shards = _planned(ctx, store, state, batch_id)
        except (ArchiveLimitExceeded, CorruptArchive) as exc:
            log.info("batch %s: expansion refused: %s", batch_id, exc.message)
            return _end_expansion(store, batch_id, exc.to_dict(), finalize)
        except NotFound as exc:
            return _end_expansion(store, batch_id, _missing(exc), finalize)
    for shard, gen in shards:
        expand_shard_task(batch_id, shard, gen)
    return store.get(batch_id).status.value


def _planned(
    ctx: WorkerContext, store: BatchStore, state: ExpansionState, batch_id: str
) -> list[tuple[int, int]]:
    """Plan the expansion, record the plan, and return the shards to dispatch; limits, a
    corrupt archive and a missing source are raised."""
    kind, cursors = _plan(ctx, store.get(batch_id))
    log.info("batch %s: %s source in %d shard(s)", batch_id, kind, len(cursors))
    if not state.plan(kind, cursors):
        return state.unfinished()
    return [(shard, 0) for shard in range(len(cursors))]


def _plan(ctx: WorkerContext, batch: Batch) -> tuple[str, list[dict[str, Any]]]:
    """The source's kind and each shard's first cursor."""
    source = batch.source
    start = {"index": 0, "members": 0, "bytes": 0}
    if source["kind"] == "s3":
        return "s3", [{**start, "after": ""}]
    if source["archive"] != "zip":
        return source["archive"], [{**start, "offset": 0}]
    limits = ArchiveLimits.from_settings(ctx.settings)
    with ctx.store.open_ranged(source["key"], read_ahead=PAGE_BYTES) as reader:
        directory, shards = plan_zip(
            reader, reader.size, limits, shard_members=ctx.settings.expand_shard_members
        )
    return "zip", [
        {"index": s.first, "offset": s.start, "end": s.end, "shift": directory.shift}
        for s in shards
    ]


def expand_shard(
    ctx: WorkerContext,
    batch_id: str,
    shard: int,
    gen: int,
    handoff: tuple[Dispatch, ExpandShard, Finalize],
    *,
    fence: Fence = UNFENCED,
) -> str:
    """Expand one shard from its checkpoint, block by block, until its end, the slice's end
    (then a continuation is sent) or a limit; returns what became of the shard. ``fence``:
    this delivery's lease, which owns the shard's checkpoints once it has claimed them."""
    dispatch, expand_shard_task, finalize = handoff
    store = ctx.batches
    state = _state(ctx, batch_id, owner=fence.gen)
    claim = state.claim(shard, gen)
    if claim.outcome == "done":
        # A redelivery of a task that ended its shard: make sure the expansion ended too.
        return _finish_shard(store, state, batch_id, shard, None, None, finalize)
    if claim.outcome != "ok" or claim.cursor is None:
        log.info("batch %s shard %d (gen %d): %s", batch_id, shard, gen, claim.outcome)
        return claim.outcome
    links = _LinkTargets(store, batch_id, claim.cursor["index"])
    writer = _BlockWriter(ctx, store, state, batch_id, shard, gen, dispatch, links)
    with writer, _ShardSource(ctx, store.get(batch_id), claim.cursor) as source:
        try:
            ended, error = _expand_slice(ctx, source, writer)
        except SoftTimeLimitExceeded:
            # The continuation resumes from the last committed block; what this task learnt
            # of a gzip stream is kept, so that it gets further.
            source.save_if_possible()
            return _hand_on(state, batch_id, shard, gen, expand_shard_task)
        if not ended:
            source.save()
            return _hand_on(state, batch_id, shard, gen, expand_shard_task)
    if writer.stopped == "superseded":
        return writer.stopped
    return _finish_shard(store, state, batch_id, shard, gen, error, finalize)


def _expand_slice(
    ctx: WorkerContext, source: _ShardSource, writer: _BlockWriter
) -> tuple[bool, dict[str, str] | None]:
    """Write the shard's blocks until the slice's time is up; returns whether the shard has
    ended (read to its end, stopped, or stopped by a limit: then with its error)."""
    deadline = time.monotonic() + ctx.settings.expand_slice_s
    try:
        for member, after in source.members():
            ended_block = writer.add(member, after)
            if writer.stopped:
                break
            if ended_block and time.monotonic() > deadline:
                writer.flush()
                return bool(writer.stopped), None
        writer.flush()
    except (ArchiveLimitExceeded, CorruptArchive) as exc:
        log.info("batch %s: expansion stopped: %s", writer.batch_id, exc.message)
        writer.flush()  # what was read before the limit still runs
        return True, exc.to_dict()
    except NotFound as exc:
        return True, _missing(exc)
    return True, None


def fail_shard(
    ctx: WorkerContext, batch_id: str, shard: int, code: str, message: str, finalize: Finalize
) -> str:
    """End a shard that cannot go on (storage gone for good, a bug): the expansion ends failed
    once the other shards have ended."""
    error = {"code": code, "message": message}
    state = _state(ctx, batch_id)
    return _finish_shard(ctx.batches, state, batch_id, shard, None, error, finalize)


def fail_expansion(
    ctx: WorkerContext, batch_id: str, code: str, message: str, finalize: Finalize
) -> str:
    """End an expansion that cannot be planned (storage gone for good, time limit, a bug)."""
    error = {"code": code, "message": message}
    return _end_expansion(ctx.batches, batch_id, error, finalize)


def _hand_on(
    state: ExpansionState, batch_id: str, shard: int, gen: int, expand_shard_task: ExpandShard
) -> str:
    expand_shard_task(batch_id, shard, gen + 1)
    state.handed_on(shard, gen + 1)
    log.info("batch %s shard %d: continued by generation %d", batch_id, shard, gen + 1)
    return "continued"


def _finish_shard(
    store: BatchStore,
    state: ExpansionState,
    batch_id: str,
    shard: int,
    gen: int | None,
    error: dict[str, str] | None,
    finalize: Finalize,
) -> str:
    finish = state.finish(shard, gen, error)
    if not finish.recorded:
        return "superseded"
    if finish.last:
        return _end_expansion(store, batch_id, finish.error, finalize)
    return "shard done"


def _end_expansion(
    store: BatchStore, batch_id: str, error: dict[str, str] | None, finalize: Finalize
) -> str:
    if store.end_expansion(batch_id, error):
        finalize(batch_id)
    return store.get(batch_id).status.value


def _state(ctx: WorkerContext, batch_id: str, *, owner: str = "") -> ExpansionState:
    return ExpansionState(ctx.redis, batch_id, ctx.settings.job_ttl_s, owner=owner)


def _missing(exc: NotFound) -> dict[str, str]:
    return {"code": SOURCE_MISSING, "message": exc.message}


class _BlockWriter:
    """Collects a block's members; at the block's end uploads its pack, records its items,
    hands their chunks to the scheduler and commits the checkpoint, on a thread of its own
    while the next block is read (one block in flight, so checkpoints commit in order).
    ``stopped`` says why the shard must stop (known one block late): the batch was canceled,
    another shard failed the expansion, or a newer task owns the shard."""

    def __init__(
        self,
        ctx: WorkerContext,
        store: BatchStore,
        state: ExpansionState,
        batch_id: str,
        shard: int,
        gen: int,
        dispatch: Dispatch,
        links: _LinkTargets,
    ) -> None:
        self.ctx = ctx
        self.store = store
        self.state = state
        self.batch_id = batch_id
        self.shard = shard
        self.gen = gen
        self.dispatch = dispatch
        self.links = links
        self.members: list[Member] = []
        self.cursor: dict[str, Any] | None = None
        self.stopped = ""
        self._writing = ThreadPoolExecutor(1)
        self._written: Future[None] | None = None

    def __enter__(self) -> _BlockWriter:
        return self

    def __exit__(self, *_exc: object) -> None:
        self._writing.shutdown(wait=True)

    def add(self, member: Member, after: dict[str, Any]) -> bool:
        """Take one member; True when that ended a block (and the block went to be written)."""
        self.links.saw(member)
        self.members.append(member)
        self.cursor = after
        if (member.index + 1) % BLOCK_ITEMS:
            return False
        self._submit()
        return True

    def flush(self) -> None:
        """Write what was collected and wait until every block is written and committed."""
        self._submit()
        self._wait()

    def _submit(self) -> None:
        if not self.members or self.cursor is None:
            return
        members, self.members = self.members, []
        self._wait()
        if not self.stopped:
            self._written = self._writing.submit(self._write, members, self.cursor)

    def _wait(self) -> None:
        written, self._written = self._written, None
        if written is not None:
            written.result()  # a storage error surfaces here, for the task to retry

    def _write(self, members: list[Member], cursor: dict[str, Any]) -> None:
        block = members[0].index // BLOCK_ITEMS
        pack_key = keys.batch_input_pack_key(self.batch_id, block)
        items, parts = _block_items(self.batch_id, members, pack_key, self.links)
        if parts:
            self.ctx.store.put_bytes(pack_key, b"".join(parts))
        status, queued = self.store.add_items(self.batch_id, items)
        if queued:
            self.dispatch(self.batch_id, queued)  # to the scheduler, in chunks
        verdict = self.state.commit(self.shard, self.gen, cursor)
        if status == "canceled":
            self.stopped = self._end("canceled")
        elif verdict == "stop":
            self.stopped = self._end("stopped")
        elif verdict == "superseded":
            self.stopped = "superseded"

    def _end(self, why: str) -> str:
        log.info("batch %s shard %d: %s", self.batch_id, self.shard, why)
        return why


def _block_items(
    batch_id: str, members: list[Member], pack_key: str, links: _LinkTargets | None = None
) -> tuple[list[NewItem], list[bytes]]:
    """The block's items, and the bytes of its image members in pack order. Without
    ``links`` (the shard's, which saw every member as it was read), hard links resolve
    within the block only."""
    if links is None:
        links = _LinkTargets(None, batch_id, 0)
        for member in members:
            links.saw(member)
    here: dict[int, NewItem] = {}
    parts: list[bytes] = []
    offset = 0
    for member in members:
        new_id = item_id(batch_id, member.index)
        if member.skipped is not None:
            here[member.index] = NewItem(new_id, member.name, skip_reason=member.skipped)
        elif member.link is not None:
            here[member.index] = links.resolve(member, here)
        elif member.error is not None or member.data is None:
            error = member.error or RefusedMember("no data", code=BAD_NAME)
            here[member.index] = NewItem(new_id, member.name, error=error.to_dict())
        else:
            try:
                sniff_format(member.data)
            except FeatureMapsError as exc:
                here[member.index] = NewItem(new_id, member.name, error=exc.to_dict())
                continue
            size = len(member.data)
            here[member.index] = NewItem(
                new_id, member.name, input_key=pack_key, input_range=(offset, size)
            )
            parts.append(member.data)
            offset += size
    return list(here.values()), parts


class _LinkTargets:
    """Where a tar hard link's target is: the latest earlier member of that name, whose item
    the link's item copies (the same range of the same input pack, or the same refusal).

    The names this task reads are noted as they are read (in archive order, so a link never
    finds a later member); a target from before the task's first member (an earlier slice)
    is found among the names of the items recorded before it, read once per task and only
    when a link needs them. A link whose target is in no earlier member fails ``hardlink``."""

    def __init__(self, store: BatchStore | None, batch_id: str, first: int) -> None:
        self.store = store
        self.batch_id = batch_id
        self.first = first
        self.names: dict[str, int] = {}
        self.targets: dict[int, int | None] = {}
        self._earlier: dict[str, int] | None = None

    def saw(self, member: Member) -> None:
        if member.link is not None:
            self.targets[member.index] = self.names.get(member.link)
        name = _normalised(member.name)
        if name is not None:
            self.names[name] = member.index

    def resolve(self, link: Member, here: dict[int, NewItem]) -> NewItem:
        """The item of hard link ``link``; ``here`` holds the items of its block so far."""
        new_id = item_id(self.batch_id, link.index)
        target = self.targets.pop(link.index, None)
        if target is None and link.link is not None:
            target = self.earlier().get(link.link)
        info = self._info(target, here) if target is not None else {}
        if info.get("input_key") and info.get("input_range"):
            offset, size = info["input_range"]
            return NewItem(
                new_id, link.name, input_key=info["input_key"], input_range=(offset, size)
            )
        if info.get("error") or info.get("skip_reason"):
            return NewItem(
                new_id, link.name, error=info.get("error"), skip_reason=info.get("skip_reason")
            )
        refused = RefusedMember(
            f"hardlink {link.name!r} → {link.link!r}: no earlier member of the archive has "
            "that name; refused",
            code=HARDLINK,
        )
        return NewItem(new_id, link.name, error=refused.to_dict())

    def earlier(self) -> dict[str, int]:
        """The names of the items before this task's first member (the latest of each)."""
        if self._earlier is None:
            self._earlier = {}
            if self.store is not None and self.first:
                log.info(
                    "batch %s: %d earlier names read for a hard link", self.batch_id, self.first
                )
                for start in range(0, self.first, LINK_PAGE):
                    count = min(LINK_PAGE, self.first - start)
                    for item in self.store.items(self.batch_id, start=start, count=count):
                        name = _normalised(item.name)
                        index = member_index(self.batch_id, item.id)
                        if name is not None and index is not None:
                            self._earlier[name] = index
        return self._earlier

    def _info(self, target: int, here: dict[int, NewItem]) -> dict:
        if target in here:
            return here[target].info()
        if self.store is None:
            return {}
        found = self.store.get_items(self.batch_id, [item_id(self.batch_id, target)])
        item = found.get(item_id(self.batch_id, target))
        return item.info if item is not None else {}


def _normalised(name: str) -> str | None:
    try:
        return safe_name(name)
    except RefusedMember:
        return None


class _ShardSource:
    """``with _ShardSource(ctx, batch, cursor) as source``: the shard's members from its
    cursor (``source.members()``), each with the cursor that resumes after it;
    ``source.save()`` keeps what a continuation needs beyond the cursor (a gzip index)."""

    def __init__(self, ctx: WorkerContext, batch: Batch, cursor: dict[str, Any]) -> None:
        self.ctx = ctx
        self.batch = batch
        self.source = batch.source
        self.cursor = cursor
        self.limits = ArchiveLimits.from_settings(ctx.settings)
        self._readers: list[Any] = []
        self._gzip: Any = None

    def __enter__(self) -> _ShardSource:
        return self

    def __exit__(self, *_exc: object) -> None:
        for reader in reversed(self._readers):
            reader.close()

    def members(self) -> Iterator[Positioned]:
        if self.source["kind"] == "s3":
            return self._prefix_members()
        if self.source["archive"] == "zip":
            return self._zip_members()
        return self._tar_members()

    def save(self) -> None:
        if self._gzip is not None:
            _save_gzip_index(self.ctx.store, self.batch.id, self._gzip)

    def save_if_possible(self) -> None:
        """:meth:`save` when the time limit interrupted the reading: a failure only costs the
        continuation time (it inflates from an earlier seek point), so it is logged."""
        try:
            self.save()
        except Exception:
            log.exception("batch %s: gzip index not saved at the time limit", self.batch.id)

    def _open(self, key: str, read_ahead: int = RANGED_READ_AHEAD) -> RangedReader:
        reader = self.ctx.store.open_ranged(key, read_ahead=read_ahead)
        self._readers.append(reader)
        return reader

    def _zip_members(self) -> Iterator[Positioned]:
        cursor = self.cursor
        key = self.source["key"]
        # Two readers: the directory's pages and the members' data are far apart.
        directory_reader = self._open(key, PAGE_BYTES)
        data = self._open(key)
        directory = Directory(
            start=cursor["offset"], end=cursor["end"], entries=0, shift=cursor["shift"]
        )
        budget = Budget(self.limits)  # the counts and sizes were checked when planning
        index = cursor["index"]
        entries = iter_entries(
            directory_reader, directory, cursor["offset"], encoding=self.source.get("encoding")
        )
        for _offset, entry, after in entries:
            if entry.is_dir():
                continue
            member = zip_member(data, entry, index, budget)
            index += 1
            yield member, {**cursor, "offset": after, "index": index}

    def _tar_members(self) -> Iterator[Positioned]:
        cursor = self.cursor
        raw = self._open(self.source["key"])
        stream: Any = raw
        if self.source["archive"] == "tar.gz":
            stream = self._gzip = _open_gzip(self.ctx.store, self.batch.id, raw, cursor["offset"])
            self._readers.append(stream)
        stream.seek(cursor["offset"])
        budget = _budget(self.limits, cursor)
        saved_at = cursor["offset"]
        for member, next_header in iter_tar_from(
            stream,
            budget,
            start_index=cursor["index"],
            compressed=raw.tell,
            encoding=self.source.get("encoding"),
        ):
            offset = cursor["offset"] + next_header
            if self._gzip is not None and offset - saved_at > GZIP_INDEX_EVERY:
                self.save()
                saved_at = offset
            yield member, {**_totals(budget, member.index + 1), "offset": offset}

    def _prefix_members(self) -> Iterator[Positioned]:
        source = self.source
        bucket = ObjectStore(
            self.ctx.store.client, source["bucket"], public_client=self.ctx.store.public_client
        )
        prefix = source["prefix"]
        budget = _budget(self.limits, self.cursor)
        index, after = self.cursor["index"], self.cursor["after"]
        with ThreadPoolExecutor(IO_THREADS) as pool:
            while page := bucket.list_page(prefix, start_after=after, limit=LIST_PAGE):
                # A few objects in flight per thread: memory stays bounded by the member limit.
                for start in range(0, len(page), IO_THREADS):
                    keys_now = page[start : start + IO_THREADS]
                    fetched = pool.map(
                        lambda key: _fetch(bucket, prefix, key, self.limits), keys_now
                    )
                    for key, (raw, outcome) in zip(keys_now, fetched, strict=True):
                        member = _prefix_member(budget, index, raw, outcome)
                        index += 1
                        yield member, {**_totals(budget, index), "after": key}
                after = page[-1]


def _budget(limits: ArchiveLimits, cursor: dict[str, Any]) -> Budget:
    """The limits' budget as the checkpoint left it (a stream's counts carry across slices)."""
    budget = Budget(limits)
    budget.members = cursor["members"]
    budget.total_bytes = cursor["bytes"]
    return budget


def _totals(budget: Budget, index: int) -> dict[str, int]:
    return {"index": index, "members": budget.members, "bytes": budget.total_bytes}


def _fetch(
    bucket: ObjectStore, prefix: str, key: str, limits: ArchiveLimits
) -> tuple[str, bytes | RefusedMember | int | dict[str, str]]:
    """A prefix's object: its bytes, why it is refused or skipped by name alone, or its size
    when that is over the member limit (then it is not read)."""
    raw = key[len(prefix) :]
    try:
        name = safe_name(raw)
        if skipped := skip_reason(name):
            return raw, skipped
        if looks_like_archive(name):
            raise nested_refusal(raw)
    except RefusedMember as exc:
        return raw, exc
    with bucket.open(key) as reader:
        if reader.size is not None and reader.size > limits.max_member_bytes:
            return raw, reader.size
        return raw, reader.read()


def _prefix_member(
    budget: Budget, index: int, raw: str, outcome: bytes | RefusedMember | int | dict[str, str]
) -> Member:
    budget.count_member()
    if isinstance(outcome, RefusedMember):
        return Member(index, raw, error=outcome)
    if isinstance(outcome, dict):
        return Member(index, raw, skipped=outcome)
    if isinstance(outcome, int):
        budget.check_declared(raw, outcome)  # raises: over the member limit
        raise ValueError(f"{raw!r}: size {outcome} passed the member limit check")
    budget.check_declared(raw, len(outcome))
    budget.add_bytes(len(outcome))
    if looks_like_archive(raw, outcome[:512]):
        return Member(index, raw, error=nested_refusal(raw))
    return Member(index, raw, data=outcome)


def _open_gzip(store: ObjectStore, batch_id: str, raw: RangedReader, offset: int) -> Any:
    """The tar.gz's inflated stream, with the seek points an earlier slice saved (without
    them, seeking to ``offset`` inflates from the start: slower, still right)."""
    from indexed_gzip import IndexedGzipFile

    stream = IndexedGzipFile(fileobj=raw, spacing=GZIP_SPACING, auto_build=True)
    if offset:
        try:
            index = store.get_bytes(keys.batch_gzip_index_key(batch_id))
        except NotFound:
            log.warning("batch %s: no gzip index; re-inflating to offset %d", batch_id, offset)
        else:
            stream.import_index(fileobj=io.BytesIO(index))
    return stream


def _save_gzip_index(store: ObjectStore, batch_id: str, stream: Any) -> None:
    buffer = io.BytesIO()
    stream.export_index(fileobj=buffer)
    store.put_bytes(keys.batch_gzip_index_key(batch_id), buffer.getvalue())
