"""ObjectStore against a real S3 server (SeaweedFS): round trips, streamed multipart uploads,
listing and deleting by prefix, presigned URLs for a public host, and fast, typed failures."""

from __future__ import annotations

import hashlib
import io
import time
import tracemalloc
from collections.abc import Callable
from urllib.parse import urlsplit

import pytest
import requests

from shared.errors import NotFound, StorageUnavailable
from shared.settings import Settings
from shared.storage import MIN_PART_SIZE, ObjectStore
from stack.services import SeaweedS3, free_port

MiB = 1024 * 1024


class PatternStream:
    """``size`` deterministic bytes made on the fly: the payload is never whole in memory on
    the sending side either. Its period (257 blocks of 4 KiB) divides no part size, so a
    swapped or repeated part changes the digest."""

    def __init__(self, size: int) -> None:
        self.remaining = size
        self.position = 0

    def read(self, size: int = -1) -> bytes:
        n = self.remaining if size < 0 else min(size, self.remaining)
        views = []
        position, end = self.position, self.position + n
        while position < end:
            within = position % PERIOD
            view = PERIOD_BYTES[within : within + end - position]
            views.append(view)
            position += len(view)
        self.remaining -= n
        self.position = end
        return b"".join(views)


PERIOD = 257 * 4096
PERIOD_BYTES = memoryview(
    b"".join(hashlib.sha256(i.to_bytes(8, "big")).digest() * 128 for i in range(257))
)


def _pattern_digest(size: int) -> str:
    digest = hashlib.sha256()
    stream = PatternStream(size)
    while chunk := stream.read(MiB):
        digest.update(chunk)
    return digest.hexdigest()


def test_bytes_round_trip_and_exists(object_store: ObjectStore) -> None:
    assert not object_store.exists("results/j1/manifest.json")
    object_store.put_bytes("results/j1/manifest.json", b'{"a": 1}', "application/json")
    assert object_store.exists("results/j1/manifest.json")
    assert object_store.get_bytes("results/j1/manifest.json") == b'{"a": 1}'
    object_store.put_bytes("results/j1/manifest.json", b"{}", "application/json")  # overwrite
    assert object_store.get_bytes("results/j1/manifest.json") == b"{}"


def test_open_streams_and_closes(object_store: ObjectStore) -> None:
    payload = bytes(range(256)) * 1000
    object_store.put_bytes("inputs/j2/0.png", payload, "image/png")
    with object_store.open("inputs/j2/0.png") as reader:
        assert reader.size == len(payload)
        assert reader.content_type == "image/png"
        head = reader.read(10)
        rest = reader.read()
    assert head + rest == payload
    assert reader.closed


def test_missing_key_is_not_found(object_store: ObjectStore) -> None:
    with pytest.raises(NotFound) as err:
        object_store.get_bytes("results/nope/feature_maps.jpg")
    assert err.value.code == "not_found"
    with pytest.raises(NotFound):
        object_store.open("results/nope/feature_maps.jpg")


def test_put_stream_bigger_than_a_part_is_multipart_and_bounded(
    object_store: ObjectStore,
) -> None:
    size = 32 * MiB + 123  # seven 5 MiB parts, the last one short
    tracemalloc.start()
    try:
        object_store.put_stream(
            "batches/b1/source.tar", PatternStream(size), part_size=MIN_PART_SIZE
        )
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    # minio holds about three parts' worth while reading ahead: bounded by the part size,
    # never the whole payload.
    assert peak < 3 * MIN_PART_SIZE + 4 * MiB < size, f"peak {peak / MiB:.1f} MiB"

    digest = hashlib.sha256()
    with object_store.open("batches/b1/source.tar") as reader:
        assert reader.size == size
        while chunk := reader.read(MiB):
            digest.update(chunk)
    assert digest.hexdigest() == _pattern_digest(size)
    # A multipart upload's ETag is "<md5 of part md5s>-<number of parts>".
    etag = object_store.client.stat_object(object_store.bucket, "batches/b1/source.tar").etag
    assert etag.endswith("-7"), etag


def test_put_stream_with_known_length(object_store: ObjectStore) -> None:
    object_store.put_stream("inputs/j3/0.bin", io.BytesIO(b"x" * 1000), length=1000)
    assert object_store.get_bytes("inputs/j3/0.bin") == b"x" * 1000


def test_part_size_below_s3_minimum_is_refused(object_store: ObjectStore) -> None:
    with pytest.raises(ValueError, match="part_size"):
        object_store.put_stream("k", io.BytesIO(b"x"), part_size=MiB)


def test_list_and_delete_prefix(object_store: ObjectStore) -> None:
    keys = [f"results/job-a/layers/{i:02d}_conv.png" for i in range(5)]
    keys += ["results/job-a/manifest.json", "results/job-ab/manifest.json", "inputs/job-a/0.jpg"]
    for key in keys:
        object_store.put_bytes(key, key.encode())

    assert list(object_store.list_keys("results/job-a/")) == sorted(keys[:6])
    assert set(object_store.list_keys("")) == set(keys)
    assert list(object_store.list_keys("nothing/")) == []

    assert object_store.delete_prefix("results/job-a/") == 6
    assert set(object_store.list_keys("")) == {keys[6], keys[7]}  # job-ab is not job-a/
    assert object_store.delete_prefix("results/job-a/") == 0
    with pytest.raises(ValueError):
        object_store.delete_prefix("")


def test_ensure_bucket_is_idempotent_and_ping_checks_it(
    make_settings: Callable[..., Settings], object_store: ObjectStore
) -> None:
    object_store.ensure_bucket()
    object_store.ping()
    other = ObjectStore.from_settings(make_settings(s3_bucket="never-created-bucket"))
    with pytest.raises(StorageUnavailable, match="does not exist"):
        other.ping()
    with pytest.raises(StorageUnavailable, match="does not exist"):
        other.get_bytes("k")


def test_presigned_url_is_built_for_the_public_host(
    make_settings: Callable[..., Settings], s3_server: SeaweedS3, object_store: ObjectStore
) -> None:
    object_store.put_bytes("results/j4/feature_maps.jpg", b"\xff\xd8figure", "image/jpeg")
    public = ObjectStore.from_settings(
        make_settings(s3_public_endpoint=f"localhost:{s3_server.port}")
    )

    url = public.presigned_get("results/j4/feature_maps.jpg", 60)

    parts = urlsplit(url)
    assert parts.hostname == "localhost" and parts.port == s3_server.port
    assert "X-Amz-Signature=" in parts.query and "X-Amz-Expires=60" in parts.query
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    assert response.content == b"\xff\xd8figure"
    # The signature covers the host: the same URL sent to another host name is refused.
    wrong_host = url.replace("localhost", "127.0.0.1", 1)
    assert requests.get(wrong_host, timeout=10).status_code == 403


def test_presigning_needs_no_network(make_settings: Callable[..., Settings]) -> None:
    # Nothing listens on the public endpoint; presigning still works, instantly.
    store = ObjectStore.from_settings(make_settings(s3_public_endpoint=f"localhost:{free_port()}"))
    started = time.monotonic()
    url = store.presigned_get("results/x/feature_maps.jpg", 900)
    assert time.monotonic() - started < 1
    assert url.startswith("http://localhost:")


def test_stopped_s3_gives_storage_unavailable_quickly(
    make_settings: Callable[..., Settings], spare_s3_server: Callable[[], SeaweedS3]
) -> None:
    server = spare_s3_server()
    store = ObjectStore.from_settings(make_settings(s3_endpoint=server.endpoint))
    store.ensure_bucket()
    store.put_bytes("k", b"v")
    server.stop()

    started = time.monotonic()
    for call in (
        store.ping,
        lambda: store.get_bytes("k"),
        lambda: store.put_bytes("k", b"v"),
        lambda: store.exists("k"),
        lambda: list(store.list_keys("")),
        lambda: store.put_stream("big", io.BytesIO(b"x" * 10), part_size=MIN_PART_SIZE),
    ):
        with pytest.raises(StorageUnavailable) as err:
            call()
        assert err.value.code == "storage_unavailable" and err.value.http_status == 503
        assert server.endpoint in err.value.message
    assert time.monotonic() - started < 15

    server.start()  # the same store recovers once S3 is back
    assert store.get_bytes("k") == b"v"


def test_nothing_listening_fails_within_seconds(make_settings: Callable[..., Settings]) -> None:
    store = ObjectStore.from_settings(make_settings(s3_endpoint=f"127.0.0.1:{free_port()}"))
    started = time.monotonic()
    with pytest.raises(StorageUnavailable, match="unreachable"):
        store.ensure_bucket()
    assert time.monotonic() - started < 5


def test_wrong_credentials_are_storage_unavailable(
    make_settings: Callable[..., Settings], object_store: ObjectStore
) -> None:
    store = ObjectStore.from_settings(make_settings(s3_secret_key="not-the-secret"))
    with pytest.raises(StorageUnavailable, match="FEATUREMAPS_S3_SECRET_KEY"):
        store.get_bytes("k")
