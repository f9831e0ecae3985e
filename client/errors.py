"""The client's exception tree. Every error from the API carries its stable ``code`` (the
API's ``{"error": {"code", "message"}}``) and HTTP ``status``; the class says which family.

    ClientError                  code, message
    ├── ApiError                 + status (an HTTP answer from the API)
    │   ├── BadRequest           400  invalid_option, missing_field, empty_image, bad_request
    │   ├── Unauthorized         401  unauthorized
    │   ├── Forbidden            403  forbidden_source (an s3:// source not allowed)
    │   ├── NotFound             404  not_found
    │   ├── Conflict             409  conflict
    │   ├── TooLarge             413  too_large
    │   ├── UnsupportedType      415  unsupported_type
    │   ├── Unprocessable        422  truncated_image, too_many_pixels, corrupt_archive, …
    │   ├── RateLimited          429  rate_limited (+ retry_after)
    │   └── Unavailable          503  unavailable, storage_unavailable (+ retry_after)
    ├── JobFailed                a job that ended failed or canceled; code is the job's own
    └── OutputNotMade            a job that succeeded without the output asked for (maps.npz
                                 without arrays=True); code ``not_requested``
"""

from __future__ import annotations

import requests


class ClientError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class ApiError(ClientError):
    status = 0

    def __init__(
        self, status: int, code: str, message: str, *, retry_after: float | None = None
    ) -> None:
        super().__init__(code, message)
        self.status = status
        self.retry_after = retry_after

    def __str__(self) -> str:
        return f"{self.status} {self.code}: {self.message}"


class BadRequest(ApiError):
    pass


class Unauthorized(ApiError):
    pass


class Forbidden(ApiError):
    pass


class NotFound(ApiError):
    pass


class Conflict(ApiError):
    pass


class TooLarge(ApiError):
    pass


class UnsupportedType(ApiError):
    pass


class Unprocessable(ApiError):
    pass


class RateLimited(ApiError):
    pass


class Unavailable(ApiError):
    pass


class JobFailed(ClientError):
    def __init__(self, job_id: str, status: str, code: str, message: str) -> None:
        super().__init__(code, message)
        self.job_id = job_id
        self.status = status

    def __str__(self) -> str:
        return f"job {self.job_id} {self.status}: {self.code}: {self.message}"


class OutputNotMade(ClientError):
    """The job succeeded, but was submitted without the option that makes this output."""

    def __init__(self, job_id: str, output: str, message: str) -> None:
        super().__init__("not_requested", message)
        self.job_id = job_id
        self.output = output

    def __str__(self) -> str:
        return f"job {self.job_id} has no {self.output}: {self.message}"


_BY_STATUS: dict[int, type[ApiError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    409: Conflict,
    413: TooLarge,
    415: UnsupportedType,
    422: Unprocessable,
    429: RateLimited,
    503: Unavailable,
}


def error_from_response(response: requests.Response) -> ApiError:
    """The typed exception for an error answer (the API's JSON body, or a proxy's page)."""
    try:
        error = response.json()["error"]
        code, message = str(error["code"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        code, message = f"http_{response.status_code}", response.text[:200]
    cls = _BY_STATUS.get(response.status_code, ApiError)
    return cls(response.status_code, code, message, retry_after=retry_after(response))


def retry_after(response: requests.Response) -> float | None:
    """Retry-After in seconds (the API sends delta-seconds; an HTTP date is not used)."""
    value = response.headers.get("Retry-After", "").strip()
    try:
        return max(0.0, float(value)) if value else None
    except ValueError:
        return None
