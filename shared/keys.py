"""Object-storage keys (docs/design.md "Storage layout").

A job's (or batch item's) outputs are written under a folder of their *attempt*:
``results/<id>/<attempt>/``, the attempt naming the delivery that wrote them (its lease
generation, unique for ever). Two deliveries of the same work (a holder presumed dead that
comes back, a handed-over task, a storage retry) never write the same object, and the record's
fenced transition names the folder whose objects count: readers use only the keys a record
holds, never keys derived from its id."""

from __future__ import annotations


def input_key(job_id: str, ext: str, n: int = 0) -> str:
    return f"inputs/{job_id}/{n}.{ext}"


SPECS_PREFIX = "accepted/"
# Every top-level folder the service writes: owned by records (retention deletes them with
# their record), and never readable as a batch source (other users' data).
SERVICE_PREFIXES = ("inputs/", "results/", "batches/", "models/", SPECS_PREFIX)
_SPEC_FOLDERS = {"job": "jobs", "batch": "batches"}
_SPEC_KINDS = {folder: kind for kind, folder in _SPEC_FOLDERS.items()}


def spec_key(kind: str, record_id: str) -> str:
    """A job's or batch's record as it was created (keeper/restore.py), while it runs."""
    return f"{SPECS_PREFIX}{_SPEC_FOLDERS[kind]}/{record_id}.json"


def parse_spec_key(key: str) -> tuple[str, str] | None:
    """``(kind, record id)`` of a :func:`spec_key`; None for any other key."""
    folder, _, name = key.removeprefix(SPECS_PREFIX).partition("/")
    if not key.startswith(SPECS_PREFIX) or folder not in _SPEC_KINDS or not name.endswith(".json"):
        return None
    record_id = name.removesuffix(".json")
    return (_SPEC_KINDS[folder], record_id) if record_id and "/" not in record_id else None


def attempt_dir(job_id: str, attempt: str) -> str:
    """The folder of one attempt's outputs. ``attempt`` '' is the layout of records written
    before attempts (``results/<id>/``), which their keys still name."""
    return f"results/{job_id}/{attempt}/" if attempt else f"results/{job_id}/"


def figure_key(job_id: str, fmt: str, *, attempt: str) -> str:
    return f"{attempt_dir(job_id, attempt)}feature_maps.{fmt}"


def thumbnail_key(job_id: str, *, attempt: str) -> str:
    return f"{attempt_dir(job_id, attempt)}thumbnail.jpg"


def input_preview_key(job_id: str, *, attempt: str) -> str:
    return f"{attempt_dir(job_id, attempt)}input.jpg"


def manifest_key(job_id: str, *, attempt: str) -> str:
    return f"{attempt_dir(job_id, attempt)}manifest.json"


def arrays_key(job_id: str, *, attempt: str) -> str:
    return f"{attempt_dir(job_id, attempt)}maps.npz"


def scores_key(job_id: str, *, attempt: str) -> str:
    """A batch item's channel scores (dataset examples): float32 [2, channels], .npy."""
    return f"{attempt_dir(job_id, attempt)}scores.npy"


def layer_key(job_id: str, index: int, layer: str, *, attempt: str) -> str:
    return f"{attempt_dir(job_id, attempt)}layers/{index:02d}_{layer}.png"


def results_prefix(job_id: str) -> str:
    """Every attempt's outputs of a job or item (what cancel and retention delete)."""
    return f"results/{job_id}/"


def inputs_prefix(job_id: str) -> str:
    return f"inputs/{job_id}/"


def batch_source_key(batch_id: str, ext: str) -> str:
    return f"batches/{batch_id}/source.{ext}"


def batch_result_keys(batch_id: str, shard: int, shards: int) -> tuple[str, str]:
    """(manifest, zip) of result shard ``shard`` (1-based) of ``shards``: a batch with one
    shard keeps ``manifest.jsonl`` and ``results.zip``; more are numbered with 5 digits."""
    if shards == 1:
        return f"batches/{batch_id}/manifest.jsonl", f"batches/{batch_id}/results.zip"
    return (
        f"batches/{batch_id}/manifest-{shard:05d}.jsonl",
        f"batches/{batch_id}/results-{shard:05d}.zip",
    )


def examples_key(batch_id: str) -> str:
    return f"batches/{batch_id}/examples.json"


def examples_part_key(batch_id: str, part: str) -> str:
    """The dataset examples' working objects and sheets: ``partial-<NNNNN>.npz`` per result
    shard, ``winners.npz``, ``slice-<NNNNN>.npz`` per example slice, ``sheets/<LL>-<GGG>.jpg``."""
    return f"batches/{batch_id}/examples/{part}"


def batch_inputs_prefixes(batch_id: str) -> tuple[str, str]:
    """Where a batch's expanded inputs are: its input packs, and (written before packs) one
    ``inputs/<item id>/`` folder per item."""
    return f"batches/{batch_id}/inputs/", f"inputs/{batch_id}-"


def batch_input_pack_key(batch_id: str, block: int) -> str:
    """One block's image members, concatenated (items read theirs with a ranged GET)."""
    return f"batches/{batch_id}/inputs/{block:06d}.pack"


def batch_gzip_index_key(batch_id: str) -> str:
    """The seek points into a ``.tar.gz`` source that let a continuation resume mid-stream."""
    return f"batches/{batch_id}/expansion/gzindex"
