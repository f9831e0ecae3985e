"""The ``model`` option at submission (docs/design.md "Models"): an architecture the operator
enabled (``FEATUREMAPS_MODELS``), or one of the caller's uploaded models, that can do the
options asked for."""

from __future__ import annotations

from api.services import Services
from shared.architectures import layer_names, select_layers
from shared.options import JobOptions, check_upload_enabled, is_upload_id


def check_model(svc: Services, options: JobOptions, owner: str) -> None:
    """Refuse a model that is not enabled here (400 ``invalid_option``), an upload that is
    not the caller's (404 ``not_found``) or of an architecture not enabled, ``mode=chain``
    outside the ResNet family and a ``layers`` pattern that matches none of the model's
    layers (400)."""
    options.check_enabled(svc.settings.enabled_models)
    architecture = options.model
    if is_upload_id(options.model):
        architecture = svc.models.get(options.model, owner=owner).architecture
        check_upload_enabled(options.model, architecture, svc.settings.enabled_models)
    select_layers(layer_names(architecture, options.mode), options.layers)
