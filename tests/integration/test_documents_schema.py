"""Real success documents against the OpenAPI document's schemas (api/openapi.py): the 202
bodies of POST /jobs and POST /batches, a succeeded Job with its result, succeeded Batches
with their results (shards, examples_url) and their items pages, from a real deployment.
Schemathesis (test_schema.py) never reaches these: its ids are random and its images random
bytes. The schemas are closed where the document is (``additionalProperties: false``), so a
field the API adds without documenting it fails here, as does a documented one it drops."""

from __future__ import annotations

import pytest
import requests
from jsonschema import Draft202012Validator

from api.openapi import openapi_document
from tests.helpers import (
    png,
    submit_archive,
    submit_job,
    wait_for_batch,
    wait_for_job,
    zip_of,
)
from tests.integration.deployment import Deployment

DOCUMENT = openapi_document()
PATHS = DOCUMENT["paths"]


def resolved(schema):
    """``schema`` with every ``#/components/...`` reference replaced by what it names."""
    if isinstance(schema, dict):
        if "$ref" in schema:
            target = DOCUMENT
            for part in schema["$ref"].removeprefix("#/").split("/"):
                target = target[part]
            return resolved(target)
        return {k: resolved(v) for k, v in schema.items()}
    if isinstance(schema, list):
        return [resolved(v) for v in schema]
    return schema


def conforms(response: requests.Response, path: str, method: str) -> dict:
    """The body of ``response``, checked against the document's schema for its status."""
    answer = PATHS[path][method]["responses"][str(response.status_code)]
    schema = resolved(answer["content"]["application/json"]["schema"])
    Draft202012Validator.check_schema(schema)
    body = response.json()
    errors = [
        f"{'/'.join(map(str, e.absolute_path))}: {e.message}"
        for e in Draft202012Validator(schema).iter_errors(body)
    ]
    assert not errors, f"{method.upper()} {path} {response.status_code}: {errors}\n{body}"
    return body


@pytest.fixture(scope="module")
def deployment(redis_server, s3_server, tmp_path_factory):
    with Deployment.started(
        tmp_path_factory.mktemp("documents"),
        redis_server,
        s3_server,
        name="documents",
        db=17,
        worker="d1",
    ) as dep:
        yield dep


ARCHIVE = zip_of({f"img{i}.png": png((24 + i, 20), (40 * i, 90, 200)) for i in range(3)})


def test_a_job_s_documents_conform(deployment):
    api = deployment.api
    submitted = submit_job(api, png((32, 24)), arrays="true", per_layer="true")
    job_id = conforms(submitted, "/jobs", "post")["id"]
    assert submitted.headers["Location"].endswith(f"/jobs/{job_id}")

    assert wait_for_job(api, job_id)["status"] == "succeeded"
    job = conforms(requests.get(f"{api}/jobs/{job_id}", timeout=10), "/jobs/{job_id}", "get")
    result = job["result"]
    # What the schema leaves optional is here, so the test checks it.
    assert {"figure_url", "manifest_url", "arrays_url", "layer_urls", "layers"} <= set(result)


@pytest.mark.parametrize("examples", ["0", "2"])
def test_a_batch_s_documents_conform(deployment, examples):
    api = deployment.api
    submitted = submit_archive(api, "three.zip", ARCHIVE, examples=examples)
    batch_id = conforms(submitted, "/batches", "post")["id"]

    wait_for_batch(api, batch_id)
    batch = conforms(
        requests.get(f"{api}/batches/{batch_id}", timeout=10), "/batches/{batch_id}", "get"
    )
    assert batch["status"] == "succeeded"
    assert len(batch["result"]["shards"]) == 1
    assert (batch["result"]["examples_url"] is None) == (examples == "0")

    names = []
    cursor = ""
    while cursor is not None:
        page = conforms(
            requests.get(
                f"{api}/batches/{batch_id}/items",
                params={"limit": 2, "cursor": cursor},
                timeout=10,
            ),
            "/batches/{batch_id}/items",
            "get",
        )
        names += [item["name"] for item in page["items"]]
        cursor = page["next_cursor"]
    assert sorted(names) == ["img0.png", "img1.png", "img2.png"]
