"""Running one job: the plain function behind the `render_job` task.

It moves the job through the store, fetches the input, and either copies an equal earlier
result (:mod:`worker.reuse`) or calls the pipeline and uploads the outputs, either way into
the folder of this delivery's *attempt* (``results/<id>/<attempt>/``, shared/keys.py): only
the attempt whose fenced ``succeed`` records its keys counts. A delivery that finds its work
handed over deletes its own folder; the one that recorded deletes what earlier attempts left.
Bad input fails the job at once with its code; storage errors propagate as
:class:`StorageUnavailable` for the task to retry with backoff. Once the job has ended (and
only then: a retried job still needs it), :func:`release_input` deletes its upload unless
``KEEP_INPUTS``.
"""

from __future__ import annotations

import io
import json
import logging
import secrets
import time
from collections.abc import Callable

import numpy as np

from keeper.restore import delete_spec
from shared import keys
from shared.errors import WORKER_LOST, FeatureMapsError, StorageUnavailable
from shared.jobs import elapsed_ms, now_iso
from shared.leases import UNFENCED, Fence, LeaseLost
from shared.options import JobOptions
from shared.storage import ObjectStore
from worker import metrics, reuse
from worker.runtime import WorkerContext

log = logging.getLogger(__name__)

_CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "svg": "image/svg+xml",
    "pdf": "application/pdf",
}


def run_job(ctx: WorkerContext, job_id: str, fence: Fence = UNFENCED) -> str:
    """Run the job if it is still wanted; returns the status it ended in (or was found in).
    Every move of the record carries ``fence``: once the job was handed over to another
    worker they raise :class:`shared.leases.LeaseLost` and record nothing, and what this
    delivery uploaded is deleted."""
    outcome = ctx.jobs.start(
        job_id,
        worker=ctx.hostname,
        device=ctx.device,
        max_attempts=ctx.settings.max_attempts,
        fence=fence,
    )
    if not outcome.started:
        log.info("job %s not run: %s", job_id, outcome.status)
        if outcome.status == "exhausted":
            metrics.images_failed("job", WORKER_LOST)
        if outcome.status == "canceled":
            # What a holder lost mid-upload after the cancel wrote: no record names it.
            drop_other_attempts(ctx.store, job_id, "")
        return outcome.status
    attempt = attempt_of(fence)
    try:
        status = _run_started(ctx, job_id, attempt, fence)
    except LeaseLost:
        drop_attempt(ctx.store, [job_id], attempt)
        raise
    if status in ("succeeded", "failed") and outcome.attempts > 1:
        drop_other_attempts(ctx.store, job_id, attempt)
    return status


def _run_started(ctx: WorkerContext, job_id: str, attempt: str, fence: Fence) -> str:
    job = ctx.jobs.get(job_id)
    timings = {"queue_ms": elapsed_ms(job.created_at, job.started_at or now_iso())}
    try:
        with metrics.timed("fetch"):
            data = _timed(timings, "download_ms", lambda: ctx.store.get_bytes(job.input_key))
        options = JobOptions.from_mapping(job.options)
        digest = reuse.digest_of(ctx, data, options, job.owner)
        stored = _reused(ctx, job_id, attempt, digest, data, timings) or _computed(
            ctx, job_id, attempt, data, options, timings, fence, job.owner
        )
    except StorageUnavailable:
        raise
    except FeatureMapsError as exc:
        ctx.jobs.fail(job_id, code=exc.code, message=exc.message, timings=timings, fence=fence)
        metrics.images_failed("job", exc.code)
        return "failed"
    if not ctx.jobs.succeed(job_id, result=stored, timings=timings, fence=fence):
        # Canceled while running: leave nothing behind.
        ctx.store.delete_prefix(keys.results_prefix(job_id))
        return ctx.jobs.get(job_id).status.value
    if digest:
        reuse.result_index(ctx).remember({digest: (job_id, stored)})
    ctx.jobs_done += 1
    metrics.image_succeeded("job", timings, reused=stored["reused"])
    return "succeeded"


def attempt_of(fence: Fence) -> str:
    """The folder name of a delivery's outputs: its lease generation (unique for ever), or a
    random name for an unfenced caller (tests, direct calls), which nothing hands over."""
    return f"g{fence.gen}" if fence.gen else f"u{secrets.token_hex(6)}"


def drop_attempt(store: ObjectStore, record_ids: list[str], attempt: str) -> None:
    """Delete what ``attempt`` wrote for these records: its work was handed over, so no
    record names these objects. Best effort: what storage refuses now goes with the record's
    other objects when it expires (worker/retention.py)."""
    for record_id in record_ids:
        try:
            store.delete_prefix(keys.attempt_dir(record_id, attempt))
        except FeatureMapsError as exc:
            log.warning("%s: outputs of attempt %s not deleted now: %s", record_id, attempt, exc)


def drop_other_attempts(store: ObjectStore, record_id: str, attempt: str) -> None:
    """Once ``attempt``'s outputs are recorded (the fenced transition passed, so no other
    attempt can ever be): delete what earlier attempts of the record left (a lost worker's
    partial uploads, a storage retry's); every attempt's when ``attempt`` is ''. Best effort,
    as :func:`drop_attempt`; a writer that was presumed dead and still uploads deletes its
    own folder when its transition fails."""
    own = keys.attempt_dir(record_id, attempt) if attempt else None
    try:
        listed = store.list_keys(keys.results_prefix(record_id))
        left = [k for k in listed if own is None or not k.startswith(own)]
        store.delete_keys(left)
    except FeatureMapsError as exc:
        log.warning("%s: earlier attempts' outputs not deleted now: %s", record_id, exc)


def _computed(
    ctx: WorkerContext,
    job_id: str,
    attempt: str,
    data: bytes,
    options: JobOptions,
    timings: dict,
    fence: Fence,
    owner: str,
) -> dict:
    """The job's outputs from a model pass, stored under its keys unless the job was handed
    over meanwhile (:class:`shared.leases.LeaseLost`)."""
    from worker.compute.pipeline import process_image

    loaded = ctx.model_for(options, owner)
    result = process_image(loaded, data, options, max_pixels=ctx.settings.max_image_pixels)
    metrics.model_pass([result])
    timings.update(result.timings)
    ctx.leases.check(fence, f"job {job_id}")
    started = time.perf_counter()
    stored = upload_outputs(ctx, job_id, result, attempt=attempt)
    timings["upload_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return {**stored, "reused": False}


def _reused(
    ctx: WorkerContext, job_id: str, attempt: str, digest: str | None, data: bytes, timings: dict
) -> dict | None:
    """The job's outputs copied from an earlier result of the same digest, or None."""
    source = reuse.result_index(ctx).find([digest]).get(digest) if digest else None
    if source is None:
        return None
    started = time.perf_counter()
    # A batch item's result has no input preview, and a job's page shows one: made here,
    # before the copies, since the manifest goes last.
    preview = (
        None
        if source.stored.get("input_preview_key")
        else _input_preview(ctx, job_id, attempt, data)
    )
    stored = reuse.copy_result(ctx.store, source, job_id, attempt=attempt, input_preview=True)
    if stored is not None and preview:
        stored["input_preview_key"] = preview
    timings["reuse_ms"] = round((time.perf_counter() - started) * 1000, 1)
    return stored


def _input_preview(ctx: WorkerContext, job_id: str, attempt: str, data: bytes) -> str:
    from shared.imaging import decode
    from worker.compute.render import render_input_preview

    preview = render_input_preview(decode(data, max_pixels=ctx.settings.max_image_pixels).image)
    key = keys.input_preview_key(job_id, attempt=attempt)
    ctx.store.put_bytes(key, preview, "image/jpeg")
    return key


def release_input(ctx: WorkerContext, job_id: str) -> None:
    """Delete an ended job's spec (keeper/restore.py) and, unless FEATUREMAPS_KEEP_INPUTS,
    its uploaded input; if storage is down now, the retention sweep deletes them with the
    rest of the job's objects."""
    try:
        delete_spec(ctx.store, "job", job_id)
        if not ctx.settings.keep_inputs:
            ctx.store.delete_prefix(keys.inputs_prefix(job_id))
    except FeatureMapsError as exc:
        log.warning("job %s: input not deleted now (retention will): %s", job_id, exc)


def upload_outputs(
    ctx: WorkerContext, job_id: str, result, *, attempt: str, with_input_preview: bool = True
) -> dict:
    """Store a result's outputs in the folder of ``attempt``; the manifest last. Batch items
    skip the input preview (their pages show figures only, and there may be thousands)."""
    with metrics.timed("upload"):
        return _upload_outputs(
            ctx, job_id, result, attempt=attempt, with_input_preview=with_input_preview
        )


def _upload_outputs(
    ctx: WorkerContext, job_id: str, result, *, attempt: str, with_input_preview: bool
) -> dict:
    store, a = ctx.store, attempt
    fmt = result.figure_ext
    stored: dict = {
        "figure_key": keys.figure_key(job_id, fmt, attempt=a),
        "manifest_key": keys.manifest_key(job_id, attempt=a),
        "layers": result.layers,
        "weights": result.manifest.get("weights"),
        # How exactly it was computed (worker/compute/precision.py): pages and clients show it.
        "precision": result.manifest.get("precision"),
    }
    if result.manifest.get("predictions"):
        stored["predictions"] = result.manifest["predictions"]
    store.put_bytes(stored["figure_key"], result.figure, _CONTENT_TYPES[fmt])
    if result.thumbnail:
        stored["thumbnail_key"] = keys.thumbnail_key(job_id, attempt=a)
        store.put_bytes(stored["thumbnail_key"], result.thumbnail, "image/jpeg")
    if result.input_preview and with_input_preview:
        stored["input_preview_key"] = keys.input_preview_key(job_id, attempt=a)
        store.put_bytes(stored["input_preview_key"], result.input_preview, "image/jpeg")
    if result.scores is not None:
        stored["scores_key"] = keys.scores_key(job_id, attempt=a)
        store.put_bytes(stored["scores_key"], npy_bytes(result.scores), "application/octet-stream")
    if result.arrays is not None:
        stored["arrays_key"] = keys.arrays_key(job_id, attempt=a)
        store.put_bytes(stored["arrays_key"], result.arrays, "application/octet-stream")
    if result.layer_pngs:
        stored["layer_keys"] = []
        for index, name, png in result.layer_pngs:
            key = keys.layer_key(job_id, index, name, attempt=a)
            store.put_bytes(key, png, "image/png")
            stored["layer_keys"].append(key)
    manifest = dict(result.manifest, job_id=job_id)
    # The manifest goes last: its presence means every other output is complete.
    store.put_bytes(
        stored["manifest_key"], json.dumps(manifest, indent=2).encode(), "application/json"
    )
    return stored


def npy_bytes(array: np.ndarray) -> bytes:
    """``array`` as a .npy file (numpy's own format: dtype and shape in its header)."""
    buffer = io.BytesIO()
    np.save(buffer, array, allow_pickle=False)
    return buffer.getvalue()


def _timed(timings: dict, name: str, fn: Callable):
    started = time.perf_counter()
    try:
        return fn()
    finally:
        timings[name] = round((time.perf_counter() - started) * 1000, 1)
