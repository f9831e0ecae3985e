"""The featuremaps exception tree.

Every error the service can report derives from :class:`FeatureMapsError` and carries a
stable machine-readable ``code`` and the HTTP status it maps to. The API's single error
handler turns any of them into ``{"error": {"code": ..., "message": ...}}``; workers store
the same code in the failed job's document.

    FeatureMapsError
    ├── BadRequest            400  invalid_option, missing_field, empty_image, bad_request
    ├── Unauthorized          401  unauthorized
    ├── Forbidden             403  forbidden_source
    ├── NotFound              404  not_found
    ├── Conflict              409  conflict
    ├── PayloadTooLarge       413  too_large
    ├── UnsupportedType       415  unsupported_type
    ├── Unprocessable         422  truncated_image, undecodable_image, too_many_pixels,
    │   │                          corrupt_archive, refused_member
    │   └── ArchiveLimitExceeded   archive_too_many_members, archive_too_large,
    │                              archive_member_too_large, archive_bomb
    ├── RateLimited           429  rate_limited
    ├── ServiceUnavailable    503  unavailable, storage_unavailable
    ├── WeightsUnavailable    500  weights_unavailable (worker start-up)
    └── DeviceUnavailable     500  device_unavailable (worker start-up)
"""

from __future__ import annotations


class FeatureMapsError(Exception):
    code = "internal_error"
    http_status = 500

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
    """One archive member that is never read or written anywhere: ``absolute_path``,
    ``path_traversal``, ``symlink``, ``hardlink``, ``special_file``, ``encrypted``,
    ``nested_archive``. The batch goes on; the member becomes a failed item."""

    code = "refused_member"
