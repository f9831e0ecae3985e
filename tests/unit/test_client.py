"""The client's retry policy, with a scripted session in place of the network: 503 and 429
are retried after Retry-After (or backoff when absent), other errors are not, and the last
answer's typed exception is raised when the retries run out."""

from __future__ import annotations

import json

import pytest
import requests

from client import Client, Forbidden, RateLimited, Unavailable, UnsupportedType


class ScriptedSession(requests.Session):
    def __init__(self, answers: list[tuple[int, dict[str, str]]]) -> None:
        super().__init__()
        self.answers = answers
        self.calls = 0
        self.sent_headers: list[dict] = []

    def request(self, method, url, **kwargs):
        status, headers = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        self.sent_headers.append(kwargs.get("headers") or {})
        if status is None:
            raise requests.ConnectionError("Remote end closed connection without response")
        response = requests.Response()
        response.status_code = status
        response.headers.update(headers)
        code = {
            403: "forbidden_source",
            415: "unsupported_type",
            429: "rate_limited",
            503: "unavailable",
        }.get(status)
        body = (
            {"error": {"code": code, "message": "m"}} if code else {"id": "j", "status": "queued"}
        )
        response._content = json.dumps(body).encode()
        return response


def client_for(answers, **kwargs) -> tuple[Client, list[float], ScriptedSession]:
    slept: list[float] = []
    session = ScriptedSession(answers)
    return Client("http://api", session=session, sleep=slept.append, **kwargs), slept, session


def test_503_and_429_are_retried_after_retry_after_or_backoff():
    client, slept, _ = client_for(
        [(503, {"Retry-After": "7"}), (503, {}), (429, {"Retry-After": "2"}), (200, {})]
    )
    assert client.request("GET", "/jobs/j").json()["id"] == "j"
    assert slept == [7.0, 1.0, 2.0]


def test_a_long_retry_after_is_capped_and_the_last_error_raised():
    client, slept, session = client_for(
        [(429, {"Retry-After": "3600"})], retries=2, max_retry_wait=30
    )
    with pytest.raises(RateLimited) as raised:
        client.request("GET", "/jobs/j")
    assert slept == [30, 30] and session.calls == 3
    assert raised.value.retry_after == 3600


@pytest.mark.parametrize(("status", "error"), [(403, Forbidden), (415, UnsupportedType)])
def test_other_errors_are_not_retried(status, error):
    client, slept, session = client_for([(status, {}), (200, {})])
    with pytest.raises(error) as raised:
        client.request("POST", "/batches")
    assert slept == [] and session.calls == 1
    assert raised.value.status == status


def test_a_dropped_submission_is_retried_with_the_same_idempotency_key():
    client, slept, session = client_for([(None, {}), (None, {}), (202, {})])
    job = client.submit(b"not read by the scripted session")
    assert job.id == "j" and slept == [0.5, 1.0] and session.calls == 3
    keys = {headers["Idempotency-Key"] for headers in session.sent_headers}
    assert len(keys) == 1 and len(keys.pop()) == 36  # one UUID for every try


def test_each_submission_has_its_own_key_unless_given():
    client, _, session = client_for([(202, {})])
    client.submit(b"a")
    client.submit(b"b")
    client.submit(b"c", idempotency_key="order-17")
    first, second, third = (h["Idempotency-Key"] for h in session.sent_headers)
    assert first != second and third == "order-17"


def test_a_dropped_post_without_a_key_is_not_retried():
    client, slept, session = client_for([(None, {}), (202, {})])
    with pytest.raises(requests.ConnectionError):
        client.request("POST", "/jobs")
    assert slept == [] and session.calls == 1


def test_unavailable_without_retries():
    client, _, _ = client_for([(503, {})], retries=0)
    with pytest.raises(Unavailable) as raised:
        client.request("GET", "/jobs/j")
    assert (raised.value.status, raised.value.code) == (503, "unavailable")


def test_repeated_file_names_get_numbered_never_hidden(tmp_path):
    import zipfile

    from client.api import zip_images
    from client.local import _output_dirs

    paths = []
    for folder in ("a", "b", "c"):
        (tmp_path / folder).mkdir()
        path = tmp_path / folder / "IMG_0001.JPG"
        path.write_bytes(folder.encode())
        paths.append(path)
    with zipfile.ZipFile(zip_images(paths, tmp_path / "out.zip")) as archive:
        assert archive.namelist() == ["IMG_0001.JPG", "IMG_0001-2.JPG", "IMG_0001-3.JPG"]
        assert archive.read("IMG_0001-3.JPG") == b"c"
    assert [d.name for d in _output_dirs(paths, tmp_path)] == [
        "IMG_0001",
        "IMG_0001-2",
        "IMG_0001-3",
    ]
