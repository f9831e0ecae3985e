"""Receiving an uploaded model (POST /models): the weights file is spooled to disk by
Werkzeug, hashed, read without running anything in it (shared/weights_files.py), checked
against the architecture's state_dict, then stored under its content-addressed key and
recorded (shared/models.py; docs/design.md "Uploaded models")."""

from __future__ import annotations

import hashlib
from typing import IO

from flask import Request

from api.services import Services
from shared.errors import InvalidOption, MissingField, PayloadTooLarge
from shared.models import UploadedModel
from shared.options import ARCHITECTURES
from shared.weights_files import NotAStateDict, check_fits, inspect_weights

WEIGHTS_FIELD = "weights"
# Multipart framing and the text fields around the file.
FORM_OVERHEAD_BYTES = 64 * 1024
MAX_NAME_CHARS = 200


def receive_model(req: Request, svc: Services, owner: str) -> UploadedModel:
    """Check and store an upload; its record, saved. 400/413/422 for what is refused, before
    anything is stored."""
    limit = svc.settings.max_model_bytes
    _check_declared_size(req, limit)
    req.max_content_length = limit + FORM_OVERHEAD_BYTES
    files = req.files  # parses the body, spooling the file part to disk
    architecture = _architecture(req.form.get("architecture", ""), svc.settings.enabled_models)
    name = _name(req.form.get("name", ""))
    if WEIGHTS_FIELD not in files:
        raise MissingField(
            f"send the weights file as multipart/form-data field {WEIGHTS_FIELD!r} (e.g. curl "
            f"-F {WEIGHTS_FIELD}=@resnet50.safetensors -F architecture=resnet50)"
        )
    stream = files[WEIGHTS_FIELD].stream
    size, sha256 = _size_and_digest(stream)
    if size > limit:
        raise PayloadTooLarge(_too_large(size, limit))
    if size == 0:
        raise NotAStateDict(f"the uploaded file in field {WEIGHTS_FIELD!r} is empty")
    weights = inspect_weights(stream)
    check_fits(weights, architecture)
    model = svc.models.new(
        owner, architecture=architecture, sha256=sha256, size=size, name=name, fmt=weights.format
    )
    stream.seek(0)
    svc.store.put_stream(model.key, stream, length=size)
    svc.models.save(model)
    return model


def _check_declared_size(req: Request, limit: int) -> None:
    declared = req.content_length
    if declared is not None and declared > limit + FORM_OVERHEAD_BYTES:
        raise PayloadTooLarge(_too_large(declared, limit))


def _too_large(size: int, limit: int) -> str:
    return (
        f"the upload is {size} bytes; weights files are limited to {limit} bytes "
        f"({limit / 2**30:g} GiB, FEATUREMAPS_MAX_MODEL_BYTES)"
    )


def _architecture(raw: str, enabled: tuple[str, ...]) -> str:
    architecture = raw.strip()
    if not architecture:
        raise MissingField(
            f"send the form field 'architecture': one of the enabled {', '.join(enabled)}"
        )
    if architecture not in ARCHITECTURES or architecture not in enabled:
        raise InvalidOption(
            f"architecture={architecture!r} is not enabled here; enabled: {', '.join(enabled)}"
        )
    return architecture


def _name(raw: str) -> str:
    name = raw.strip()
    if len(name) > MAX_NAME_CHARS or not name.isprintable():
        raise InvalidOption(f"name must be at most {MAX_NAME_CHARS} printable characters")
    return name


def _size_and_digest(stream: IO[bytes]) -> tuple[int, str]:
    digest = hashlib.sha256()
    size = 0
    stream.seek(0)
    for block in iter(lambda: stream.read(1 << 20), b""):
        digest.update(block)
        size += len(block)
    stream.seek(0)
    return size, digest.hexdigest()
