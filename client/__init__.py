"""The featuremaps client: the :class:`Client` library for notebooks and scripts, and the
`featuremaps` command built on it (`local` runs the pipeline in-process; `submit`, `status`,
`download` and `batch` talk to the service over HTTP)."""

from client.api import Batch, BatchItem, Client, Job
from client.errors import (
    ApiError,
    BadRequest,
    ClientError,
    Conflict,
    Forbidden,
    JobFailed,
    NotFound,
    OutputNotMade,
    RateLimited,
    TooLarge,
    Unauthorized,
    Unavailable,
    Unprocessable,
    UnsupportedType,
)
from client.examples import Example, ExampleLayer, Examples, Picture

__all__ = [
    "ApiError",
    "BadRequest",
    "Batch",
    "BatchItem",
    "Client",
    "ClientError",
    "Conflict",
    "Example",
    "ExampleLayer",
    "Examples",
    "Forbidden",
    "Job",
    "JobFailed",
    "NotFound",
    "OutputNotMade",
    "Picture",
    "RateLimited",
    "TooLarge",
    "Unauthorized",
    "Unavailable",
    "Unprocessable",
    "UnsupportedType",
]
