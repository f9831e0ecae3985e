"""The service's own S3 user against a real S3 server: SeaweedFS with an identity whose actions
are limited to the service bucket (read, write, list) and, read-only, one allowed source
bucket, as minio-init's policy does on MinIO (docs/security.md). The user can do its work
there and is refused everywhere else."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from minio import Minio

from shared.errors import FeatureMapsError
from shared.settings import Settings
from shared.storage import ObjectStore
from stack.services import SeaweedS3

ADMIN = ("identity-admin", "identity-admin-secret")
SERVICE = ("identity-service", "identity-service-secret")
SERVICE_BUCKET = "svc-data"
SOURCE_BUCKET = "photos"
OTHER_BUCKET = "private-hr"


class _ScopedSeaweed(SeaweedS3):
    """SeaweedFS with the identities of ``config`` (weed's ``-s3.config``)."""

    def __init__(self, dir: Path, config: dict, **kwargs) -> None:
        self.config_path = Path(dir) / "s3-identities.json"
        self.config_path.parent.mkdir(parents=True, exist_ok=True)
        self.config_path.write_text(json.dumps(config))
        super().__init__(dir, **kwargs)

    def argv(self) -> list[str]:
        return [*super().argv(), f"-s3.config={self.config_path}"]


@pytest.fixture(scope="module")
def scoped_s3(s3_server, tmp_path_factory):
    config = {
        "identities": [
            {
                "name": "admin",
                "credentials": [{"accessKey": ADMIN[0], "secretKey": ADMIN[1]}],
                "actions": ["Admin", "Read", "Write", "List", "Tagging"],
            },
            {
                "name": "featuremaps-service",
                "credentials": [{"accessKey": SERVICE[0], "secretKey": SERVICE[1]}],
                "actions": [
                    f"Read:{SERVICE_BUCKET}",
                    f"Write:{SERVICE_BUCKET}",
                    f"List:{SERVICE_BUCKET}",
                    f"Read:{SOURCE_BUCKET}",
                    f"List:{SOURCE_BUCKET}",
                ],
            },
        ]
    }
    server = _ScopedSeaweed(
        tmp_path_factory.mktemp("s3-identity"),
        config,
        access_key=ADMIN[0],
        secret_key=ADMIN[1],
        executable=s3_server.executable,
    )
    server.start()
    admin = server.client()
    for bucket in (SERVICE_BUCKET, SOURCE_BUCKET, OTHER_BUCKET):
        admin.make_bucket(bucket)
    yield server
    server.stop()


def _store(server: SeaweedS3, bucket: str, keys: tuple[str, str]) -> ObjectStore:
    settings = Settings(
        s3_endpoint=server.endpoint,
        s3_access_key=keys[0],
        s3_secret_key=keys[1],
        s3_bucket=bucket,
        storage_retries=0,
    )
    return ObjectStore.from_settings(settings)


def _put_as_admin(server: SeaweedS3, bucket: str, key: str, data: bytes) -> None:
    admin: Minio = server.client()
    admin.put_object(bucket, key, io.BytesIO(data), len(data))


def test_service_user_works_in_its_bucket(scoped_s3):
    store = _store(scoped_s3, SERVICE_BUCKET, SERVICE)
    store.put_bytes("results/j1/feature_maps.jpg", b"figure")
    assert store.get_bytes("results/j1/feature_maps.jpg") == b"figure"
    assert list(store.list_keys("results/")) == ["results/j1/feature_maps.jpg"]
    assert store.delete_prefix("results/j1/") == 1


def test_service_user_reads_the_allowed_source_but_cannot_write_it(scoped_s3):
    _put_as_admin(scoped_s3, SOURCE_BUCKET, "incoming/a.jpg", b"photo")
    source = _store(scoped_s3, SOURCE_BUCKET, SERVICE)
    assert list(source.list_keys("incoming/")) == ["incoming/a.jpg"]
    assert source.get_bytes("incoming/a.jpg") == b"photo"
    with pytest.raises(FeatureMapsError, match="AccessDenied"):
        source.put_bytes("incoming/planted.jpg", b"x")


def test_service_user_cannot_read_a_bucket_outside_its_policy(scoped_s3):
    _put_as_admin(scoped_s3, OTHER_BUCKET, "employees/badge.jpg", b"badge")
    other = _store(scoped_s3, OTHER_BUCKET, SERVICE)
    with pytest.raises(FeatureMapsError, match="AccessDenied"):
        other.get_bytes("employees/badge.jpg")
    with pytest.raises(FeatureMapsError, match="AccessDenied"):
        list(other.list_keys("employees/"))
    with pytest.raises(FeatureMapsError, match="AccessDenied"):
        other.put_bytes("employees/x.jpg", b"x")
    # The admin can: the refusal is the identity's, not a missing object.
    assert _store(scoped_s3, OTHER_BUCKET, ADMIN).get_bytes("employees/badge.jpg") == b"badge"
