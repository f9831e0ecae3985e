"""Reading an uploaded image from a multipart request and validating it before anything is
stored: size (413, enforced by Werkzeug while reading), type (415), decodability and pixel
count (422), missing or empty field and bad options (400)."""

from __future__ import annotations

from dataclasses import dataclass

from flask import Request

from shared.errors import EmptyImage, MissingField, PayloadTooLarge
from shared.imaging import ImageInfo, validate_image
from shared.options import JobOptions
from shared.webhooks import CALLBACK_FIELD

CONTENT_TYPES = {
    "jpg": "image/jpeg",
    "png": "image/png",
    "webp": "image/webp",
    "bmp": "image/bmp",
    "gif": "image/gif",
    "tiff": "image/tiff",
    "heic": "image/heic",
    "avif": "image/avif",
}


@dataclass(frozen=True)
class Upload:
    data: bytes
    info: ImageInfo
    options: JobOptions
    callback_url: str | None = None  # as sent; checked by shared.webhooks

    @property
    def content_type(self) -> str:
        return CONTENT_TYPES[self.info.ext]


def read_image_upload(request: Request, *, field: str, max_pixels: int, max_bytes: int) -> Upload:
    # Touching request.files parses the body and applies the size and part limits.
    files = request.files
    if field not in files:
        raise MissingField(
            f"send the image as multipart/form-data field {field!r} "
            f"(e.g. curl -F {field}=@photo.jpg)"
        )
    form = request.form.to_dict()
    callback_url = form.pop(CALLBACK_FIELD, None)
    options = JobOptions.for_job(form)
    data = files[field].read()
    if not data:
        raise EmptyImage(f"the uploaded file in field {field!r} is empty")
    if len(data) > max_bytes:
        # The body limit allows for multipart framing; the file itself gets the exact limit.
        raise PayloadTooLarge(
            f"the image is {len(data)} bytes; the limit is {max_bytes} bytes "
            f"({max_bytes / 2**20:g} MB)"
        )
    info = validate_image(data, max_pixels=max_pixels)
    return Upload(data=data, info=info, options=options, callback_url=callback_url)
