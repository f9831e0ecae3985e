"""The client's retry policy, with a scripted session in place of the network: 503 and 429
are retried after Retry-After (or backoff when absent), other errors are not, and the last
answer's typed exception is raised when the retries run out."""

from __future__ import annotations

import json

import pytest
import requests

from client import Client, RateLimited, Unavailable, UnsupportedType


class ScriptedSession(requests.Session):
    def __init__(self, answers: list[tuple[int, dict[str, str]]]) -> None:
        super().__init__()
        self.answers = answers
        self.calls = 0

    def request(self, method, url, **kwargs):
        status, headers = self.answers[min(self.calls, len(self.answers) - 1)]
        self.calls += 1
        response = requests.Response()
        response.status_code = status
        response.headers.update(headers)
        code = {429: "rate_limited", 503: "unavailable", 415: "unsupported_type"}.get(status)
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


def test_other_errors_are_not_retried():
    client, slept, session = client_for([(415, {}), (200, {})])
    with pytest.raises(UnsupportedType):
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
