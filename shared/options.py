"""Job options: what a user may ask for, validated the same way by the API, the CLI and the
worker. Bad values raise :class:`InvalidOption` naming the allowed ones. A batch's
``archive_encoding`` is here too, though not a job option (it changes no figure)."""

from __future__ import annotations

import codecs
import json
import re
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
# The torchvision classification networks a worker can load (docs/design.md "Models"); the
# operator enables some of them with FEATUREMAPS_MODELS. ResNet-18 is the default, always on.
DEFAULT_MODEL = "resnet18"
ARCHITECTURES = (
    "resnet18",
    "resnet34",
    "resnet50",
    "vgg16",
    "vgg16_bn",
    "mobilenet_v3_large",
    "efficientnet_b0",
    "densenet121",
    "convnext_tiny",
    "regnet_y_400mf",
)
# Where the article's conv chain is channel-consistent: the ResNet family's main path.
CHAIN_ARCHITECTURES = ("resnet18", "resnet34", "resnet50")
CHAIN_NOT_DEFINED = "mode=chain is defined for ResNet-style networks; use mode=forward"
# An uploaded model's id (POST /models, shared/models.py): 24 hex digits.
_UPLOAD_ID = re.compile(r"[0-9a-f]{24}")
# ``layers``: a comma list of layer names or fnmatch patterns (``layer4.*``).
_LAYER_PATTERN = re.compile(r"[A-Za-z0-9_.*?\[\]!-]+")
MAX_LAYERS_OPTION = 1024

# Dataset examples (docs/design.md "Dataset examples"): batches only.
EXAMPLE_SCORES = ("mean", "max")
MAX_EXAMPLES = 64
BATCH_EXAMPLES = 9
BATCH_ONLY = ("examples", "examples_score")

# How an archive's member names are read when they are neither marked nor valid UTF-8
# (shared/member_names.py): the code pages archivers on DOS and Windows, old Macs and Unix
# locales write, by Python's canonical name; an alias of one of them is accepted too.
ARCHIVE_ENCODING_FIELD = "archive_encoding"
_ARCHIVE_CODECS = (
    *("gbk", "gb18030", "gb2312", "big5", "big5hkscs", "cp950"),  # Chinese
    *("shift_jis", "cp932", "euc_jp", "iso2022_jp", "euc_kr", "cp949", "johab"),  # Japanese, Korean
    *("cp437", "cp850", "cp852", "cp855", "cp857", "cp858", "cp862", "cp866", "cp874"),  # DOS
    *("cp1250", "cp1251", "cp1252", "cp1253", "cp1254", "cp1255", "cp1256", "cp1257", "cp1258"),
    *("latin_1", "iso8859_2", "iso8859_5", "iso8859_7", "iso8859_8", "iso8859_9", "iso8859_15"),
    *("koi8_r", "koi8_u", "mac_roman", "mac_cyrillic", "tis_620", "utf_8"),
)
ARCHIVE_ENCODINGS = tuple(dict.fromkeys(codecs.lookup(name).name for name in _ARCHIVE_CODECS))
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
    # an architecture of ARCHITECTURES or the id of an uploaded model
    model: str = DEFAULT_MODEL
    # which layers become tiles: comma list of names or fnmatch patterns; "" = the default
    # selection (worker/compute/features.py select_layers)
    layers: str = ""
    per_layer: bool = False
    arrays: bool = False
    # Dataset examples: the top ``examples`` items per channel (0 = off), by ``examples_score``.
    examples: int = 0
    examples_score: str = "mean"

    def __post_init__(self) -> None:
        for name, allowed in (
            ("mode", MODES),
            ("reduction", REDUCTIONS),
            ("normalize", NORMALIZATIONS),
            ("format", FORMATS),
            ("colormap", COLORMAPS),
            ("renderer", RENDERERS),
            ("precision", PRECISIONS),
            ("examples_score", EXAMPLE_SCORES),
        ):
            value = getattr(self, name)
            if value not in allowed:
                raise InvalidOption(f"option {name}={value!r} is not one of: {', '.join(allowed)}")
        if self.model not in ARCHITECTURES and not is_upload_id(self.model):
            raise InvalidOption(
                f"option model={self.model!r} is not one of: {', '.join(ARCHITECTURES)}, nor "
                "the id of a model uploaded with POST /models"
            )
        if self.model in ARCHITECTURES:
            self.check_architecture(self.model)
        layer_patterns(self.layers)
        if not 0 <= self.examples <= MAX_EXAMPLES:
            raise InvalidOption(
                f"option examples={self.examples} must be between 0 and {MAX_EXAMPLES} "
                "(0 turns dataset examples off)"
            )

    def to_dict(self) -> dict:
        return asdict(self)

    def check_architecture(self, architecture: str) -> None:
        """Refuse what ``architecture`` cannot do with these options: the conv chain is
        defined only where each main-path conv takes the previous one's channels."""
        if self.mode == "chain" and architecture not in CHAIN_ARCHITECTURES:
            raise InvalidOption(CHAIN_NOT_DEFINED)

    def check_enabled(self, enabled: tuple[str, ...]) -> None:
        """Refuse an architecture the operator did not enable (FEATUREMAPS_MODELS)."""
        if self.model in ARCHITECTURES and self.model not in enabled:
            raise InvalidOption(
                f"option model={self.model!r} is not enabled here; enabled: "
                f"{', '.join(enabled)} (or the id of a model you uploaded with POST /models)"
            )

    def output_identity(self) -> str:
        """Canonical JSON of the options that change an image's outputs, for result reuse's
        digest (worker/reuse.py). The examples options only choose what a batch does with
        its items' scores (every item of a batch with examples stores both kinds), so they
        stay out of it, as must any option that does not change the outputs."""
        identity = {k: v for k, v in self.to_dict().items() if k not in BATCH_ONLY}
        return json.dumps(identity, sort_keys=True, separators=(",", ":"))

    @classmethod
    def for_job(cls, data: Mapping[str, object]) -> JobOptions:
        """A single job's options: the batch-only ones are refused."""
        given = sorted(set(data) & set(BATCH_ONLY))
        if given:
            raise InvalidOption(
                f"option(s) {', '.join(given)} apply to batches only (dataset examples across "
                "an archive); remove them from a single job"
            )
        return cls.from_mapping(data)

    @classmethod
    def for_batch(cls, data: Mapping[str, object]) -> JobOptions:
        """A batch's options: dataset examples are on (``BATCH_EXAMPLES``) unless given."""
        return cls.from_mapping({"examples": str(BATCH_EXAMPLES), **data})

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
            elif name == "examples":
                values[name] = _parse_count(name, raw)
            elif isinstance(raw, str):
                values[name] = raw.strip()
            else:
                raise InvalidOption(f"option {name} must be a string")
        return cls(**values)


def check_upload_enabled(model: str, architecture: str, enabled: tuple[str, ...]) -> None:
    """Refuse an uploaded model whose architecture the operator no longer enables."""
    if architecture not in enabled:
        raise InvalidOption(
            f"uploaded model {model} is a {architecture}, which is not enabled here; enabled: "
            f"{', '.join(enabled)}"
        )


def is_upload_id(model: str) -> bool:
    """Whether ``model`` names an uploaded model rather than an architecture."""
    return bool(_UPLOAD_ID.fullmatch(model))


def layer_patterns(layers: str) -> list[str]:
    """The ``layers`` option as its list of names or patterns (empty: the default choice);
    :class:`InvalidOption` for anything that cannot name a layer."""
    if len(layers) > MAX_LAYERS_OPTION:
        raise InvalidOption(f"option layers is longer than {MAX_LAYERS_OPTION} characters")
    patterns = [part.strip() for part in layers.split(",") if part.strip()]
    for pattern in patterns:
        if not _LAYER_PATTERN.fullmatch(pattern):
            raise InvalidOption(
                f"option layers: {pattern!r} is not a layer name or pattern (a comma list of "
                "names such as layer1.0.conv1, or fnmatch patterns such as layer4.*)"
            )
    return patterns


def parse_bool(name: str, raw: object) -> bool:
    if isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().lower() in _TRUE:
        return True
    if isinstance(raw, str) and raw.strip().lower() in _FALSE:
        return False
    raise InvalidOption(f"option {name} must be true or false, not {raw!r}")


def _parse_count(name: str, raw: object) -> int:
    if isinstance(raw, int) and not isinstance(raw, bool):
        return raw
    if isinstance(raw, str) and raw.strip().isdigit():
        return int(raw.strip())
    raise InvalidOption(f"option {name} must be a whole number, not {raw!r}")


def parse_archive_encoding(raw: object) -> str | None:
    """The canonical name of a batch's ``archive_encoding`` (None when not given);
    :class:`InvalidOption` for a codec not in ``ARCHIVE_ENCODINGS``."""
    if raw is None or raw == "":
        return None
    try:
        name = codecs.lookup(raw.strip()).name if isinstance(raw, str) else None
    except LookupError:
        name = None
    if name not in ARCHIVE_ENCODINGS:
        raise InvalidOption(
            f"option {ARCHIVE_ENCODING_FIELD}={raw!r} is not an encoding of archive names "
            f"known here; one of: {', '.join(ARCHIVE_ENCODINGS)}"
        )
    return name


# Every option's default, for the places that show them (the OpenAPI document, the CLI).
DEFAULTS = JobOptions()
