"""The OpenAPI 3 document of the HTTP API, written by hand next to the routes it describes."""

from __future__ import annotations

from api.routes.batches import DEFAULT_PAGE, MAX_PAGE
from shared.batches import COUNTERS, BatchStatus, ItemStatus
from shared.imaging import ACCEPTED_NAMES
from shared.jobs import JobStatus
from shared.options import (
    ARCHITECTURES,
    ARCHIVE_ENCODINGS,
    BATCH_EXAMPLES,
    CHAIN_ARCHITECTURES,
    COLORMAPS,
    DEFAULT_MODEL,
    DEFAULTS,
    EXAMPLE_SCORES,
    FORMATS,
    MAX_EXAMPLES,
    MAX_LAYERS_OPTION,
    MODES,
    NORMALIZATIONS,
    PRECISIONS,
    REDUCTIONS,
    RENDERERS,
)
from shared.webhooks import DELIVERED, GAVE_UP, PENDING

_ERROR = {"$ref": "#/components/schemas/Error"}


def _error(description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": _ERROR}}}


_ERRORS = {
    "400": _error(
        "a field or option is missing or invalid, a bad Idempotency-Key, or a callback_url "
        "refused (callback_url_refused)"
    ),
    "401": _error("missing or invalid bearer token"),
    "404": _error("unknown id, expired, or not yours"),
    "429": _error("rate limited; see Retry-After"),
    "503": _error("a dependency (Redis or storage) is down; nothing was created"),
}


# 202 of POST /jobs and POST /batches.
_ACCEPTED = {
    "description": "queued; or, for a repeated Idempotency-Key, the first request's answer "
    "again (with Idempotent-Replayed: true)",
    "headers": {
        "Location": {"schema": {"type": "string"}},
        "Idempotent-Replayed": {"schema": {"type": "string", "enum": ["true"]}},
    },
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Accepted"}}},
}

# api/idempotency.py: printable ASCII; blanks around it are stripped, as HTTP trims them, so
# the key itself neither starts nor ends with one.
_IDEMPOTENCY_KEY = {
    "name": "Idempotency-Key",
    "in": "header",
    "required": False,
    "description": "Send the same key again with the same request (after a lost answer) to "
    "get the first answer instead of a second record; remembered for JOB_TTL_HOURS, per token. "
    "The same key with another request is 422 idempotency_mismatch; while the first request "
    "is still being created, 409 idempotency_in_progress with Retry-After.",
    "schema": {"type": "string", "pattern": "^[!-~]([ -~]{0,253}[!-~])?$"},
}
_IDEMPOTENCY_ERRORS = {
    "409": _error(
        "idempotency_in_progress: a request with this Idempotency-Key is still "
        "being created; see Retry-After"
    ),
}


def _pick(*codes: str) -> dict:
    return {c: _ERRORS[c] for c in codes}


_JOB_ID = {
    "name": "job_id",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"},
}

# A layer's qualified module name (conv1, layer4.1.conv2, layer2.0.downsample.0).
_LAYER = {
    "name": "layer",
    "in": "path",
    "required": True,
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.]{1,128}$"},
}
_LAYER_MAP = {
    "type": "object",
    "required": ["name", "shape", "min", "max", "data"],
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 2, "maxItems": 2},
        "min": {"type": "number"},
        "max": {"type": "number"},
        "data": {"type": "array", "items": {"type": "array", "items": {"type": "number"}}},
    },
}

# s3://bucket/prefix/ with a valid S3 bucket name (api/sources.py checks the same).
_S3_SOURCE = "^s3://[a-z0-9][a-z0-9.-]{1,61}[a-z0-9](/.*)?$"

# Spellings shared/options.py accepts for a boolean in a form field; a JSON body may also
# use true/false.
_BOOLEAN_TEXT = {
    "type": "string",
    "enum": ["true", "false", "1", "0", "yes", "no", "on", "off", ""],
    "default": "false",
}
_BOOLEAN_JSON = {"anyOf": [{"type": "boolean"}, _BOOLEAN_TEXT], "default": False}

_OPTION_PROPERTIES = {
    "mode": {"type": "string", "enum": list(MODES), "default": DEFAULTS.mode},
    "reduction": {"type": "string", "enum": list(REDUCTIONS), "default": DEFAULTS.reduction},
    "normalize": {"type": "string", "enum": list(NORMALIZATIONS), "default": DEFAULTS.normalize},
    "format": {"type": "string", "enum": list(FORMATS), "default": DEFAULTS.format},
    "colormap": {"type": "string", "enum": list(COLORMAPS), "default": DEFAULTS.colormap},
    "renderer": {"type": "string", "enum": list(RENDERERS), "default": DEFAULTS.renderer},
    "precision": {
        "type": "string",
        "enum": list(PRECISIONS),
        "default": DEFAULTS.precision,
        "description": "exact: the article's computation (full decode, float32, no TF32); "
        "fast: JPEG draft decode (and TF32 on CUDA); auto: exact on CPU, fast on CUDA",
    },
    "per_layer": _BOOLEAN_TEXT,
    "arrays": _BOOLEAN_TEXT,
}
# shared/options.py layer_patterns: comma-separated names or fnmatch patterns, blanks around
# each; empty parts are ignored.
_LAYER_PATTERN = r"[A-Za-z0-9_.*?\[\]!-]*"
_LAYERS_OPTION = {
    "type": "string",
    "maxLength": MAX_LAYERS_OPTION,
    "pattern": f"^ *{_LAYER_PATTERN} *(, *{_LAYER_PATTERN} *)*$",
    "default": "",
    "description": "which layers become tiles: a comma list of layer names or fnmatch "
    "patterns (layer4.*; * for all), each of which must match a layer of the model (else "
    "the job fails invalid_option); empty: every layer, or 32 evenly spaced ones of a "
    "network with more",
}
_UPLOAD_ID = {"type": "string", "pattern": "^[0-9a-f]{24}$"}
_UNKNOWN_UPLOAD = _error("model= names an uploaded model that is unknown, deleted, or not yours")


def _model_option(enabled: tuple[str, ...]) -> dict:
    """The ``model`` option: an architecture this deployment enables, or an upload's id."""
    return {
        "anyOf": [
            {"type": "string", "enum": list(enabled)},
            {**_UPLOAD_ID, "description": "the id of a model you uploaded (POST /models)"},
        ],
        "default": DEFAULT_MODEL,
        "description": "the network: an architecture the operator enabled "
        f"(FEATUREMAPS_MODELS; supported: {', '.join(ARCHITECTURES)}) or one of your "
        f"uploads; mode=chain only for {', '.join(CHAIN_ARCHITECTURES)} (else 400)",
    }


# Not an option (it does not change the output): shared/webhooks.py.
_CALLBACK_PROPERTY = {
    "callback_url": {
        "type": "string",
        "maxLength": 2048,
        "description": "http(s) URL POSTed the status document, signed "
        "(X-Featuremaps-Signature: t=<unix>,v1=<HMAC-SHA256 of '<t>.' + body>), when the "
        "record reaches a final state; public addresses only unless the operator allows "
        "private ones (400 callback_url_refused)",
    }
}
# Batches only: a call per item too (needs callback_url), spaced by WEBHOOK_ITEM_RATE.
_ITEM_CALLBACKS_DESCRIPTION = (
    "with callback_url: POST each item's document there too when the item ends "
    "(X-Featuremaps-Event: item; the batch's own final call says batch), at most "
    "WEBHOOK_ITEM_RATE calls per second per batch; without callback_url 400 missing_field"
)
_ITEM_CALLBACKS_TEXT = {**_BOOLEAN_TEXT, "description": _ITEM_CALLBACKS_DESCRIPTION}
_ITEM_CALLBACKS_JSON = {**_BOOLEAN_JSON, "description": _ITEM_CALLBACKS_DESCRIPTION}
_ARCHIVE_ENCODING = {
    "type": "string",
    "enum": list(ARCHIVE_ENCODINGS),
    "description": "how the archive's member names are read when they are neither marked "
    "UTF-8 nor valid UTF-8 (a zip made on Chinese or Japanese Windows: gbk, shift_jis); "
    "Python's aliases are accepted too (Shift-JIS, cp936); default cp437 for a zip",
}
_CALLBACK_ATTEMPT = {
    "type": "object",
    "required": ["at", "status", "error"],
    "additionalProperties": False,
    "properties": {
        "at": {"type": "string"},
        "status": {"type": ["integer", "null"], "description": "the receiver's"},
        "error": {"type": ["string", "null"]},
    },
}
_CALLBACK_FIELDS = {
    "callback_url": {"type": ["string", "null"]},
    "callback_state": {"enum": [None, PENDING, DELIVERED, GAVE_UP]},
    "callbacks": {
        "type": "array",
        "description": "every delivery attempt",
        "items": _CALLBACK_ATTEMPT,
    },
}
# On an item of a batch with item_callbacks only.
_ITEM_CALLBACK_FIELDS = {
    "callback_state": {
        "enum": [None, PENDING, DELIVERED, GAVE_UP],
        "description": "null while the item runs (with item_callbacks only)",
    },
    "callback_attempts": {"type": "integer", "description": "attempts so far"},
    "callbacks": {
        "type": "array",
        "description": "the first attempt and the latest ones (at most 5)",
        "items": _CALLBACK_ATTEMPT,
    },
}

_JSON_OPTION_PROPERTIES = {
    **_OPTION_PROPERTIES,
    "per_layer": _BOOLEAN_JSON,
    "arrays": _BOOLEAN_JSON,
}
# Batches only (docs/design.md "Dataset examples"); a single job refuses them.
_EXAMPLES_DESCRIPTION = (
    "dataset examples: the top K items of the batch per channel of every layer (0 turns them off)"
)
_EXAMPLE_SCORE = {
    "type": "string",
    "enum": list(EXAMPLE_SCORES),
    "default": "mean",
    "description": "a channel's score in an image: its activation's mean or max over (h, w)",
}


def _whole_number_up_to(limit: int) -> str:
    """A pattern of the decimal numbers 0 to ``limit`` (below 100), leading zeros allowed."""
    tens, ones = divmod(limit, 10)
    parts = ["[0-9]"]
    if tens > 1:
        parts.append(f"[1-{tens - 1}][0-9]")
    if tens:
        parts.append(f"{tens}[0-{ones}]")
    return f"^0*({'|'.join(parts)})$"


_EXAMPLES_TEXT = _whole_number_up_to(MAX_EXAMPLES)
_BATCH_OPTION_PROPERTIES = {
    **_OPTION_PROPERTIES,
    "examples": {
        "type": "string",
        "pattern": _EXAMPLES_TEXT,
        "default": str(BATCH_EXAMPLES),
        "description": f"{_EXAMPLES_DESCRIPTION}; 0 to {MAX_EXAMPLES}",
    },
    "examples_score": _EXAMPLE_SCORE,
}
_BATCH_JSON_OPTION_PROPERTIES = {
    **_JSON_OPTION_PROPERTIES,
    "examples": {
        "anyOf": [
            {"type": "integer", "minimum": 0, "maximum": MAX_EXAMPLES},
            {"type": "string", "pattern": _EXAMPLES_TEXT},
        ],
        "default": BATCH_EXAMPLES,
        "description": _EXAMPLES_DESCRIPTION,
    },
    "examples_score": _EXAMPLE_SCORE,
}

_REUSED = {
    "type": "boolean",
    "description": "the outputs are copies of an equal earlier result (same input bytes, "
    "options, weights and computation version): no model pass ran",
}
_REUSED_FROM = {
    "type": ["string", "null"],
    "description": "the job or batch item whose result was copied",
}
# Every document's error: a stable code (shared/errors.py, docs/design.md "Failure codes").
_ERROR_BODY = {
    "type": "object",
    "required": ["code", "message"],
    "additionalProperties": False,
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}},
}
_NULLABLE_ERROR = {**_ERROR_BODY, "type": ["object", "null"]}
_TIMESTAMP = {"type": "string", "format": "date-time"}
_TIMESTAMPS = {
    "created_at": _TIMESTAMP,
    "started_at": {**_TIMESTAMP, "type": ["string", "null"]},
    "finished_at": {**_TIMESTAMP, "type": ["string", "null"]},
}
# The options as resolved (shared/options.py JobOptions): every one, defaults filled in.
# Records written before dataset examples existed lack the two examples fields.
_OPTIONS_DOC = {
    "type": "object",
    "required": [
        "mode",
        "reduction",
        "normalize",
        "format",
        "colormap",
        "renderer",
        "precision",
        "per_layer",
        "arrays",
    ],
    "additionalProperties": False,
    "properties": {
        "mode": {"type": "string", "enum": list(MODES)},
        "reduction": {"type": "string", "enum": list(REDUCTIONS)},
        "normalize": {"type": "string", "enum": list(NORMALIZATIONS)},
        "format": {"type": "string", "enum": list(FORMATS)},
        "colormap": {"type": "string", "enum": list(COLORMAPS)},
        "renderer": {"type": "string", "enum": list(RENDERERS)},
        "precision": {"type": "string", "enum": list(PRECISIONS)},
        "model": {"type": "string", "description": "an architecture or an upload's id"},
        "layers": {"type": "string"},
        "per_layer": {"type": "boolean"},
        "arrays": {"type": "boolean"},
        "examples": {"type": "integer", "minimum": 0, "maximum": MAX_EXAMPLES},
        "examples_score": {"type": "string", "enum": list(EXAMPLE_SCORES)},
    },
}
_URL = {"type": "string"}
_LAYER_STATS = {
    "type": "object",
    "required": ["name", "shape", "min", "max", "mean"],
    "additionalProperties": False,
    "properties": {
        "name": {"type": "string"},
        "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3},
        "min": {"type": "number"},
        "max": {"type": "number"},
        "mean": {"type": "number"},
    },
}
_JOB_RESULT = {
    "type": "object",
    "required": ["figure_url", "manifest_url", "layers", "weights", "reused"],
    "additionalProperties": False,
    "properties": {
        "figure_url": _URL,
        "manifest_url": _URL,
        "thumbnail_url": _URL,
        "input_url": {**_URL, "description": "the input as analysed: upright RGB JPEG"},
        "arrays_url": {**_URL, "description": "maps.npz (with arrays=true)"},
        "layer_urls": {
            "type": "array",
            "items": _URL,
            "description": "a PNG per layer (with per_layer=true)",
        },
        "layers": {"type": "array", "items": _LAYER_STATS},
        "weights": {
            "type": ["object", "null"],
            "description": "which weights ran: {name: imagenet, ...}, {name: random, seed}, or "
            "a file's name and sha256",
        },
        "precision": {
            "type": ["object", "null"],
            "description": "the computation that ran: mode (exact or fast, the "
            "precision option resolved on the worker's device), decoder, tf32, on_device, "
            "dtype (float32 or bfloat16: the model's weights and activations) and "
            "memory_format (contiguous or channels_last)",
        },
        "predictions": {
            "type": "array",
            "description": "with the ImageNet weights only: the top classes",
            "items": {
                "type": "object",
                "required": ["label", "probability"],
                "additionalProperties": False,
                "properties": {
                    "label": {"type": "string"},
                    "probability": {"type": "number", "minimum": 0, "maximum": 1},
                },
            },
        },
        "reused": _REUSED,
        "reused_from": _REUSED_FROM,
    },
}
_JOB_LINKS = {
    "type": "object",
    "required": ["self", "figure", "page"],
    "additionalProperties": False,
    "properties": {
        "self": {"type": "string"},
        "figure": {"type": "string", "description": "GET: a redirect to the figure"},
        "page": {"type": "string", "description": "the job's web page"},
    },
}
_JOB_DOC = {
    "type": "object",
    "required": [
        "id",
        "status",
        "created_at",
        "started_at",
        "finished_at",
        "options",
        "attempts",
        "worker",
        "device",
        "timings",
        "result",
        "error",
        "callback_url",
        "callback_state",
        "callbacks",
        "links",
    ],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},
        "status": {
            "type": "string",
            "enum": [status.value for status in JobStatus],
        },
        **_TIMESTAMPS,
        "options": _OPTIONS_DOC,
        "attempts": {"type": "integer"},
        "worker": {"type": ["string", "null"]},
        "device": {"type": ["string", "null"]},
        "timings": {"type": "object", "additionalProperties": {"type": "number"}},
        "result": {**_JOB_RESULT, "type": ["object", "null"]},
        "error": _NULLABLE_ERROR,
        "links": _JOB_LINKS,
        **_CALLBACK_FIELDS,
    },
}


_BATCH_ID = {**_JOB_ID, "name": "batch_id"}
_COUNTS = ("total", *COUNTERS)
_RESULT_SHARD = {
    "type": "object",
    "required": ["index", "first", "items", "manifest_url", "archive_url"],
    "additionalProperties": False,
    "properties": {
        "index": {"type": "integer", "minimum": 1},
        "first": {"type": "integer", "minimum": 0, "description": "position of its first member"},
        "items": {"type": "integer", "minimum": 0, "description": "members it holds"},
        "manifest_url": {"type": "string", "description": "its manifest lines (JSON Lines)"},
        "archive_url": {
            "type": "string",
            "description": "zip of its figures; names are unique within a shard",
        },
    },
}
_BATCH_LINKS = {
    "type": "object",
    "required": ["self", "items", "page", "examples", "examples_page"],
    "additionalProperties": False,
    "properties": {
        "self": {"type": "string"},
        "items": {"type": "string"},
        "page": {"type": "string", "description": "the batch's web page"},
        "examples": {"type": "string", "description": "GET its dataset examples"},
        "examples_page": {"type": "string", "description": "their web page"},
    },
}
_BATCH_DOC = {
    "type": "object",
    "required": [
        "id",
        "status",
        "created_at",
        "started_at",
        "finished_at",
        "options",
        "source",
        "counts",
        "progress",
        "rate",
        "eta_s",
        "error",
        "result",
        "callback_url",
        "callback_state",
        "callbacks",
        "item_callbacks",
        "links",
    ],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},
        "status": {
            "type": "string",
            "enum": [status.value for status in BatchStatus],
        },
        **_TIMESTAMPS,
        "options": _OPTIONS_DOC,
        "source": {
            "type": "object",
            "required": ["kind", "name"],
            "additionalProperties": False,
            "properties": {
                "kind": {"type": "string", "enum": ["archive", "s3"]},
                "name": {
                    "type": ["string", "null"],
                    "description": "the uploaded archive's file name, or the s3:// prefix",
                },
            },
        },
        "counts": {
            "type": "object",
            "required": list(_COUNTS),
            "additionalProperties": False,
            "properties": {name: {"type": "integer", "minimum": 0} for name in _COUNTS},
        },
        "progress": {"type": "number", "minimum": 0, "maximum": 1},
        "rate": {"type": ["number", "null"], "description": "images/s while running"},
        "eta_s": {"type": ["number", "null"]},
        "result": {
            "type": ["object", "null"],
            "description": "once ended: the results in shards of RESULT_SHARD_ITEMS members",
            "required": ["manifest_url", "archive_url", "examples_url", "shards"],
            "additionalProperties": False,
            "properties": {
                "manifest_url": {
                    "type": ["string", "null"],
                    "description": "manifest.jsonl of a one-shard batch; null for more shards",
                },
                "archive_url": {
                    "type": ["string", "null"],
                    "description": "results.zip of a one-shard batch; null for more shards",
                },
                "examples_url": {
                    "type": ["string", "null"],
                    "description": "examples.json, the dataset examples of every channel; "
                    "null when run with examples=0",
                },
                "shards": {"type": "array", "items": _RESULT_SHARD},
            },
        },
        "error": _NULLABLE_ERROR,
        "links": _BATCH_LINKS,
        **_CALLBACK_FIELDS,
        "item_callbacks": {"type": "boolean", "description": "each item is called back too"},
    },
}
_ITEM_DOC = {
    "type": "object",
    "required": [
        "id",
        "name",
        "status",
        "figure_url",
        "thumbnail_url",
        "error",
        "skip_reason",
        "reused",
        "reused_from",
        "attempts",
    ],
    "additionalProperties": False,
    "properties": {
        "id": {"type": "string"},
        "name": {"type": "string"},
        "status": {"type": "string", "enum": [status.value for status in ItemStatus]},
        "figure_url": {"type": ["string", "null"]},
        "thumbnail_url": {"type": ["string", "null"], "description": "a small JPEG of the grid"},
        "error": _NULLABLE_ERROR,
        "skip_reason": {
            **_NULLABLE_ERROR,
            "description": "why a skipped member was not processed ({code, message}: "
            "macos_metadata, windows_metadata); skipped is not failed",
        },
        "reused": _REUSED,
        "reused_from": _REUSED_FROM,
        "attempts": {
            "type": "integer",
            "description": "how many times a chunk started this item (more than 1 after its "
            "worker was lost)",
        },
        **_ITEM_CALLBACK_FIELDS,
    },
}


# docs/design.md "Dataset examples": examples.json, sheets presigned.
_EXAMPLE = {
    "type": "object",
    "required": ["item_id", "name", "score"],
    "properties": {
        "item_id": {"type": "string"},
        "name": {"type": "string"},
        "score": {"type": "number"},
    },
}
_NUMBERS = {"type": "array", "items": {"type": "number"}}
_EXAMPLES_LAYER_HEAD = {
    "index": {"type": "integer", "minimum": 0},
    "name": {"type": "string"},
    "channels": {"type": "integer", "minimum": 1},
    "shape": {"type": "array", "items": {"type": "integer"}, "minItems": 3, "maxItems": 3},
    "sheets": {
        "type": "array",
        "items": {"type": "string"},
        "description": "presigned JPEGs of sheet_channels channels each: sheet floor(c / "
        "sheet_channels) holds channel c's examples in row c mod sheet_channels, rank j at "
        "x = tile·j, y = tile·row",
    },
}
_EXAMPLES_LAYER_REQUIRED = ["index", "name", "channels", "shape", "sheets"]
_EXAMPLES_LAYER = {
    "type": "object",
    "required": [*_EXAMPLES_LAYER_REQUIRED, "channel_mean", "channel_max", "top"],
    "properties": {
        **_EXAMPLES_LAYER_HEAD,
        "channel_mean": {**_NUMBERS, "description": "per channel: mean score over the items"},
        "channel_max": {**_NUMBERS, "description": "per channel: highest score"},
        "top": {
            "type": "array",
            "description": "per channel: its best items (at most k), best first",
            "items": {"type": "array", "items": _EXAMPLE},
        },
    },
}
_EXAMPLES = {
    "type": "object",
    "required": ["k", "score", "mode", "items", "tile", "sheet_channels", "missing", "layers"],
    "properties": {
        "k": {"type": "integer", "minimum": 1, "maximum": 64},
        "score": {"type": "string", "enum": ["mean", "max"]},
        "mode": {"type": "string", "enum": list(MODES)},
        "weights": {},
        "precision": {},
        "items": {"type": "integer", "minimum": 0, "description": "succeeded items scored"},
        "tile": {"type": "integer", "description": "a tile's side in pixels"},
        "sheet_channels": {"type": "integer", "description": "channels (rows) per sheet"},
        "missing": {
            "type": "array",
            "items": {"type": "integer"},
            "description": "example slices whose tiles are blank (grey)",
        },
        "layers": {
            "type": "array",
            "items": {
                "type": "object",
                "required": [*_EXAMPLES_LAYER_REQUIRED, "url"],
                "properties": {
                    **_EXAMPLES_LAYER_HEAD,
                    "url": {"type": "string", "description": "the layer's full entry"},
                },
            },
        },
    },
}
_EXAMPLES_LAYER_PARAM = {
    "name": "layer",
    "in": "path",
    "required": True,
    "description": "the layer's index or name",
    "schema": {"type": "string", "pattern": "^[A-Za-z0-9_.]{1,128}$"},
}
_EXAMPLES_ERRORS = {
    "404": _error("unknown batch, expired, or not yours; or run with examples=0"),
    "409": _error("the batch has not ended yet"),
}


_MODEL_DOC = {
    "type": "object",
    "required": ["id", "architecture", "sha256", "bytes", "name", "format", "created_at"],
    "additionalProperties": False,
    "properties": {
        "id": {**_UPLOAD_ID, "description": "what model= takes"},
        "architecture": {"type": "string", "enum": list(ARCHITECTURES)},
        "sha256": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
        "bytes": {"type": "integer", "minimum": 1},
        "name": {"type": "string"},
        "format": {"type": "string", "enum": ["safetensors", "pytorch"]},
        "created_at": _TIMESTAMP,
    },
}
_MODEL_ID = {"name": "model_id", "in": "path", "required": True, "schema": _UPLOAD_ID}


def _models_paths(enabled: tuple[str, ...]) -> dict:
    model = {"application/json": {"schema": {"$ref": "#/components/schemas/Model"}}}
    return {
        "/models": {
            "post": {
                "summary": "Upload weights for an enabled architecture",
                "requestBody": {
                    "required": True,
                    "content": {
                        "multipart/form-data": {
                            "schema": {
                                "type": "object",
                                "required": ["weights", "architecture"],
                                "properties": {
                                    "weights": {
                                        "type": "string",
                                        "format": "binary",
                                        "minLength": 1,
                                        "description": "a safetensors file or a torch.save "
                                        "state_dict (read without running any code in it)",
                                    },
                                    "architecture": {"type": "string", "enum": list(enabled)},
                                    "name": {"type": "string", "pattern": "^[ -~]{0,200}$"},
                                },
                                "additionalProperties": False,
                            }
                        }
                    },
                },
                "responses": {
                    "201": {
                        "description": "stored; the same file uploaded again is the same model",
                        "headers": {"Location": {"schema": {"type": "string"}}},
                        "content": model,
                    },
                    **_pick("400", "401", "429", "503"),
                    "413": _error("over FEATUREMAPS_MAX_MODEL_BYTES"),
                    "422": _error(
                        "unsafe_weights (the file would run code when loaded), not_a_state_dict, "
                        "or weights_mismatch (names or shapes that do not fit the architecture; "
                        "the message names the first ones)"
                    ),
                },
            },
            "get": {
                "summary": "The enabled architectures and your uploaded models",
                "responses": {
                    "200": {
                        "description": "architectures and uploads",
                        "content": {
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["architectures", "uploads"],
                                    "additionalProperties": False,
                                    "properties": {
                                        "architectures": {
                                            "type": "array",
                                            "items": {"type": "string", "enum": list(enabled)},
                                        },
                                        "uploads": {
                                            "type": "array",
                                            "items": {"$ref": "#/components/schemas/Model"},
                                        },
                                    },
                                }
                            }
                        },
                    },
                    **_pick("401", "429", "503"),
                },
            },
        },
        "/models/{model_id}": {
            "parameters": [_MODEL_ID],
            "get": {
                "summary": "One of your uploaded models",
                "responses": {
                    "200": {"description": "the model", "content": model},
                    **_pick("401", "404", "429", "503"),
                },
            },
            "delete": {
                "summary": "Delete one of your uploaded models (jobs still queued on it fail "
                "model_deleted)",
                "responses": {
                    "204": {"description": "deleted"},
                    **_pick("401", "404", "429", "503"),
                },
            },
        },
    }


def openapi_document(enabled: tuple[str, ...] = (DEFAULT_MODEL,)) -> dict:
    """The document of a deployment whose FEATUREMAPS_MODELS enables ``enabled``."""
    models = {"model": _model_option(enabled), "layers": _LAYERS_OPTION}
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "featuremaps",
            "version": "0.1.0",
            "description": "Feature-map figures of convolutional networks as a service "
            "(ResNet-18 by default; more torchvision networks and uploaded weights with "
            "model=). Submit an image, poll the job, fetch the figure from object storage.",
        },
        "components": {
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
            "schemas": {
                "Error": {
                    "type": "object",
                    "required": ["error"],
                    "properties": {
                        "error": {
                            "type": "object",
                            "required": ["code", "message"],
                            "properties": {
                                "code": {"type": "string"},
                                "message": {"type": "string"},
                            },
                        }
                    },
                },
                "Job": _JOB_DOC,
                "Batch": _BATCH_DOC,
                "Examples": _EXAMPLES,
                "Model": _MODEL_DOC,
                "ExamplesLayer": _EXAMPLES_LAYER,
                "Accepted": {
                    "type": "object",
                    "required": ["id", "status", "links"],
                    "additionalProperties": False,
                    "properties": {
                        "id": {"type": "string"},
                        "status": {"type": "string", "enum": ["queued"]},
                        "links": {"oneOf": [_JOB_LINKS, _BATCH_LINKS]},
                    },
                },
            },
        },
        "security": [{}, {"bearer": []}],
        "paths": {
            "/jobs": {
                "post": {
                    "summary": "Submit one image",
                    "parameters": [_IDEMPOTENCY_KEY],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["image"],
                                    "properties": {
                                        "image": {
                                            "type": "string",
                                            "format": "binary",
                                            "minLength": 1,
                                        },
                                        **_OPTION_PROPERTIES,
                                        **models,
                                        **_CALLBACK_PROPERTY,
                                    },
                                    "additionalProperties": False,
                                }
                            }
                        },
                    },
                    "responses": {
                        "202": _ACCEPTED,
                        **_pick("400", "401", "429", "503"),
                        "404": _UNKNOWN_UPLOAD,
                        "413": _error("upload too large or too many form parts"),
                        "415": _error(
                            f"not an accepted image type ({ACCEPTED_NAMES}, judged by content)"
                        ),
                        **_IDEMPOTENCY_ERRORS,
                        "422": _error(
                            "undecodable image or too many pixels; idempotency_mismatch: the "
                            "Idempotency-Key was used for another request"
                        ),
                    },
                }
            },
            "/jobs/{job_id}": {
                "parameters": [_JOB_ID],
                "get": {
                    "summary": "The job's status document",
                    "responses": {
                        "200": {
                            "description": "the job",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/Job"}}
                            },
                        },
                        **_pick("401", "404", "429", "503"),
                    },
                },
                "delete": {
                    "summary": "Cancel a queued or running job",
                    "responses": {
                        "202": {
                            "description": "canceled",
                            "content": {
                                "application/json": {"schema": {"$ref": "#/components/schemas/Job"}}
                            },
                        },
                        "409": _error("already finished"),
                        **_pick("401", "404", "429", "503"),
                    },
                },
            },
            "/jobs/{job_id}/figure": {
                "parameters": [_JOB_ID],
                "get": {
                    "summary": "Redirect to the figure",
                    "responses": {
                        "302": {"description": "presigned URL of the figure"},
                        "409": _error("the job has not succeeded"),
                        **_pick("401", "404", "429", "503"),
                    },
                },
            },
            "/jobs/{job_id}/layers/{layer}": {
                "parameters": [_JOB_ID, _LAYER],
                "get": {
                    "summary": "One layer's reduced map, read from maps.npz (needs arrays=true)",
                    "responses": {
                        "200": {
                            "description": "the float32 H×W map: JSON, or raw little-endian "
                            "float32 (row-major, shape in X-Shape) for "
                            "Accept: application/octet-stream",
                            "headers": {"X-Shape": {"schema": {"type": "string"}}},
                            "content": {
                                "application/json": {"schema": _LAYER_MAP},
                                "application/octet-stream": {
                                    "schema": {"type": "string", "format": "binary"}
                                },
                            },
                        },
                        "409": _error("the job has not succeeded, or was run without arrays"),
                        **_pick("401", "404", "429", "503"),
                    },
                },
            },
            "/batches": {
                "post": {
                    "summary": "Submit an archive (streamed to storage) or an S3 prefix",
                    "parameters": [_IDEMPOTENCY_KEY],
                    "requestBody": {
                        "required": True,
                        "content": {
                            "multipart/form-data": {
                                "schema": {
                                    "type": "object",
                                    "required": ["archive"],
                                    "properties": {
                                        "archive": {
                                            "type": "string",
                                            "format": "binary",
                                            "minLength": 1,
                                        },
                                        **_BATCH_OPTION_PROPERTIES,
                                        **models,
                                        **_CALLBACK_PROPERTY,
                                        "item_callbacks": _ITEM_CALLBACKS_TEXT,
                                        "archive_encoding": _ARCHIVE_ENCODING,
                                    },
                                    "additionalProperties": False,
                                }
                            },
                            "application/json": {
                                "schema": {
                                    "type": "object",
                                    "required": ["source"],
                                    "properties": {
                                        "source": {"type": "string", "pattern": _S3_SOURCE},
                                        **_BATCH_JSON_OPTION_PROPERTIES,
                                        **models,
                                        **_CALLBACK_PROPERTY,
                                        "item_callbacks": _ITEM_CALLBACKS_JSON,
                                    },
                                    "additionalProperties": False,
                                }
                            },
                        },
                    },
                    "responses": {
                        "202": _ACCEPTED,
                        **_pick("400", "401", "429", "503"),
                        "404": _UNKNOWN_UPLOAD,
                        "403": _error("an s3:// source not in FEATUREMAPS_SOURCE_ALLOW"),
                        "413": _error(
                            "archive over MAX_ARCHIVE_BYTES, a form field over 4 KiB, or too "
                            "many form parts"
                        ),
                        "415": _error("not a .zip, .tar or .tar.gz archive"),
                        **_IDEMPOTENCY_ERRORS,
                        "422": _error(
                            "idempotency_mismatch: the Idempotency-Key was used for another request"
                        ),
                    },
                }
            },
            "/batches/{batch_id}": {
                "parameters": [_BATCH_ID],
                "get": {
                    "summary": "The batch: status, counts, progress, rate, ETA, result links",
                    "responses": {
                        "200": {
                            "description": "the batch",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Batch"}
                                }
                            },
                        },
                        **_pick("401", "404", "429", "503"),
                    },
                },
                "delete": {
                    "summary": "Cancel: items not yet started end canceled",
                    "responses": {
                        "202": {
                            "description": "canceled",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Batch"}
                                }
                            },
                        },
                        "409": _error("already finished"),
                        **_pick("401", "404", "429", "503"),
                    },
                },
            },
            "/batches/{batch_id}/items": {
                "parameters": [
                    _BATCH_ID,
                    {
                        "name": "cursor",
                        "in": "query",
                        "description": "the next_cursor of the page before (a member position)",
                        "schema": {"type": "string", "pattern": "^[0-9]*$"},
                    },
                    {
                        "name": "limit",
                        "in": "query",
                        "schema": {
                            "type": "integer",
                            "minimum": 1,
                            "maximum": MAX_PAGE,
                            "default": DEFAULT_PAGE,
                        },
                    },
                ],
                "get": {
                    "summary": "One page of items: name, status, figure_url, thumbnail_url, error",
                    "responses": {
                        "200": {
                            "description": "a page; next_cursor is null on the last one",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "required": ["items", "next_cursor"],
                                        "additionalProperties": False,
                                        "properties": {
                                            "items": {"type": "array", "items": _ITEM_DOC},
                                            "next_cursor": {
                                                "type": ["string", "null"],
                                                "pattern": "^[0-9]+$",
                                            },
                                        },
                                    }
                                }
                            },
                        },
                        **_pick("400", "401", "404", "429", "503"),
                    },
                },
            },
            "/batches/{batch_id}/examples": {
                "parameters": [_BATCH_ID],
                "get": {
                    "summary": "The dataset examples of an ended batch: every layer, its "
                    "sheets (presigned), without the per-channel lists",
                    "responses": {
                        "200": {
                            "description": "examples.json without top, channel_mean, "
                            "channel_max; each layer with the url of its full entry",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/Examples"}
                                }
                            },
                        },
                        **_EXAMPLES_ERRORS,
                        **_pick("401", "429", "503"),
                    },
                },
            },
            "/batches/{batch_id}/examples/{layer}": {
                "parameters": [_BATCH_ID, _EXAMPLES_LAYER_PARAM],
                "get": {
                    "summary": "One layer's dataset examples in full, sheets presigned",
                    "responses": {
                        "200": {
                            "description": "the layer's entry of examples.json",
                            "content": {
                                "application/json": {
                                    "schema": {"$ref": "#/components/schemas/ExamplesLayer"}
                                }
                            },
                        },
                        **_EXAMPLES_ERRORS,
                        "404": _error(
                            "unknown batch, expired, or not yours; run with examples=0; or no "
                            "such layer"
                        ),
                        **_pick("401", "429", "503"),
                    },
                },
            },
            **_models_paths(enabled),
            "/healthz": {
                "get": {
                    "summary": "Liveness",
                    "security": [{}],
                    "responses": {"200": {"description": "alive"}},
                }
            },
            "/readyz": {
                "get": {
                    "summary": "Readiness: Redis, storage and at least one worker",
                    "security": [{}],
                    "responses": {
                        "200": {"description": "ready"},
                        "503": {"description": "not ready; the body says which check failed"},
                    },
                }
            },
            "/metrics": {
                "get": {
                    "summary": "Prometheus metrics",
                    "security": [{}],
                    "responses": {
                        "200": {"description": "text", "content": {"text/plain": {}}},
                        "503": _error("Redis is down: the job and queue figures cannot be read"),
                    },
                }
            },
            "/backlog": {
                "get": {
                    "summary": "What waits for a worker, for the autoscaler (counts only)",
                    "security": [{}],
                    "responses": {
                        "200": {
                            "description": "counts by part; for_workers is their sum that "
                            "wants a worker",
                            "content": {
                                "application/json": {
                                    "schema": {
                                        "type": "object",
                                        "additionalProperties": {"type": "integer"},
                                    }
                                }
                            },
                        },
                        "503": _error("Redis is down: the backlog cannot be read"),
                    },
                }
            },
            "/openapi.json": {
                "get": {
                    "summary": "This document",
                    "security": [{}],
                    "responses": {"200": {"description": "the OpenAPI document"}},
                }
            },
        },
    }
