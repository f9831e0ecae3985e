"""Job options: what a user may ask for, validated the same way by the API, the CLI and the
worker. Bad values raise :class:`InvalidOption` naming the allowed ones."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import asdict, dataclass

from shared.errors import InvalidOption

MODES = ("chain", "forward")
REDUCTIONS = ("mean", "max", "std", "l2")
NORMALIZATIONS = ("none", "imagenet")
FORMATS = ("jpg", "png", "webp", "svg", "pdf")
RASTER_FORMATS = ("jpg", "png", "webp")
RENDERERS = ("fast", "matplotlib")
# auto: exact on the CPU, fast on CUDA (worker/compute/precision.py says what each one does).
PRECISIONS = ("auto", "exact", "fast")
# A fixed list so the API can validate without importing matplotlib.
COLORMAPS = (
    "viridis",
    "plasma",
    "inferno",
    "magma",
    "cividis",
    "gray",
    "gray_r",
    "hot",
    "jet",
    "turbo",
    "coolwarm",
    "RdBu_r",
    "Greys",
    "bone",
    "twilight",
)
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off", "")


@dataclass(frozen=True)
class JobOptions:
    mode: str = "chain"
    reduction: str = "mean"
    normalize: str = "none"
    format: str = "jpg"
    colormap: str = "viridis"
    renderer: str = "fast"
    precision: str = "auto"
    per_layer: bool = False
    arrays: bool = False

    def __post_init__(self) -> None:
        for name, allowed in (
            ("mode", MODES),
            ("reduction", REDUCTIONS),
            ("normalize", NORMALIZATIONS),
            ("format", FORMATS),
            ("colormap", COLORMAPS),
            ("renderer", RENDERERS),
            ("precision", PRECISIONS),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise InvalidOption(f"option {name}={value!r} is not one of: {', '.join(allowed)}")

    def to_dict(self) -> dict:
        return asdict(self)

    def output_identity(self) -> str:
        """Canonical JSON of the options that change the outputs, for result reuse's digest
        (worker/reuse.py). Every option does today; one that does not (a priority, a
        callback) must stay out of it, or equal results would not be found."""
        return json.dumps(self.to_dict(), sort_keys=True, separators=(",", ":"))

    @classmethod
    def from_mapping(cls, data: Mapping[str, object]) -> JobOptions:
        """Build from form fields or JSON; strings for booleans are accepted."""
        known = {f for f in cls.__dataclass_fields__}
        unknown = sorted(set(data) - known)
        if unknown:
            raise InvalidOption(
                f"unknown option(s): {', '.join(unknown)}; known: {', '.join(sorted(known))}"
            )
        values: dict[str, object] = {}
        for name, raw in data.items():
            if name in ("per_layer", "arrays"):
                values[name] = parse_bool(name, raw)
            elif isinstance(raw, str):
                values[name] = raw.strip()
            else:
                raise InvalidOption(f"option {name} must be a string")
        return cls(**values)


def parse_bool(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE:
        return True
    if isinstance(raw, str) and raw.strip().lower() in _FALSE:
        return False
    raise InvalidOption(f"option {name} must be true or false, not {raw!r}")


# Every option's default, for the places that show them (the OpenAPI document, the CLI).
DEFAULTS = JobOptions()
