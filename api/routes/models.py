"""/models: upload weights for an architecture, list the enabled architectures and the
caller's uploads, read or delete one (docs/design.md "Uploaded models")."""

from __future__ import annotations

from flask import Blueprint, request, url_for

from api.enqueue import best_effort
from api.model_uploads import receive_model
from api.services import services

bp = Blueprint("models", __name__)


@bp.post("/models")
def upload_model():
    svc = services()
    model = receive_model(request, svc, svc.caller(request))
    location = url_for("models.get_model", model_id=model.id)
    return model.document(), 201, {"Location": location}


@bp.get("/models")
def list_models():
    svc = services()
    owner = svc.caller(request)
    return {
        "architectures": list(svc.settings.enabled_models),
        "uploads": [model.document() for model in svc.models.list(owner)],
    }


@bp.get("/models/<model_id>")
def get_model(model_id: str):
    svc = services()
    return svc.models.get(model_id, owner=svc.caller(request)).document()


@bp.delete("/models/<model_id>")
def delete_model(model_id: str):
    svc = services()
    model = svc.models.get(model_id, owner=svc.caller(request))
    svc.models.delete(model)
    # Jobs still queued on it fail model_deleted; the object goes now (the record is gone,
    # so no worker loads it again).
    best_effort(f"weights of model {model.id}", lambda: svc.store.delete_keys([model.key]))
    return "", 204
