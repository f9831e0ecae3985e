"""What many tests do the same way: small images and archives, submitting a job or a batch
over HTTP, and waiting until it has finished. (Photos like the ones people send are in
tests/photos.py.)"""

from __future__ import annotations

import io
import time
import zipfile
from collections.abc import Callable, Mapping

import requests
from PIL import Image

from shared.records import FINISHED

RGB = tuple[int, int, int]


def png(size: tuple[int, int] = (64, 48), color: RGB = (200, 30, 90)) -> bytes:
    """A solid-colour PNG."""
    return _encode(size, color, "PNG")


def jpeg(size: tuple[int, int] = (48, 40), color: RGB = (200, 40, 90)) -> bytes:
    """A solid-colour JPEG."""
    return _encode(size, color, "JPEG")


def _encode(size: tuple[int, int], color: RGB, pil_format: str) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, color).save(buffer, pil_format)
    return buffer.getvalue()


def zip_of(files: Mapping[str, bytes]) -> bytes:
    """A zip archive holding ``files`` (name → bytes), in order, stored."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        for name, data in files.items():
            archive.writestr(name, data)
    return buffer.getvalue()


def submit_job(
    api: str, image: bytes, *, filename: str = "photo.png", timeout_s: float = 30, **also
) -> requests.Response:
    """POST /jobs with ``image``; ``also``: ``headers=`` and form fields (options,
    callback_url)."""
    return _post(f"{api}/jobs", {"image": (filename, image)}, timeout_s, **also)


def submit_archive(
    api: str, name: str, archive: bytes, *, timeout_s: float = 60, **also
) -> requests.Response:
    """POST /batches with an uploaded ``archive`` named ``name``; ``also`` as for jobs."""
    return _post(f"{api}/batches", {"archive": (name, archive)}, timeout_s, **also)


def _post(
    url: str, files: dict, timeout_s: float, headers: Mapping[str, str] | None = None, **fields
) -> requests.Response:
    return requests.post(url, files=files, data=fields, headers=headers, timeout=timeout_s)


def submit_source(
    api: str, url: str, *, headers: Mapping[str, str] | None = None, timeout_s: float = 10
) -> requests.Response:
    """POST /batches naming an ``s3://`` source."""
    return requests.post(f"{api}/batches", json={"source": url}, headers=headers, timeout=timeout_s)


def accepted(response: requests.Response) -> str:
    """The id of a submission that must have been accepted (202)."""
    assert response.status_code == 202, response.text
    return response.json()["id"]


def wait_until_finished(
    read: Callable[[], dict],
    *,
    what: str,
    timeout_s: float,
    with_result: bool = False,
    interval_s: float = 0.2,
) -> dict:
    """Read a job's or batch's document until its status is final (and, ``with_result``, its
    result is written: a batch's manifest comes after its last item); fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while True:
        doc = read()
        if doc["status"] in FINISHED and (doc.get("result") or not with_result):
            return doc
        assert time.monotonic() < deadline, (
            f"{what} still {doc['status']} after {timeout_s}s: {doc}"
        )
        time.sleep(interval_s)


def wait_for_job(
    api: str, job_id: str, *, timeout_s: float = 120, headers: Mapping[str, str] | None = None
) -> dict:
    """The job's document once it has ended."""
    return _wait_for(f"{api}/jobs/{job_id}", f"job {job_id}", timeout_s, headers, False, 0.1)


def wait_for_batch(
    api: str, batch_id: str, *, timeout_s: float = 240, headers: Mapping[str, str] | None = None
) -> dict:
    """The batch's document once the batch has ended and its result (manifest) is written."""
    return _wait_for(
        f"{api}/batches/{batch_id}", f"batch {batch_id}", timeout_s, headers, True, 0.2
    )


def worker_caught_up(api: str, *, headers: Mapping[str, str] | None = None) -> None:
    """Returns once a one-worker deployment has done what it was doing: its worker runs one
    task at a time, so a tiny job sent now ends after the task in hand, and what that task
    does after its record's final transition (deleting inputs) is done by then."""
    job_id = accepted(submit_job(api, png((8, 8), (1, 2, 3)), headers=headers))
    wait_for_job(api, job_id, headers=headers)


def _wait_for(
    url: str,
    what: str,
    timeout_s: float,
    headers: Mapping[str, str] | None,
    with_result: bool,
    interval_s: float,
) -> dict:
    return wait_until_finished(
        lambda: requests.get(url, headers=headers, timeout=10).json(),
        what=what,
        timeout_s=timeout_s,
        with_result=with_result,
        interval_s=interval_s,
    )
