"""/jobs: submit one image, poll its document, fetch its figure and layer maps, cancel it."""

from __future__ import annotations

from flask import Blueprint, redirect, request, url_for

from api.audit import record_submission
from api.enqueue import best_effort, enqueue
from api.idempotency import Answer, Idempotency, file_digest, fingerprint, idempotency_key
from api.layers import RAW_MEDIA_TYPE, layer_json, layer_raw, read_layer_map
from api.models import check_model
from api.services import Services, services
from api.uploads import Upload, read_image_upload
from keeper.restore import delete_spec, save_spec
from shared import documents, keys
from shared.errors import Conflict
from shared.jobs import Job, JobStatus, new_job_id
from shared.queue import JOBS_QUEUE, RENDER_JOB
from shared.webhooks import accepted_callback_url

bp = Blueprint("jobs", __name__)


@bp.post("/jobs")
def submit_job():
    svc = services()
    owner = svc.caller(request)
    key = idempotency_key(request)
    upload = read_image_upload(
        request,
        field="image",
        max_pixels=svc.settings.max_image_pixels,
        max_bytes=svc.settings.max_upload_bytes,
    )
    check_model(svc, upload.options, owner)
    callback_url = accepted_callback_url(upload.callback_url, svc.settings)
    meaning = fingerprint(
        "POST /jobs",
        image=file_digest(upload.data),
        options=upload.options.to_dict(),
        callback_url=callback_url,
    )
    return Idempotency(svc.redis, ttl_s=svc.settings.job_ttl_s).once(
        owner, key, meaning, create=lambda: _submitted(svc, upload, owner, callback_url)
    )


def _submitted(svc: Services, upload: Upload, owner: str, callback_url: str | None) -> Answer:
    job = enqueue_job(
        svc,
        upload.data,
        upload.info.ext,
        upload.content_type,
        upload.options,
        owner,
        callback_url=callback_url,
    )
    record_submission("job", job.id, owner, len(upload.data), "upload")
    body = {"id": job.id, "status": job.status.value, "links": _links(job.id)}
    return Answer(body, 202, url_for("jobs.get_job", job_id=job.id))


@bp.get("/jobs/<job_id>")
def get_job(job_id: str):
    svc = services()
    return job_document(svc, svc.polled("job", job_id, svc.caller(request)))


@bp.get("/jobs/<job_id>/figure")
def get_figure(job_id: str):
    svc = services()
    job = svc.jobs.get(job_id, owner=svc.caller(request))
    if job.status is not JobStatus.SUCCEEDED or not job.result:
        raise Conflict(f"job {job_id} is {job.status.value}; the figure exists once it succeeded")
    url = svc.store.presigned_get(job.result["figure_key"], svc.settings.presign_expiry_s)
    return redirect(url, code=302)


@bp.get("/jobs/<job_id>/layers/<layer>")
def get_layer(job_id: str, layer: str):
    svc = services()
    job = svc.jobs.get(job_id, owner=svc.caller(request))
    array = read_layer_map(svc.store, job, layer)
    if request.accept_mimetypes.best_match(["application/json", RAW_MEDIA_TYPE]) == RAW_MEDIA_TYPE:
        return layer_raw(array)
    return layer_json(layer, array)


@bp.delete("/jobs/<job_id>")
def cancel_job(job_id: str):
    svc = services()
    job = svc.jobs.cancel(job_id, owner=svc.caller(request))
    best_effort(f"spec of canceled job {job_id}", lambda: delete_spec(svc.store, "job", job_id))
    if not svc.settings.keep_inputs:
        # Ended: no worker will read the input again (one already running has it in memory).
        best_effort(
            f"input of canceled job {job_id}",
            lambda: svc.store.delete_prefix(keys.inputs_prefix(job_id)),
        )
    return job_document(svc, job), 202


def enqueue_job(
    svc: Services,
    data: bytes,
    ext: str,
    content_type: str,
    options,
    owner: str,
    *,
    callback_url: str | None = None,
):
    """Store the input, write the record, send the task — or undo what was done and 503."""
    job_id = new_job_id()
    input_key = keys.input_key(job_id, ext)
    svc.store.put_bytes(input_key, data, content_type)
    job = Job(
        id=job_id,
        status=JobStatus.QUEUED,
        options=options.to_dict(),
        input_key=input_key,
        owner=owner,
        callback_url=callback_url,
    )
    save_spec(svc.store, "job", job)  # so that a record lost after the 202 can be restored
    enqueue(
        svc.producer,
        kind="job",
        record_id=job_id,
        create=lambda: svc.jobs.create(job),
        task=RENDER_JOB,
        queue=JOBS_QUEUE,
        undo=[
            lambda: svc.jobs.delete(job_id),
            lambda: svc.store.delete_prefix(keys.inputs_prefix(job_id)),
            lambda: delete_spec(svc.store, "job", job_id),
        ],
    )
    return job


def job_document(svc: Services, job: Job) -> dict:
    doc = documents.job_document(svc.store, job, svc.settings.presign_expiry_s)
    doc["links"] = _links(job.id)
    return doc


def _links(job_id: str) -> dict:
    return {
        "self": url_for("jobs.get_job", job_id=job_id),
        "figure": url_for("jobs.get_figure", job_id=job_id),
        "page": url_for("ui.job_page", job_id=job_id),
    }
