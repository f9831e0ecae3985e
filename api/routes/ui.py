"""The web page: public HTML shells (submit, job, batch, a batch's dataset examples) whose
scripts call the JSON API with the caller's token from session storage. No build step;
everything is served from ``api/``."""

from __future__ import annotations

from flask import Blueprint, render_template

from api.services import services
from shared.options import COLORMAPS, FORMATS, MODES, NORMALIZATIONS, PRECISIONS, REDUCTIONS

bp = Blueprint("ui", __name__)

# The pages load scripts and styles from here only; figures and thumbnails come from the S3
# server's presigned URLs, another origin.
CONTENT_SECURITY_POLICY = (
    "default-src 'self'; img-src 'self' data: http: https:; script-src 'self'; "
    "style-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'"
)


def _page(template: str, **context):
    settings = services().settings
    body = render_template(
        template,
        tokens_required=bool(settings.token_table),
        max_upload_mb=settings.max_upload_mb,
        **context,
    )
    return body, 200, {"Content-Security-Policy": CONTENT_SECURITY_POLICY}


@bp.get("/")
def submit_page():
    return _page(
        "submit.html",
        choices={
            # The architectures this deployment enables (uploads need a token to list: the
            # API and the client take them).
            "model": services().settings.enabled_models,
            "mode": MODES,
            "reduction": REDUCTIONS,
            "normalize": NORMALIZATIONS,
            "colormap": COLORMAPS,
            "format": FORMATS,
            "precision": PRECISIONS,
        },
    )


@bp.get("/ui/jobs/<job_id>")
def job_page(job_id: str):
    return _page("job.html", job_id=job_id)


@bp.get("/ui/batches/<batch_id>")
def batch_page(batch_id: str):
    return _page("batch.html", batch_id=batch_id)


@bp.get("/ui/batches/<batch_id>/examples")
def examples_page(batch_id: str):
    return _page("examples.html", batch_id=batch_id)
