"""The ``model`` option at submission: an architecture the operator enabled
(``FEATUREMAPS_MODELS``) that can do the options asked for (docs/design.md "Models")."""

from __future__ import annotations

from api.services import Services
from shared.options import JobOptions


def check_model(svc: Services, options: JobOptions, owner: str) -> None:
    """Refuse (400 ``invalid_option``) a model that is not enabled here."""
    options.check_enabled(svc.settings.enabled_models)
