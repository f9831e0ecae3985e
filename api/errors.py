"""One place that turns every error into the JSON error body and its status."""

from __future__ import annotations

import logging

from flask import Flask, jsonify, request
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from werkzeug.exceptions import HTTPException, RequestEntityTooLarge

from shared.errors import (
    INTERNAL_ERROR,
    METHOD_NOT_ALLOWED,
    BadRequest,
    FeatureMapsError,
    NotFound,
    PayloadTooLarge,
    ServiceUnavailable,
    Unauthorized,
    UnsupportedType,
)

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: BadRequest.code,
    404: NotFound.code,
    405: METHOD_NOT_ALLOWED,
    413: PayloadTooLarge.code,
    415: UnsupportedType.code,
}


def error_response(status: int, code: str, message: str):
    response = jsonify({"error": {"code": code, "message": message}})
    response.status_code = status
    return response


def register_error_handlers(app: Flask) -> None:
    @app.errorhandler(FeatureMapsError)
    def _feature_maps_error(exc: FeatureMapsError):
        response = error_response(exc.http_status, exc.code, exc.message)
        if isinstance(exc, Unauthorized):
            response.headers["WWW-Authenticate"] = 'Bearer realm="featuremaps"'
        if exc.retry_after is not None:
            response.headers["Retry-After"] = str(exc.retry_after)
        return response

    @app.errorhandler(RequestEntityTooLarge)
    def _too_large(exc: RequestEntityTooLarge):
        return error_response(413, PayloadTooLarge.code, _too_large_message(app))

    @app.errorhandler(HTTPException)
    def _http_error(exc: HTTPException):
        status = exc.code or 500
        code = _HTTP_CODES.get(status, f"http_{status}")
        response = error_response(status, code, exc.description)
        # Werkzeug's own headers (e.g. Allow on a 405, which RFC 9110 requires), not its body's.
        for name, value in exc.get_headers():
            if name.lower() != "content-type":
                response.headers[name] = value
        return response

    @app.errorhandler(RedisConnectionError)
    @app.errorhandler(RedisTimeoutError)
    def _redis_down(exc: Exception):
        log.warning("redis unavailable: %s", exc)
        unavailable = ServiceUnavailable("the job store (Redis) is unavailable; try again shortly")
        return error_response(503, unavailable.code, unavailable.message)

    @app.errorhandler(Exception)
    def _unexpected(exc: Exception):
        log.exception("unhandled error")
        return error_response(500, INTERNAL_ERROR, "an unexpected error occurred; it was logged")


def _too_large_message(app: Flask) -> str:
    """Say which limit a 413 from Werkzeug's body reader hit, in the units people use."""
    settings = app.extensions["featuremaps"].settings
    if request.path == "/models":
        return (
            f"the upload is over the weights file limit of {settings.max_model_bytes} bytes "
            "(FEATUREMAPS_MAX_MODEL_BYTES)"
        )
    limit_mb = settings.max_upload_mb
    declared = request.content_length
    if declared is not None and declared > (app.config["MAX_CONTENT_LENGTH"] or declared):
        return (
            f"the request body is {declared / 2**20:.1f} MB; uploads are limited to "
            f"{limit_mb:g} MB (FEATUREMAPS_MAX_UPLOAD_MB)"
        )
    return (
        f"the request is over a limit: uploads are limited to {limit_mb:g} MB "
        f"(FEATUREMAPS_MAX_UPLOAD_MB), {app.config['MAX_FORM_PARTS']} form parts, and "
        f"{app.config['MAX_FORM_MEMORY_SIZE'] // 1024} KB per text field"
    )
