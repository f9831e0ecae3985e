"""Object-storage keys (docs/design.md "Storage layout"). Result keys depend only on the job id,
so a redelivered task overwrites its outputs rather than duplicating them."""

from __future__ import annotations


def input_key(job_id: str, ext: str, n: int = 0) -> str:
    return f"inputs/{job_id}/{n}.{ext}"


def figure_key(job_id: str, fmt: str) -> str:
    return f"results/{job_id}/feature_maps.{fmt}"


def thumbnail_key(job_id: str) -> str:
    return f"results/{job_id}/thumbnail.jpg"


def input_preview_key(job_id: str) -> str:
    return f"results/{job_id}/input.jpg"


def manifest_key(job_id: str) -> str:
    return f"results/{job_id}/manifest.json"


def arrays_key(job_id: str) -> str:
    return f"results/{job_id}/maps.npz"


def layer_key(job_id: str, index: int, layer: str) -> str:
    return f"results/{job_id}/layers/{index:02d}_{layer}.png"


def results_prefix(job_id: str) -> str:
    return f"results/{job_id}/"


def inputs_prefix(job_id: str) -> str:
    return f"inputs/{job_id}/"


def batch_source_key(batch_id: str, ext: str) -> str:
    return f"batches/{batch_id}/source.{ext}"


def batch_manifest_key(batch_id: str) -> str:
    return f"batches/{batch_id}/manifest.jsonl"


def batch_results_key(batch_id: str) -> str:
    return f"batches/{batch_id}/results.zip"


def batch_input_pack_key(batch_id: str, block: int) -> str:
    """One object per block of the batch's members: their bytes, concatenated."""
    return f"batches/{batch_id}/inputs/{block:06d}.pack"


def batch_gzip_index_key(batch_id: str) -> str:
    """The seek points into a ``.tar.gz`` source that let a continuation resume mid-stream."""
    return f"batches/{batch_id}/expansion/gzindex"
