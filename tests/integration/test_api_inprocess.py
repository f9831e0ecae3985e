"""The API in-process: Flask's test client on ``create_app(settings)`` against the session's
real Redis and S3, no gunicorn and no worker. Quick feedback on the views, the error handlers
and auth; the tests that start a deployment (test_service.py, test_batches.py, …) prove the
same through a real server and worker."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable

import pytest
import redis
from flask.testing import FlaskClient

from api import create_app
from api.services import Services
from shared.queue import BATCH_QUEUE, JOBS_QUEUE
from shared.settings import Settings
from shared.storage import ObjectStore
from tests.helpers import jpeg

ALICE = {"Authorization": "Bearer tok-alice"}
BOB = {"Authorization": "Bearer tok-bob"}


def _image_form(data: bytes, **fields: str) -> dict:
    return {"image": (io.BytesIO(data), "photo.jpg"), **fields}


@pytest.fixture
def make_client(
    make_settings: Callable[..., Settings],
    redis_client: redis.Redis,
    object_store: ObjectStore,
) -> Callable[..., FlaskClient]:
    """``make_client(**settings_overrides) -> FlaskClient`` on a fresh app (this test's
    flushed Redis and bucket; ``services=`` replaces the app's services)."""

    def make(services: Callable[[Settings], Services] | None = None, **overrides) -> FlaskClient:
        settings = make_settings(**overrides)
        app = create_app(settings, services(settings) if services else None)
        return app.test_client()

    return make


@pytest.fixture
def client(make_client) -> FlaskClient:
    return make_client()


def _error(response) -> dict:
    return response.get_json()["error"]


def test_submit_get_and_cancel_a_job(client, redis_client, object_store):
    response = client.post("/jobs", data=_image_form(jpeg(), reduction="max"))
    assert response.status_code == 202, response.get_json()
    body = response.get_json()
    job_id = body["id"]
    assert body["status"] == "queued"
    assert response.headers["Location"] == f"/jobs/{job_id}"
    assert body["links"]["self"] == f"/jobs/{job_id}"
    # Sent by name, with the id only, on the jobs queue; the input is in storage.
    assert redis_client.llen(JOBS_QUEUE) == 1
    assert list(object_store.list_keys(f"inputs/{job_id}/")) == [f"inputs/{job_id}/0.jpg"]
    # The record as created, kept while the job runs (keeper/restore.py).
    assert list(object_store.list_keys(f"accepted/jobs/{job_id}")) == [
        f"accepted/jobs/{job_id}.json"
    ]

    doc = client.get(f"/jobs/{job_id}").get_json()
    assert doc["status"] == "queued"
    assert doc["options"]["reduction"] == "max"
    assert doc["result"] is None and doc["error"] is None

    assert client.get(f"/jobs/{job_id}/figure").status_code == 409

    response = client.delete(f"/jobs/{job_id}")
    assert response.status_code == 202
    assert response.get_json()["status"] == "canceled"
    assert list(object_store.list_keys(f"inputs/{job_id}/")) == []
    assert list(object_store.list_keys(f"accepted/jobs/{job_id}")) == []
    again = client.delete(f"/jobs/{job_id}")
    assert again.status_code == 409
    assert _error(again)["code"] == "conflict"


@pytest.mark.parametrize("job_id", ["0123456789abcdef01234567", "no/such", "x" * 65])
def test_unknown_job_is_404(client, job_id):
    response = client.get(f"/jobs/{job_id}")
    assert response.status_code == 404
    assert _error(response)["code"] == "not_found"


def test_batch_from_an_allowed_source(make_client, redis_client):
    client = make_client(source_allow="s3://photos/incoming/")
    url = "s3://photos/incoming/set1/"
    response = client.post("/batches", json={"source": url, "format": "png"})
    assert response.status_code == 202, response.get_json()
    batch_id = response.get_json()["id"]
    assert response.headers["Location"] == f"/batches/{batch_id}"
    assert redis_client.llen(BATCH_QUEUE) == 1

    doc = client.get(f"/batches/{batch_id}").get_json()
    assert doc["status"] == "queued"
    assert doc["source"] == {"kind": "s3", "name": url}
    assert doc["options"]["format"] == "png"
    assert doc["counts"]["total"] == 0
    assert client.get(f"/batches/{batch_id}/items").get_json() == {
        "items": [],
        "next_cursor": None,
    }


def test_batch_from_an_uploaded_archive(client, redis_client, object_store):
    archive = io.BytesIO()
    with zipfile.ZipFile(archive, "w") as bundle:
        bundle.writestr("a.jpg", jpeg())
    form = {"reduction": "l2", "archive": (io.BytesIO(archive.getvalue()), "photos.zip")}
    response = client.post("/batches", data=form)
    assert response.status_code == 202, response.get_json()
    batch_id = response.get_json()["id"]
    assert redis_client.llen(BATCH_QUEUE) == 1
    key = f"batches/{batch_id}/source.zip"
    assert object_store.get_bytes(key) == archive.getvalue()
    doc = client.get(f"/batches/{batch_id}").get_json()
    assert doc["source"] == {"kind": "archive", "name": "photos.zip"}
    assert doc["options"]["reduction"] == "l2"

    not_archive = {"archive": (io.BytesIO(b"just text, no archive"), "photos.zip")}
    response = client.post("/batches", data=not_archive)
    assert response.status_code == 415
    assert _error(response)["code"] == "unsupported_type"
    bad_option = {"reduction": "median", "archive": (io.BytesIO(archive.getvalue()), "b.zip")}
    assert client.post("/batches", data=bad_option).status_code == 400
    assert list(object_store.list_keys("batches/")) == [key]


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"source": "s3://photos/other/"}, 403, "forbidden_source"),
        ({"source": "s3://elsewhere/incoming/"}, 403, "forbidden_source"),
        ({"source": "s3://photos/incoming/../secret/"}, 400, "invalid_option"),
        ({"source": "https://photos/incoming/"}, 400, "invalid_option"),
        ({"format": "png"}, 400, "missing_field"),
        (["s3://photos/incoming/"], 400, "bad_request"),
        ({"source": "s3://photos/incoming/", "reduction": "median"}, 400, "invalid_option"),
    ],
)
def test_batch_source_refused(make_client, redis_client, body, status, code):
    client = make_client(source_allow="s3://photos/incoming/")
    response = client.post("/batches", json=body)
    assert response.status_code == status, response.get_json()
    assert _error(response)["code"] == code
    assert redis_client.llen(BATCH_QUEUE) == 0


def test_service_bucket_is_never_a_source(make_client, settings):
    client = make_client(source_allow=f"s3://{settings.s3_bucket}/")
    response = client.post("/batches", json={"source": f"s3://{settings.s3_bucket}/results/"})
    assert response.status_code == 400
    assert _error(response)["code"] == "invalid_option"


def test_error_bodies(make_client):
    client = make_client(max_upload_mb=0.5, max_image_pixels=1000)

    def check(response, status: int, code: str):
        assert response.status_code == status, response.get_data(as_text=True)
        assert response.mimetype == "application/json"
        error = _error(response)
        assert error["code"] == code and error["message"]
        return response

    check(client.post("/jobs", data=_image_form(jpeg(), reduction="bogus")), 400, "invalid_option")
    check(client.post("/jobs", data={"reduction": "max"}), 400, "missing_field")
    check(client.post("/jobs", data=_image_form(b"")), 400, "empty_image")
    check(client.get("/nowhere"), 404, "not_found")
    allow = check(client.put("/jobs"), 405, "method_not_allowed").headers["Allow"]
    assert "POST" in allow
    # A raw body (the test client spools a large form to a file it never closes).
    big = b"\0" * (700 * 1024)
    multipart = "multipart/form-data; boundary=x"
    check(client.post("/jobs", data=big, content_type=multipart), 413, "too_large")
    check(
        client.post("/jobs", data=_image_form(b"plain text, not an image")), 415, "unsupported_type"
    )
    check(client.post("/batches", data="x", content_type="text/plain"), 415, "unsupported_type")
    check(client.post("/jobs", data=_image_form(jpeg()[:200])), 422, "truncated_image")
    check(client.post("/jobs", data=_image_form(jpeg((60, 60)))), 422, "too_many_pixels")


def test_tokens(make_client):
    client = make_client(api_tokens="alice:tok-alice,bob:tok-bob")
    response = client.get("/jobs/0123456789abcdef01234567")
    assert response.status_code == 401
    assert _error(response)["code"] == "unauthorized"
    assert response.headers["WWW-Authenticate"].startswith("Bearer")
    wrong = client.post("/jobs", data=_image_form(jpeg()), headers={"Authorization": "Bearer no"})
    assert wrong.status_code == 401

    job_id = client.post("/jobs", data=_image_form(jpeg()), headers=ALICE).get_json()["id"]
    assert client.get(f"/jobs/{job_id}", headers=ALICE).status_code == 200
    # Another token's job looks unknown, whatever is asked of it.
    for response in (
        client.get(f"/jobs/{job_id}", headers=BOB),
        client.get(f"/jobs/{job_id}/figure", headers=BOB),
        client.delete(f"/jobs/{job_id}", headers=BOB),
    ):
        assert response.status_code == 404
        assert _error(response)["code"] == "not_found"
    assert client.get(f"/jobs/{job_id}", headers=ALICE).get_json()["status"] == "queued"


def test_rate_limit(make_client):
    client = make_client(rate_limit_per_minute=2)
    for _ in range(2):
        assert client.get("/jobs/0123456789abcdef01234567").status_code == 404
    response = client.get("/jobs/0123456789abcdef01234567")
    assert response.status_code == 429
    assert _error(response)["code"] == "rate_limited"
    assert int(response.headers["Retry-After"]) >= 1


class _BrokerDown:
    """A producer whose every send fails, as when the broker is unreachable."""

    def send_task(self, *args, **kwargs):
        raise OSError("broker unreachable")


def _broker_down(settings: Settings) -> Services:
    services = Services.from_settings(settings)
    services.producer = _BrokerDown()
    return services


def test_a_failed_send_leaves_nothing_half_created(make_client, redis_client, object_store):
    client = make_client(services=_broker_down, source_allow="s3://photos/incoming/")
    response = client.post("/jobs", data=_image_form(jpeg()))
    assert response.status_code == 503
    assert _error(response)["code"] == "unavailable"
    response = client.post("/batches", json={"source": "s3://photos/incoming/"})
    assert response.status_code == 503
    assert "batch was not created" in _error(response)["message"]
    assert list(redis_client.scan_iter("featuremaps:job:*")) == []
    assert list(redis_client.scan_iter("featuremaps:batch:*")) == []
    assert list(object_store.list_keys("inputs/")) == []
