"""The ``model`` option at submission (docs/design.md "Models"): an architecture the operator
enabled (``FEATUREMAPS_MODELS``), or one of the caller's uploaded models, that can do the
options asked for."""

from __future__ import annotations

from api.services import Services
from shared.options import JobOptions, is_upload_id


def check_model(svc: Services, options: JobOptions, owner: str) -> None:
    """Refuse a model that is not enabled here (400 ``invalid_option``), an upload that is
    not the caller's (404 ``not_found``) and ``mode=chain`` on an upload outside the ResNet
    family (400)."""
    options.check_enabled(svc.settings.enabled_models)
    if is_upload_id(options.model):
        uploaded = svc.models.get(options.model, owner=owner)
        options.check_architecture(uploaded.architecture)
