"""Object storage: the only code that talks S3, through the ``minio`` client.

Works against any S3-compatible server (MinIO, SeaweedFS, AWS). Callers deal in keys and
bytes or streams, and in two errors only:

- :class:`shared.errors.NotFound` when a key does not exist;
- :class:`shared.errors.StorageUnavailable` for everything that means "storage cannot serve
  this now": connection refused or reset, timeouts, 5xx answers, a missing bucket, rejected
  credentials. The message says which, and which endpoint.

Clients get a short-timeout connection pool with few retries, so a dead S3 fails in seconds
instead of urllib3's and minio's defaults of several minutes.

Presigned URLs are signed for the *public* endpoint (``FEATUREMAPS_S3_PUBLIC_ENDPOINT``),
because a SigV4 signature covers the Host header: a URL signed for an internal host name
cannot be rewritten afterwards. The public client has its region set, so presigning is pure
computation and makes no network call.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Iterable, Iterator
from datetime import datetime, timedelta
from itertools import islice
from typing import IO, TYPE_CHECKING, Any
from urllib.parse import urlsplit

import urllib3
from minio import Minio
from minio.commonconfig import CopySource
from minio.deleteobjects import DeleteObject
from minio.error import InvalidResponseError, MinioException, S3Error, ServerError

from shared.errors import NotFound, StorageUnavailable

if TYPE_CHECKING:
    from shared.settings import Settings

MIN_PART_SIZE = 5 * 1024 * 1024
DEFAULT_PART_SIZE = 16 * 1024 * 1024
MAX_PRESIGN_S = 7 * 24 * 3600
# A ranged reader fetches this much per GET: a few round trips per thousand small members.
RANGED_READ_AHEAD = 8 * 1024 * 1024

_MISSING_KEY_CODES = frozenset({"NoSuchKey", "NoSuchObject", "NotFound", "ResourceNotFound"})
# Errors that come back from a reachable server but still mean we cannot use it.
_CREDENTIAL_CODES = frozenset({"AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"})
_DELETE_BATCH = 1000
# Connection-level failures: urllib3's tree (MaxRetryError, NewConnectionError,
# ProtocolError, timeouts, ...) plus raw socket errors that escape it.
_TRANSPORT_ERRORS = (urllib3.exceptions.HTTPError, OSError)
# ...plus everything minio raises: S3Error, ServerError (5xx without a body),
# InvalidResponseError (a non-S3 answer, e.g. from a proxy).
_STORAGE_ERRORS = (MinioException, *_TRANSPORT_ERRORS)


def make_http_client(
    *, connect_timeout_s: float = 3.0, read_timeout_s: float = 30.0, retries: int = 2
) -> urllib3.PoolManager:
    """A urllib3 pool for minio that gives up in seconds on a dead or hung server.

    The retries cover a restarting server and a 502/503 from a proxy in front of it; with
    ``retries=2`` a refused connection fails in well under a second.
    """
    return urllib3.PoolManager(
        timeout=urllib3.Timeout(connect=connect_timeout_s, read=read_timeout_s),
        maxsize=10,
        retries=urllib3.Retry(
            total=retries,
            connect=retries,
            read=retries,
            status=retries,
            backoff_factor=0.2,
            status_forcelist=(500, 502, 503, 504),
        ),
    )


def split_endpoint(endpoint: str, *, secure: bool) -> tuple[str, bool]:
    """Accept ``host:port`` or ``http(s)://host:port``; return minio's ``(host:port, secure)``."""
    if "://" not in endpoint:
        return endpoint.strip().rstrip("/"), secure
    parts = urlsplit(endpoint.strip())
    if parts.scheme not in ("http", "https") or parts.path not in ("", "/") or parts.query:
        raise ValueError(
            f"S3 endpoint {endpoint!r} must be host[:port] or http(s)://host[:port], no path"
        )
    return parts.netloc, parts.scheme == "https"


def ensure_bucket(store: ObjectStore, log: logging.Logger) -> bool:
    """Create the bucket at start-up if it is missing. Storage being down then is not fatal:
    the service starts, answers 503 and /readyz says why until storage is back."""
    try:
        store.ensure_bucket()
    except StorageUnavailable as exc:
        log.warning("storage not ready at start (%s); /readyz reports it until it is", exc)
        return False
    return True


class ObjectStore:
    """Keys and bytes in one bucket of an S3-compatible server."""

    def __init__(self, client: Minio, bucket: str, *, public_client: Minio | None = None) -> None:
        self.client = client
        self.bucket = bucket
        # minio keeps the endpoint private; read once, for error messages only.
        self.endpoint: str = client._base_url.host
        # Presigning needs credentials and a region but no connection; see the module doc.
        self.public_client = public_client or client

    @classmethod
    def from_settings(
        cls,
        settings: Settings,
        *,
        http_client: urllib3.PoolManager | None = None,
    ) -> ObjectStore:
        """Build the store from settings: one client for the endpoint and, when a public
        endpoint is set, one for signing URLs that clients outside the network can use."""
        if not (settings.s3_access_key and settings.s3_secret_key):
            raise ValueError(
                "set FEATUREMAPS_S3_ACCESS_KEY and FEATUREMAPS_S3_SECRET_KEY to the service's "
                "own S3 user (there is no default; see docs/security.md)"
            )
        http = http_client or make_http_client()

        def client_for(endpoint_setting: str) -> Minio:
            endpoint, secure = split_endpoint(endpoint_setting, secure=settings.s3_secure)
            return Minio(
                endpoint,
                access_key=settings.s3_access_key,
                secret_key=settings.s3_secret_key,
                secure=secure,
                # Set explicitly: without a region minio would ask the server for it, and
                # the public host is often not reachable from inside the network.
                region=settings.s3_region,
                http_client=http,
            )

        client = client_for(settings.s3_endpoint)
        public_client = (
            client_for(settings.s3_public_endpoint) if settings.s3_public_endpoint else None
        )
        return cls(client, settings.s3_bucket, public_client=public_client)

    def __repr__(self) -> str:
        return f"<ObjectStore {self._where()}>"

    def _where(self) -> str:
        return f"s3://{self.bucket} at {self.endpoint}"

    def _translate(self, exc: Exception, action: str, key: str | None = None) -> Exception:
        """Map a minio/urllib3 failure onto our two storage errors."""
        target = f"{self.bucket}/{key}" if key is not None else self.bucket
        if isinstance(exc, S3Error):
            if exc.code in _MISSING_KEY_CODES and key is not None:
                return NotFound(f"no object {key!r} in bucket {self.bucket!r}")
            if exc.code == "NoSuchBucket":
                return StorageUnavailable(
                    f"bucket {self.bucket!r} does not exist at {self.endpoint} "
                    f"(create it with ensure_bucket() / `make up`)"
                )
            if exc.code in _CREDENTIAL_CODES:
                return StorageUnavailable(
                    f"S3 refused to {action} {target}: {exc.code} ({exc.message}); "
                    "check FEATUREMAPS_S3_ACCESS_KEY / FEATUREMAPS_S3_SECRET_KEY"
                )
            return StorageUnavailable(f"S3 failed to {action} {target}: {exc.code} ({exc.message})")
        if isinstance(exc, ServerError):
            return StorageUnavailable(
                f"S3 failed to {action} {target}: HTTP {exc.status_code} from {self._where()}"
            )
        if isinstance(exc, InvalidResponseError):
            return StorageUnavailable(
                f"S3 gave an invalid answer to {action} {target} at {self._where()}: {exc}"
            )
        reason = getattr(exc, "reason", None) or exc
        if isinstance(reason, urllib3.exceptions.ResponseError):
            # urllib3 retried 5xx answers until it gave up: reachable but failing.
            return StorageUnavailable(
                f"S3 at {self.endpoint} kept failing to {action} {target}: {reason}"
            )
        return StorageUnavailable(
            f"S3 unreachable at {self.endpoint} while trying to {action} "
            f"{target}: {type(reason).__name__}: {reason}"
        )

    def ensure_bucket(self) -> None:
        """Create the bucket if it does not exist (a concurrent creator is fine)."""
        try:
            if self.client.bucket_exists(self.bucket):
                return
            self.client.make_bucket(self.bucket)
        except S3Error as exc:
            if exc.code in ("BucketAlreadyOwnedByYou", "BucketAlreadyExists"):
                return
            raise self._translate(exc, "create bucket") from exc
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "create bucket") from exc

    def ping(self) -> None:
        """Cheap readiness check: one HEAD on the bucket. Raises StorageUnavailable."""
        try:
            exists = self.client.bucket_exists(self.bucket)
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "reach bucket") from exc
        if not exists:
            raise StorageUnavailable(f"bucket {self.bucket!r} does not exist at {self.endpoint}")

    def put_bytes(
        self, key: str, data: bytes, content_type: str = "application/octet-stream"
    ) -> None:
        try:
            self.client.put_object(
                self.bucket, key, io.BytesIO(data), len(data), content_type=content_type
            )
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "write", key) from exc

    def put_stream(
        self,
        key: str,
        stream: IO[bytes],
        *,
        length: int = -1,
        content_type: str = "application/octet-stream",
        part_size: int = DEFAULT_PART_SIZE,
    ) -> None:
        """Upload from a readable stream as a multipart upload, never whole in memory.

        ``length=-1`` streams until EOF. ``part_size`` must be at least 5 MiB (S3's minimum);
        memory use is bounded by it (minio holds up to about three parts while reading ahead).
        """
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3's minimum)")
        try:
            self.client.put_object(
                self.bucket,
                key,
                stream,
                length,
                content_type=content_type,
                part_size=part_size,
                # Parallel part uploads would each hold a part in memory.
                num_parallel_uploads=1,
            )
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "write", key) from exc

    def copy(self, source: str, target: str) -> None:
        """Server-side copy of ``source`` to ``target`` in this bucket (the bytes never leave
        the server); a missing source is :class:`NotFound`."""
        try:
            self.client.copy_object(self.bucket, target, CopySource(self.bucket, source))
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "copy", source) from exc

    def get_bytes(self, key: str) -> bytes:
        with self.open(key) as reader:
            return reader.read()

    def get_range(self, key: str, offset: int, length: int) -> bytes:
        """``length`` bytes of ``key`` from ``offset`` (fewer at the object's end), one ranged
        GET."""
        if offset < 0 or length < 1:
            raise ValueError(f"a range needs offset >= 0 and length >= 1, not {offset}, {length}")
        try:
            response = self.client.get_object(self.bucket, key, offset=offset, length=length)
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "read", key) from exc
        with ObjectReader(response, self, key) as reader:
            return reader.readall()

    def size(self, key: str) -> int:
        """The object's size in bytes; :class:`NotFound` when it does not exist."""
        try:
            return int(self.client.stat_object(self.bucket, key).size or 0)
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "stat", key) from exc

    def open_ranged(self, key: str, *, read_ahead: int = RANGED_READ_AHEAD) -> RangedReader:
        """A seekable, read-only file object for ``key`` that reads by ranged GETs, ``read_ahead``
        bytes at a time: random access into an archive without copying it anywhere."""
        return RangedReader(self, key, self.size(key), read_ahead=read_ahead)

    def open(self, key: str) -> ObjectReader:
        """A streaming, read-only file object for ``key``; close it (or use ``with``)."""
        try:
            response = self.client.get_object(self.bucket, key)
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "read", key) from exc
        return ObjectReader(response, self, key)

    def exists(self, key: str) -> bool:
        try:
            self.client.stat_object(self.bucket, key)
        except S3Error as exc:
            if exc.code in _MISSING_KEY_CODES:
                return False
            raise self._translate(exc, "stat", key) from exc
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "stat", key) from exc
        return True

    def list_keys(self, prefix: str = "") -> Iterator[str]:
        """Every key under ``prefix``, recursively, in key order, fetched page by page."""
        try:
            for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                if not obj.is_dir:
                    yield obj.object_name
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "list", prefix) from exc

    def list_page(self, prefix: str, *, start_after: str = "", limit: int = 1000) -> list[str]:
        """Up to ``limit`` keys under ``prefix`` after ``start_after``, in key order: one
        listing page, for callers that resume a listing from the last key they handled."""
        try:
            objects = self.client.list_objects(
                self.bucket, prefix=prefix, recursive=True, start_after=start_after or None
            )
            return [obj.object_name for obj in islice(objects, limit) if not obj.is_dir]
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "list", prefix) from exc

    def list_modified(self, prefix: str = "") -> Iterator[tuple[str, datetime]]:
        """(key, last-modified time) of every key under ``prefix``, as :meth:`list_keys`."""
        try:
            for obj in self.client.list_objects(self.bucket, prefix=prefix, recursive=True):
                if not obj.is_dir:
                    yield obj.object_name, obj.last_modified
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "list", prefix) from exc

    def delete_keys(self, keys: Iterable[str]) -> int:
        """Delete the given keys (absent ones are fine); returns how many were deleted."""
        deleted = 0
        batch: list[str] = []
        for key in keys:
            batch.append(key)
            if len(batch) == _DELETE_BATCH:
                deleted += self._delete_keys(batch)
                batch = []
        if batch:
            deleted += self._delete_keys(batch)
        return deleted

    def delete_prefix(self, prefix: str) -> int:
        """Delete every key under ``prefix``; returns how many were deleted.

        An empty prefix is refused: it would empty the whole bucket.
        """
        if not prefix:
            raise ValueError("delete_prefix needs a non-empty prefix")
        deleted = 0
        batch: list[str] = []
        for key in self.list_keys(prefix):
            batch.append(key)
            if len(batch) == _DELETE_BATCH:
                deleted += self._delete_keys(batch)
                batch = []
        if batch:
            deleted += self._delete_keys(batch)
        return deleted

    def _delete_keys(self, keys: list[str]) -> int:
        try:
            errors = list(self.client.remove_objects(self.bucket, [DeleteObject(k) for k in keys]))
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "delete", keys[0]) from exc
        if errors:
            first = errors[0]
            raise StorageUnavailable(
                f"S3 failed to delete {len(errors)} of {len(keys)} objects in "
                f"{self.bucket!r}, e.g. {first.name}: {first.code} ({first.message})"
            )
        return len(keys)

    def presigned_get(self, key: str, expires_s: int) -> str:
        """A GET URL for ``key``, signed for the public endpoint, valid ``expires_s`` seconds."""
        if not 1 <= expires_s <= MAX_PRESIGN_S:
            raise ValueError(f"expires_s must be between 1 and {MAX_PRESIGN_S} (7 days)")
        try:
            return self.public_client.presigned_get_object(
                self.bucket, key, expires=timedelta(seconds=expires_s)
            )
        except _STORAGE_ERRORS as exc:
            raise self._translate(exc, "sign a URL for", key) from exc

    def close(self) -> None:
        """Drop pooled connections (the store can still be used; it reconnects)."""
        self.client._http.clear()
        self.public_client._http.clear()


class ObjectReader(io.RawIOBase):
    """A read-only stream over one object's body that raises our storage errors.

    Closing it returns the connection to the pool.
    """

    def __init__(self, response: Any, store: ObjectStore, key: str) -> None:
        super().__init__()
        self._response = response
        self._store = store
        self.key = key
        header = response.headers.get("Content-Length")
        self.size: int | None = int(header) if header is not None else None
        self.content_type: str | None = response.headers.get("Content-Type")

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        try:
            return self._response.readinto(buffer)
        except _TRANSPORT_ERRORS as exc:
            raise self._store._translate(exc, "read", self.key) from exc

    def readall(self) -> bytes:
        # RawIOBase's default reads 8 KiB at a time; urllib3 reads the rest in one go.
        try:
            return self._response.read()
        except _TRANSPORT_ERRORS as exc:
            raise self._store._translate(exc, "read", self.key) from exc

    def close(self) -> None:
        if not self.closed:
            self._response.close()
            self._response.release_conn()
        super().close()


class RangedReader(io.RawIOBase):
    """A seekable, read-only view of one object: ``read``/``seek``/``tell`` served from a
    read-ahead buffer that is refilled by one ranged GET of ``read_ahead`` bytes (or of the
    read's own size, when larger). Memory is bounded by the buffer, whatever the object's size."""

    def __init__(self, store: ObjectStore, key: str, size: int, *, read_ahead: int) -> None:
        super().__init__()
        if read_ahead < 1:
            raise ValueError("read_ahead must be at least 1 byte")
        self._store = store
        self.key = key
        self.size = size
        self._read_ahead = read_ahead
        self._position = 0
        self._buffer = b""
        self._buffer_start = 0
        self.gets = 0  # ranged GETs made, for tests and benchmarks

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._position

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._position, io.SEEK_END: self.size}[whence]
        if base + offset < 0:
            raise ValueError(f"cannot seek to {base + offset} in {self.key!r}")
        self._position = base + offset
        return self._position

    def readinto(self, buffer: Any) -> int:
        data = self.read(len(buffer))
        buffer[: len(data)] = data
        return len(data)

    def read(self, size: int | None = -1) -> bytes:
        end = self.size if size is None or size < 0 else min(self.size, self._position + size)
        if end <= self._position:
            return b""
        if not self._buffered(self._position, end):
            self._fill(self._position, max(end - self._position, self._read_ahead))
        start = self._position - self._buffer_start
        data = self._buffer[start : start + end - self._position]
        self._position += len(data)
        return data

    def readall(self) -> bytes:
        return self.read(-1)

    def _buffered(self, start: int, end: int) -> bool:
        return self._buffer_start <= start and end <= self._buffer_start + len(self._buffer)

    def _fill(self, start: int, length: int) -> None:
        self._buffer = self._store.get_range(self.key, start, min(length, self.size - start))
        self._buffer_start = start
        self.gets += 1
