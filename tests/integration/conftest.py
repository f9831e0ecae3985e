"""Fixtures for integration tests: the environment a service subprocess (API, worker) needs
to reach the session's Redis and S3, and extra S3 servers a test may stop or break."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from shared.settings import Settings
from stack.local import service_env as service_env_for
from stack.services import SeaweedS3


@pytest.fixture
def service_env(settings: Settings) -> dict[str, str]:
    """``FEATUREMAPS_*`` variables that make an API or worker subprocess use this test's
    Redis, S3 and bucket (merge into the subprocess's environment), as the local stack does."""
    return service_env_for(settings, device=settings.device)


@pytest.fixture
def spare_s3_server(s3_server: SeaweedS3, tmp_path: Path) -> Iterator[Callable[[], SeaweedS3]]:
    """``spare_s3_server() -> SeaweedS3``: a further, started SeaweedFS of this test's own,
    stopped at the end, for tests that stop, kill or restart S3. (Depends on ``s3_server``
    only so that a missing ``weed`` skips or fails the same way.)"""
    servers: list[SeaweedS3] = []

    def start() -> SeaweedS3:
        server = SeaweedS3(
            tmp_path / f"s3-{len(servers)}",
            access_key=s3_server.access_key,
            secret_key=s3_server.secret_key,
            executable=s3_server.executable,
        )
        servers.append(server)
        server.start()
        return server

    yield start
    for server in servers:
        server.stop()
