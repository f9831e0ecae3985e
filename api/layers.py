"""One layer's reduced map of a succeeded job, read out of its ``maps.npz``, for clients that
want values (the web page's value under the cursor) without downloading every layer.

``maps.npz`` is written uncompressed by ``np.savez``; ``np.load`` reads only the member asked
for. The map is served as JSON (``{"name", "shape", "min", "max", "data"}``) or, for
``Accept: application/octet-stream``, as raw little-endian float32 in row-major order with
its shape in ``X-Shape`` (``H,W``) — bit for bit the reduction's output either way.
"""

from __future__ import annotations

import io
import zipfile

import numpy as np

from shared.errors import Conflict, NotFound
from shared.jobs import Job, JobStatus
from shared.storage import ObjectStore

RAW_MEDIA_TYPE = "application/octet-stream"


def read_layer_map(store: ObjectStore, job: Job, layer: str) -> np.ndarray:
    """The float32 H×W map of ``layer``; Conflict until the job succeeded or when it was run
    without ``arrays``, NotFound for a layer the job does not have."""
    result = job.result or {}
    if job.status is not JobStatus.SUCCEEDED:
        raise Conflict(f"job {job.id} is {job.status.value}; its maps exist once it succeeded")
    if layer not in {entry["name"] for entry in result.get("layers", [])}:
        raise NotFound(f"job {job.id} has no layer {layer!r}")
    if not result.get("arrays_key"):
        raise Conflict(
            f"job {job.id} was submitted without arrays=true, so its maps were not kept; "
            "submit it again with arrays=true to read values"
        )
    data = store.get_bytes(result["arrays_key"])
    try:
        with np.load(io.BytesIO(data), allow_pickle=False) as arrays:
            return np.asarray(arrays[layer], dtype="<f4")
    except (KeyError, ValueError, OSError, zipfile.BadZipFile) as exc:
        raise NotFound(f"the maps of job {job.id} have no readable layer {layer!r}") from exc


def layer_json(layer: str, array: np.ndarray) -> dict:
    return {
        "name": layer,
        "shape": list(array.shape),
        "min": float(array.min()),
        "max": float(array.max()),
        "data": array.tolist(),
    }


def layer_raw(array: np.ndarray) -> tuple[bytes, dict[str, str]]:
    headers = {"Content-Type": RAW_MEDIA_TYPE, "X-Shape": ",".join(map(str, array.shape))}
    return np.ascontiguousarray(array, dtype="<f4").tobytes(), headers
