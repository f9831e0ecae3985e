"""api/sources.py (parsing and policy of s3:// batch sources) and api/auth.py (who a request
acts as): pure functions, on a Flask test request, no services."""

from __future__ import annotations

import pytest
from flask import Flask

from api.auth import caller, owner_for
from api.sources import parse_source_url, read_source_request
from shared.errors import BadRequest, ForbiddenSource, InvalidOption, MissingField, Unauthorized
from shared.settings import Settings

SERVICE_BUCKET = "featuremaps"


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("s3://photos/incoming/", ("photos", "incoming/")),
        ("s3://photos/", ("photos", "")),
        ("s3://photos", ("photos", "")),
        ("s3://photos/a/b/c.jpg", ("photos", "a/b/c.jpg")),
        (f"s3://{SERVICE_BUCKET}/mine/", (SERVICE_BUCKET, "mine/")),
        (f"s3://{SERVICE_BUCKET}/inputs-of-mine/", (SERVICE_BUCKET, "inputs-of-mine/")),
    ],
)
def test_source_urls_that_parse(url, expected):
    assert parse_source_url(url, service_bucket=SERVICE_BUCKET) == expected


@pytest.mark.parametrize(
    "url",
    [
        "https://photos/incoming/",
        "photos/incoming/",
        "s3://",
        "s3://Bad_Bucket/x/",
        "s3://photos/incoming/../other/",
        "s3://photos/../x/",
        f"s3://{SERVICE_BUCKET}/",
        f"s3://{SERVICE_BUCKET}",
        f"s3://{SERVICE_BUCKET}/inputs/",
        f"s3://{SERVICE_BUCKET}/results/abc/",
        f"s3://{SERVICE_BUCKET}/batches/",
        # A prefix without its slash, or shorter, lists the same private keys.
        f"s3://{SERVICE_BUCKET}/inputs",
        f"s3://{SERVICE_BUCKET}/result",
        f"s3://{SERVICE_BUCKET}/b",
        # Uploaded weights are every token's own.
        f"s3://{SERVICE_BUCKET}/models/",
        f"s3://{SERVICE_BUCKET}/mod",
        # The records as created (specs) name every owner's jobs and options.
        f"s3://{SERVICE_BUCKET}/accepted/",
        f"s3://{SERVICE_BUCKET}/accepted/jobs",
        f"s3://{SERVICE_BUCKET}/acc",
    ],
)
def test_source_urls_refused(url):
    with pytest.raises(InvalidOption):
        parse_source_url(url, service_bucket=SERVICE_BUCKET)


def _request(app: Flask, **kwargs):
    return app.test_request_context("/batches", method="POST", **kwargs)


def test_source_request_reads_options_and_checks_the_allow_list():
    app = Flask(__name__)
    settings = Settings(s3_bucket=SERVICE_BUCKET, source_allow="alice=s3://team/alice/")
    body = {"source": "s3://team/alice/run1/", "reduction": "max"}
    with _request(app, json=body) as ctx:
        options, source, callback_url, spacing = read_source_request(ctx.request, settings, "alice")
        assert options.to_dict()["reduction"] == "max" and callback_url is None and spacing == 0
        assert source == {
            "kind": "s3",
            "bucket": "team",
            "prefix": "alice/run1/",
            "name": "s3://team/alice/run1/",
        }
        with pytest.raises(ForbiddenSource):
            read_source_request(ctx.request, settings, "bob")
    with _request(app, json={"reduction": "max"}) as ctx, pytest.raises(MissingField):
        read_source_request(ctx.request, settings, "alice")
    with _request(app, json="s3://team/alice/") as ctx, pytest.raises(BadRequest):
        read_source_request(ctx.request, settings, "alice")


def _caller(settings: Settings, headers: dict[str, str] | None = None) -> str:
    with Flask(__name__).test_request_context("/jobs", headers=headers or {}) as ctx:
        # No rate limit configured: Redis is never asked.
        return caller(ctx.request, settings, redis=None)  # type: ignore[arg-type]


def test_without_tokens_everyone_is_the_anonymous_owner():
    assert _caller(Settings()) == ""
    assert _caller(Settings(), {"Authorization": "Bearer anything"}) == ""


def test_a_token_acts_as_its_name():
    settings = Settings(api_tokens="alice:tok-a,tok-b")
    assert _caller(settings, {"Authorization": "Bearer tok-a"}) == "alice"
    assert _caller(settings, {"Authorization": "bearer  tok-b "}) == "token2"


@pytest.mark.parametrize(
    "header",
    [None, "", "Bearer", "Bearer ", "Basic dG9rLWE=", "tok-a", "Bearer tok-c", "Bearer tok-a2"],
)
def test_missing_or_wrong_tokens_are_401(header):
    settings = Settings(api_tokens="alice:tok-a")
    headers = {"Authorization": header} if header is not None else {}
    context = Flask(__name__).test_request_context("/jobs", headers=headers)
    with context as ctx, pytest.raises(Unauthorized):
        owner_for(ctx.request, settings)
