"""Werkzeug's multipart limits as the API sets them, in-process: any file up to the upload
limit parses, whatever bytes it holds; text fields stay capped. (Over HTTP, with gunicorn and
a worker: tests/integration/test_real_photos.py.)"""

from __future__ import annotations

import numpy as np
import pytest
from flask import Flask, request

from api import FORM_FIELD_MEMORY_BYTES, limit_request_bodies
from shared.settings import Settings


@pytest.fixture
def client():
    app = Flask(__name__)
    limit_request_bodies(app, Settings(max_upload_mb=20, max_form_parts=20))

    @app.post("/upload")
    def upload():
        return {"size": len(request.files["image"].read()), "fields": request.form.to_dict()}

    return app.test_client()


def _post(client, data: bytes, **fields):
    # The body is built here: the test client's own multipart encoder spools large bodies
    # to a temporary file that it never closes.
    boundary = "limits-test-boundary"
    parts = [
        f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode()
        for name, value in fields.items()
    ]
    parts.append(
        f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="photo.jpg"\r\n'
        f"Content-Type: image/jpeg\r\n\r\n".encode()
        + data
        + b"\r\n"
    )
    body = b"".join(parts) + f"--{boundary}--\r\n".encode()
    return client.post(
        "/upload", data=body, content_type=f"multipart/form-data; boundary={boundary}"
    )


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("size", [300_000, 481_000, 3_500_000, 20 * 2**20])
def test_files_of_any_content_parse_up_to_the_limit(client, size, seed):
    # Random bytes put CR/LF near read-chunk ends, which is what made Werkzeug's decoder
    # count a kept-back partial boundary plus a whole chunk against a 64 KB field limit.
    data = np.random.default_rng(seed).integers(0, 256, size, dtype=np.uint8).tobytes()
    response = _post(client, data, mode="chain")
    assert response.status_code == 200, response.status_code
    assert response.json == {"size": size, "fields": {"mode": "chain"}}


def test_a_text_field_over_its_limit_is_413(client):
    response = _post(client, b"\xff\xd8\xff", mode="x" * (FORM_FIELD_MEMORY_BYTES + 1))
    assert response.status_code == 413


def test_a_body_over_the_upload_limit_is_413(client):
    response = _post(client, b"\0" * (21 * 2**20))
    assert response.status_code == 413
