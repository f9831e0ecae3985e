"""The featuremaps exception tree.

Every error the service can report derives from :class:`FeatureMapsError` and carries a
stable machine-readable ``code`` and the HTTP status it maps to. The API's single error
handler turns any of them into ``{"error": {"code": ..., "message": ...}}``; workers store
the same code in the failed job's document.

    FeatureMapsError
    ├── BadRequest            400  invalid_option, missing_field, empty_image, bad_request,
    │                              invalid_idempotency_key, callback_url_refused
    ├── Unauthorized          401  unauthorized
    ├── Forbidden             403  forbidden_source
    ├── NotFound              404  not_found
    ├── Conflict              409  conflict, idempotency_in_progress (+ Retry-After)
    ├── PayloadTooLarge       413  too_large
    ├── UnsupportedType       415  unsupported_type
    ├── Unprocessable         422  truncated_image, undecodable_image, too_many_pixels,
    │   │                          corrupt_archive, idempotency_mismatch, unsafe_weights,
    │   │                          not_a_state_dict, weights_mismatch (shared/weights_files.py)
    │   ├── RefusedMember          the member's own code (below)
    │   └── ArchiveLimitExceeded   archive_too_many_members, archive_too_large,
    │                              archive_member_too_large, archive_bomb
    ├── RateLimited           429  rate_limited
    ├── ServiceUnavailable    503  unavailable, storage_unavailable
    ├── WeightsUnavailable    500  weights_unavailable (worker start-up)
    └── DeviceUnavailable     500  device_unavailable (worker start-up)

The base classes' own codes (forbidden, unprocessable, archive_limit, refused_member) are
never sent: every raise is a subclass or names its code.

Codes that are never raised to a caller, named here so that every code has one spelling:

    a refused archive member (RefusedMember's code; the item fails, the batch goes on)
        ABSOLUTE_PATH, PATH_TRAVERSAL, BAD_NAME       a name that could escape a directory
        SYMLINK, SPECIAL_FILE                         anything but a regular file
        HARDLINK                                      a tar hard link leaving the archive
                                                      or naming no earlier member
        ENCRYPTED, CORRUPT_MEMBER                     an unreadable zip member
        NESTED_ARCHIVE                                an archive inside the archive
    a failed job or item (stored in its ``error``)
        INTERNAL_ERROR   a bug ended it (also FeatureMapsError's own code, and the API's 500)
        TIMEOUT          it ran past its time limit
        WORKER_LOST      its worker died while running it MAX_ATTEMPTS times
        LOST             a batch item's input vanished from storage (a job's: not_found)
        SOURCE_MISSING   a batch's source vanished before it was read
        RETRYING         not a failure: a storage error is being retried (a queued job's
                         error; items never show it)
        MODEL_DELETED    the uploaded model it names was deleted before it ran
    an HTTP error Werkzeug raises before a view runs
        METHOD_NOT_ALLOWED   405
"""

from __future__ import annotations

ABSOLUTE_PATH = "absolute_path"
PATH_TRAVERSAL = "path_traversal"
BAD_NAME = "bad_name"
SYMLINK = "symlink"
HARDLINK = "hardlink"
SPECIAL_FILE = "special_file"
ENCRYPTED = "encrypted"
CORRUPT_MEMBER = "corrupt_member"
NESTED_ARCHIVE = "nested_archive"
INTERNAL_ERROR = "internal_error"
TIMEOUT = "timeout"
WORKER_LOST = "worker_lost"
LOST = "lost"
SOURCE_MISSING = "source_missing"
RETRYING = "retrying"
MODEL_DELETED = "model_deleted"
METHOD_NOT_ALLOWED = "method_not_allowed"


class FeatureMapsError(Exception):
    code = INTERNAL_ERROR
    http_status = 500
    # Seconds a client should wait before trying again (sent as Retry-After), when it should.
    retry_after: int | None = None

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def to_dict(self) -> dict:
        return {"code": self.code, "message": self.message}


class BadRequest(FeatureMapsError):
    code = "bad_request"
    http_status = 400


class InvalidOption(BadRequest):
    code = "invalid_option"


class MissingField(BadRequest):
    code = "missing_field"


class EmptyImage(BadRequest):
    code = "empty_image"


class InvalidIdempotencyKey(BadRequest):
    code = "invalid_idempotency_key"


class CallbackRefused(BadRequest):
    """A callback_url that is malformed, does not resolve, or resolves to an address that
    callbacks may not reach (shared/webhooks.py)."""

    code = "callback_url_refused"


class Unauthorized(FeatureMapsError):
    code = "unauthorized"
    http_status = 401


class Forbidden(FeatureMapsError):
    code = "forbidden"
    http_status = 403


class ForbiddenSource(Forbidden):
    """An ``s3://`` batch source that FEATUREMAPS_SOURCE_ALLOW does not allow this caller."""

    code = "forbidden_source"


class NotFound(FeatureMapsError):
    code = "not_found"
    http_status = 404


class Conflict(FeatureMapsError):
    code = "conflict"
    http_status = 409


class IdempotencyInProgress(Conflict):
    """Another request with the same Idempotency-Key is still creating its record."""

    code = "idempotency_in_progress"

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class PayloadTooLarge(FeatureMapsError):
    code = "too_large"
    http_status = 413


class UnsupportedType(FeatureMapsError):
    code = "unsupported_type"
    http_status = 415


class Unprocessable(FeatureMapsError):
    code = "unprocessable"
    http_status = 422


class TruncatedImage(Unprocessable):
    code = "truncated_image"


class UndecodableImage(Unprocessable):
    code = "undecodable_image"


class TooManyPixels(Unprocessable):
    code = "too_many_pixels"


class IdempotencyMismatch(Unprocessable):
    """An Idempotency-Key already used by this caller for a different request."""

    code = "idempotency_mismatch"


class RateLimited(FeatureMapsError):
    code = "rate_limited"
    http_status = 429

    def __init__(self, message: str, *, retry_after: int) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class ServiceUnavailable(FeatureMapsError):
    code = "unavailable"
    http_status = 503


class StorageUnavailable(ServiceUnavailable):
    code = "storage_unavailable"


class WeightsUnavailable(FeatureMapsError):
    code = "weights_unavailable"
    http_status = 500


class DeviceUnavailable(FeatureMapsError):
    """The configured FEATUREMAPS_DEVICE does not exist here (worker start-up)."""

    code = "device_unavailable"
    http_status = 500


class ArchiveLimitExceeded(Unprocessable):
    """An archive went over one of the MAX_ARCHIVE_* limits; its expansion stops there."""

    code = "archive_limit"


class ArchiveTooManyMembers(ArchiveLimitExceeded):
    code = "archive_too_many_members"


class ArchiveTooLarge(ArchiveLimitExceeded):
    code = "archive_too_large"


class ArchiveMemberTooLarge(ArchiveLimitExceeded):
    code = "archive_member_too_large"


class ArchiveBomb(ArchiveLimitExceeded):
    code = "archive_bomb"


class CorruptArchive(Unprocessable):
    code = "corrupt_archive"


class RefusedMember(Unprocessable):
    """One archive member that is never read or written anywhere, with its own code
    (``ABSOLUTE_PATH`` … ``NESTED_ARCHIVE`` above). The batch goes on; the member becomes a
    failed item."""

    code = "refused_member"
