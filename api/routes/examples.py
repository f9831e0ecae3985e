"""/batches/<id>/examples: a finished batch's dataset examples (``api/examples.py``), the
summary and one layer in full."""

from __future__ import annotations

from flask import Blueprint, request, url_for

from api.examples import layer_document, read_examples, summary_document
from api.services import services

bp = Blueprint("examples", __name__)


@bp.get("/batches/<batch_id>/examples")
def get_examples(batch_id: str):
    svc = services()
    batch = svc.batches.get(batch_id, owner=svc.caller(request))
    examples = read_examples(svc.store, batch)
    return summary_document(
        svc.store,
        examples,
        svc.settings.presign_expiry_s,
        lambda layer: url_for("examples.get_layer", batch_id=batch_id, layer=layer["index"]),
    )


@bp.get("/batches/<batch_id>/examples/<layer>")
def get_layer(batch_id: str, layer: str):
    svc = services()
    batch = svc.batches.get(batch_id, owner=svc.caller(request))
    examples = read_examples(svc.store, batch)
    return layer_document(svc.store, examples, layer, svc.settings.presign_expiry_s)
