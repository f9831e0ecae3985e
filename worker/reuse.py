"""Content-addressed result reuse (docs/design.md "Result reuse").

A result is fully determined by the input's bytes, the options that change the outputs, the
weights' identity and the computation's version; :func:`result_digest` hashes exactly these.
After a job or batch item succeeds, the Redis index ``featuremaps:result:<digest>`` names it
and its output keys, for the record TTL. A later job or item with the same digest gets
server-side copies of those objects under its own keys (in the folder of its own attempt,
shared/keys.py) and a manifest rewritten for its id
(``reused_from``), without a model pass, and becomes the index's source in turn. Each record
thus owns its objects and retention keeps deleting per record: nothing points at an object
that another record's expiry can delete. A copy that finds its source gone (retention got
there first) gives up, and the image is computed as usual.

Inside one chunk the same bytes are computed once (:class:`ChunkReuse`): later copies share
the first one's result, uploaded under their own keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from functools import cache
from importlib.metadata import version
from typing import Any

from redis import Redis

from shared import keys
from shared.errors import FeatureMapsError, NotFound
from shared.options import JobOptions
from shared.records import PREFIX
from shared.storage import ObjectStore
from worker.compute.precision import Precision, resolve
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)

EXACT = Precision("exact", draft_side=None, tf32=False)

# Bump whenever the maps, the figure or any other output of the same inputs changes
# (layers, reduction, rendering, encoding): results of another version are never reused.
COMPUTATION_VERSION = 1
INDEX_PREFIX = f"{PREFIX}:result:"
# Copies are a few small requests each; a GPU's chunk may hold hundreds of items.
COPY_THREADS = 8
# Fields of a stored result (worker.execute.upload_outputs) that name one object each.
_OBJECT_FIELDS = ("figure_key", "thumbnail_key", "input_preview_key", "arrays_key", "scores_key")


def result_digest(
    weights: dict,
    options: JobOptions,
    data: bytes,
    *,
    owner: str = "",
    precision: Precision = EXACT,
) -> str:
    """sha256 over everything that determines the outputs of ``data``, and the owner (token
    name) whose records may share them: results are never reused across owners, whose
    ``reused: true`` would tell one that another sent the same image (docs/security.md).

    ``precision`` is the option as resolved on the worker's device (worker/compute/precision.py):
    ``auto`` is ``exact`` on a CPU and ``fast`` on CUDA, whose outputs differ, so the digest
    names the computation that ran (``auto`` and ``exact`` on a CPU share results), never the
    option as sent."""
    resolved = replace(options, precision=precision.mode)
    identity = {
        "owner": owner,
        "computation": COMPUTATION_VERSION,
        "torch": _installed("torch"),
        "torchvision": _installed("torchvision"),
        "weights": weights,
        "options": resolved.output_identity(),
        "precision": precision.describe(),
        "input_sha256": hashlib.sha256(data).hexdigest(),
    }
    canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()


@cache
def _installed(package: str) -> str:
    """The installed version of ``package``, read once per process: importlib.metadata scans
    the environment's distributions on every call (~0.5 ms), and every item's digest names
    two of them."""
    return version(package)


@dataclass(frozen=True)
class Source:
    """A finished result the index names: its record (job or item) id and stored outputs."""

    record_id: str
    stored: dict[str, Any]


class ResultIndex:
    """digest → the latest record holding that result, expiring with the record's TTL."""

    def __init__(self, redis: Redis, *, ttl_s: int) -> None:
        self.redis = redis
        self.ttl_s = ttl_s

    def find(self, digests: list[str]) -> dict[str, Source]:
        """The sources of those digests that have one (one round trip)."""
        if not digests:
            return {}
        found = self.redis.mget([INDEX_PREFIX + d for d in digests])
        return {
            digest: Source(**json.loads(raw))
            for digest, raw in zip(digests, found, strict=True)
            if raw is not None
        }

    def remember(self, entries: dict[str, tuple[str, dict]]) -> None:
        """Name ``record_id`` as the source of each digest: {digest: (record_id, stored)}."""
        with self.redis.pipeline(transaction=False) as pipe:
            for digest, (record_id, stored) in entries.items():
                kept = {k: v for k, v in stored.items() if k not in ("reused", "reused_from")}
                value = json.dumps({"record_id": record_id, "stored": kept})
                pipe.set(INDEX_PREFIX + digest, value, ex=self.ttl_s)
            pipe.execute()


def result_index(ctx: WorkerContext) -> ResultIndex:
    return ResultIndex(ctx.redis, ttl_s=ctx.settings.job_ttl_s)


def digest_of(
    ctx: WorkerContext, data: Any, options: JobOptions, owner: str, loaded: Any = None
) -> str | None:
    """The input's digest, or None when reuse is off or there are no bytes (a lost input).
    ``loaded``: the model the options name, when the caller has it already."""
    if not ctx.settings.reuse_results or not isinstance(data, bytes):
        return None
    loaded = loaded or ctx.model_for(options, owner)
    precision = resolve(options.precision, loaded.device)
    return result_digest(loaded.weights, options, data, owner=owner, precision=precision)


def copy_result(
    store: ObjectStore, source: Source, target_id: str, *, attempt: str, input_preview: bool
) -> dict | None:
    """Server-side copies of the source's outputs under ``target_id``'s keys in the folder of
    ``attempt``, the manifest (rewritten: ``job_id``, ``reused_from``) last; the target's
    stored result, or None when the source's objects are gone. ``input_preview`` keeps the
    source's input preview."""
    stored = _rekeyed(source, target_id, attempt=attempt, input_preview=input_preview)
    try:
        manifest = json.loads(store.get_bytes(source.stored["manifest_key"]))
        for key in _object_keys(source.stored):
            target = _rekey(key, source, target_id, attempt)
            if input_preview or key != source.stored.get("input_preview_key"):
                store.copy(key, target)
    except NotFound as exc:
        log.info("result of %s is gone (%s); computing %s", source.record_id, exc, target_id)
        return None
    manifest.update(job_id=target_id, reused_from=source.record_id)
    data = json.dumps(manifest, indent=2).encode()
    store.put_bytes(stored["manifest_key"], data, "application/json")
    return {**stored, "reused": True, "reused_from": source.record_id}


def _object_keys(stored: dict) -> list[str]:
    """Every object of a stored result but the manifest."""
    return [stored[f] for f in _OBJECT_FIELDS if stored.get(f)] + stored.get("layer_keys", [])


def _rekeyed(source: Source, target_id: str, *, attempt: str, input_preview: bool) -> dict:
    def rekey(key: str) -> str:
        return _rekey(key, source, target_id, attempt)

    stored = dict(source.stored)
    for name, value in source.stored.items():
        if name.endswith("_key"):
            stored[name] = rekey(value)
    if "layer_keys" in stored:
        stored["layer_keys"] = [rekey(key) for key in stored["layer_keys"]]
    if not input_preview:
        stored.pop("input_preview_key", None)
    return stored


def _rekey(key: str, source: Source, target_id: str, attempt: str) -> str:
    """``key``'s place in the target's folder: its path below the folder of the source's
    manifest (its attempt's, or ``results/<id>/`` for a result written before attempts)."""
    folder = source.stored["manifest_key"].rpartition("/")[0] + "/"
    if not (folder.startswith(keys.results_prefix(source.record_id)) and key.startswith(folder)):
        raise ValueError(f"{key!r} is not under {folder!r}")
    return keys.attempt_dir(target_id, attempt) + key.removeprefix(folder)


@dataclass
class Reused:
    """A chunk item's outcome copied from the index's source (already in storage)."""

    reused_from: str
    stored: dict
    # No pipeline stage ran (worker.metrics reads a result's timings).
    timings: dict = field(default_factory=dict)


@dataclass
class ChunkReuse:
    """Reuse for one batch chunk: the digest of each item, the results this chunk computed
    (so the same bytes go through the model once), and the stored outputs to index once the
    outcomes are recorded."""

    ctx: WorkerContext
    options: JobOptions
    owner: str
    # the model the options name (worker.runtime.WorkerContext.model_for)
    loaded: Any = None
    # the folder of this delivery's outputs (worker.execute.attempt_of): copies go there too
    attempt: str = ""
    digests: dict[str, str] = field(default_factory=dict)
    computed: dict[str, tuple[str, Any]] = field(default_factory=dict)
    stored: dict[str, dict] = field(default_factory=dict)

    def results(self, ids: list[str], inputs: list, compute: Callable[[list], list]) -> list:
        """One slice's results, in order: copied from the index, shared with the same bytes
        computed earlier in this chunk, or ``compute(inputs)`` for the rest."""
        for item, data in zip(ids, inputs, strict=True):
            digest = digest_of(self.ctx, data, self.options, self.owner, self.loaded)
            if digest:
                self.digests[item] = digest
        results: list[Any] = self._copied(ids)
        pending = [p for p, r in enumerate(results) if r is None]
        first: set[str] = set()
        todo = [p for p in pending if self._first(ids[p], first)]
        for p, result in zip(todo, compute([inputs[p] for p in todo]), strict=True):
            results[p] = result
            if ids[p] in self.digests:
                self.computed[self.digests[ids[p]]] = (ids[p], result)
        for p in pending:
            if results[p] is None:
                results[p] = self._shared(self.digests[ids[p]])
        return results

    def _first(self, item: str, first: set[str]) -> bool:
        """Whether this item must be computed (no digest, or the first of its bytes)."""
        digest = self.digests.get(item)
        if digest is None:
            return True
        if digest in self.computed or digest in first:
            return False
        first.add(digest)
        return True

    def _copied(self, ids: list[str]) -> list:
        """Copies of the index's results, made in parallel on threads of their own: the
        chunk's pool is busy with the previous slice's uploads, and the model waits."""
        wanted = {self.digests[i] for i in ids if i in self.digests}
        sources = result_index(self.ctx).find(sorted(wanted - set(self.computed)))
        if self.options.examples:
            # Dataset examples need the item's scores: a result stored without them is
            # computed again (and becomes the index's source, with scores).
            sources = {d: s for d, s in sources.items() if s.stored.get("scores_key")}
        hits = [(p, item) for p, item in enumerate(ids) if self.digests.get(item) in sources]
        results: list[Any] = [None] * len(ids)
        if not hits:
            return results
        with ThreadPoolExecutor(min(len(hits), COPY_THREADS)) as pool:
            copies = {
                position: pool.submit(
                    copy_result,
                    self.ctx.store,
                    sources[self.digests[item]],
                    item,
                    attempt=self.attempt,
                    input_preview=False,
                )
                for position, item in hits
            }
            for position, copy in copies.items():
                stored = copy.result()
                if stored is not None:
                    results[position] = Reused(stored["reused_from"], stored)
        return results

    def _shared(self, digest: str) -> Any:
        origin, result = self.computed[digest]
        if isinstance(result, FeatureMapsError):
            return result  # the same bytes fail the same way
        manifest = {**result.manifest, "reused_from": origin}
        # Its own manifest names the origin; no stage ran for it (worker.metrics).
        return replace(result, manifest=manifest, reused_from=origin, timings={})

    def remember(self, succeeded: list[str]) -> None:
        """Index the stored outputs of the items that were recorded as succeeded."""
        entries = {
            self.digests[item]: (item, self.stored[item])
            for item in succeeded
            if item in self.digests and item in self.stored
        }
        if entries:
            result_index(self.ctx).remember(entries)
