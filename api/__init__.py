"""The HTTP API: a Flask app factory and thin blueprints. It validates, stores the upload,
writes the job record and sends the task by name; it never imports torch or worker code."""

from __future__ import annotations

from flask import Flask

from api.audit import init_audit_log
from api.errors import register_error_handlers
from api.metrics import init_metrics
from api.routes import batches, examples, health, jobs, models, ui
from api.services import Services
from shared.settings import Settings
from shared.storage import ensure_bucket

# Multipart framing (boundaries, headers, small option fields) on top of the file itself.
FORM_OVERHEAD_BYTES = 64 * 1024
# Werkzeug's multipart decoder checks MAX_FORM_MEMORY_SIZE against its whole internal buffer
# on every read, file parts included: the bytes it kept back (a possible partial boundary at
# the end of the last chunk) plus the next read chunk of MultiPartParser.buffer_size (64 KiB).
# With the limit at 64 KiB, any upload whose chunk happened to end near a CR or LF byte was
# refused 413, so most photos over ~300 KB were. The limit must leave room for one read chunk
# on top of what a text field may hold; text fields stay capped (Werkzeug also counts each
# field's own size against it).
MULTIPART_READ_CHUNK_BYTES = 64 * 1024
FORM_FIELD_MEMORY_BYTES = FORM_OVERHEAD_BYTES + MULTIPART_READ_CHUNK_BYTES


def create_app(settings: Settings | None = None, services: Services | None = None) -> Flask:
    settings = settings or Settings()
    app = Flask(__name__)
    limit_request_bodies(app, settings)
    app.json.sort_keys = False
    app.extensions["featuremaps"] = services = services or Services.from_settings(settings)
    ensure_bucket(services.store, app.logger)
    register_error_handlers(app)
    init_audit_log()
    init_metrics(app)
    app.register_blueprint(health.bp)
    app.register_blueprint(jobs.bp)
    app.register_blueprint(batches.bp)
    app.register_blueprint(examples.bp)
    app.register_blueprint(models.bp)
    app.register_blueprint(ui.bp)
    return app


def limit_request_bodies(app: Flask, settings: Settings) -> None:
    """Body limits that Werkzeug enforces while it reads, with or without Content-Length."""
    app.config["MAX_CONTENT_LENGTH"] = settings.max_upload_bytes + FORM_OVERHEAD_BYTES
    app.config["MAX_FORM_MEMORY_SIZE"] = FORM_FIELD_MEMORY_BYTES
    app.config["MAX_FORM_PARTS"] = settings.max_form_parts
