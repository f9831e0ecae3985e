"""The Python client of the featuremaps API, for notebooks, scripts and the ``featuremaps``
command (which uses it, so there is one HTTP layer).

    from client import Client
    client = Client("http://127.0.0.1:8000", token=None)
    job = client.submit("photo.jpg", reduction="max", arrays=True).wait(progress=True)
    client.submit("photo.jpg", model="vgg16", mode="forward")    # FEATUREMAPS_MODELS
    mine = client.upload_model("tuned.safetensors", architecture="resnet18")["id"]
    job.figure()                  # PIL.Image: shows inline in Jupyter
    job.maps()["layer4.1.conv2"]  # numpy float32 H×W (needs arrays=True)
    batch = client.batch("photos.zip").wait(progress=True)
    for item in batch: ...
    batch.examples().tile_image("conv1", 3)   # the best item of conv1 channel 3

Errors are the typed exceptions of :mod:`client.errors`, each with the API's error code.
Answers 429 and 503 are retried (the API creates nothing when it answers them), after the
server's Retry-After when it sends one, else with exponential backoff. Submissions carry an
Idempotency-Key, so they are also retried when the connection drops before the answer
arrives: the API answers the retry with the record the first try created.
"""

from __future__ import annotations

import io
import json
import shutil
import sys
import tempfile
import time
import uuid
import zipfile
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import IO, Any, Self

import numpy as np
import requests
from PIL import Image

from client.errors import (
    ApiError,
    JobFailed,
    OutputNotMade,
    RateLimited,
    Unavailable,
    error_from_response,
)
from client.examples import Examples, download_examples
from shared.records import FINISHED

READ_BLOCK = 1024 * 1024
DEFAULT_URL = "http://127.0.0.1:8000"
IDEMPOTENCY_HEADER = "Idempotency-Key"

ImageSource = str | Path | bytes | Image.Image
Progress = bool | Callable[[dict], None]


class Client:
    """One API: its base URL, an optional bearer token, the retry policy for 429/503."""

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        timeout: float = 30.0,
        retries: int = 4,
        max_retry_wait: float = 60.0,
        session: requests.Session | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.url = url.rstrip("/")
        self.token = token
        self.timeout = timeout
        self.retries = retries
        self.max_retry_wait = max_retry_wait
        # No Authorization on the session: presigned S3 URLs refuse a second credential.
        self.http = session or requests.Session()
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"Client({self.url!r})"

    # -- the HTTP layer ------------------------------------------------------------------

    def request(self, method: str, path: str, **kwargs: Any) -> requests.Response:
        """One API call; 429/503 are retried up to ``retries`` times, honouring Retry-After,
        and so is a dropped connection when the call is safe to repeat (not a POST, or a
        POST with an Idempotency-Key). A body with a ``rewind()`` method (a streamed
        archive) is rewound for each try."""
        headers = dict(kwargs.pop("headers", None) or {})
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        kwargs.setdefault("timeout", self.timeout)
        repeatable = method != "POST" or IDEMPOTENCY_HEADER in headers
        for attempt in range(self.retries + 1):
            body = kwargs.get("data")
            if attempt and hasattr(body, "rewind"):
                body.rewind()
            try:
                response = self.http.request(method, f"{self.url}{path}", headers=headers, **kwargs)
            except requests.ConnectionError:
                if not repeatable or attempt == self.retries:
                    raise
                self._sleep(min(0.5 * 2**attempt, self.max_retry_wait))
                continue
            if response.status_code < 400:
                return response
            error = error_from_response(response)
            if not _retryable(error) or attempt == self.retries:
                raise error
            self._sleep(self._retry_wait(error, attempt))
        raise AssertionError("unreachable")

    def _retry_wait(self, error: ApiError, attempt: int) -> float:
        wait = error.retry_after if error.retry_after is not None else 0.5 * 2**attempt
        return min(wait, self.max_retry_wait)

    def fetch(self, url: str, *, timeout: float | None = None) -> bytes:
        """The bytes at a presigned storage URL."""
        response = self.http.get(url, timeout=timeout or self.timeout)
        if response.status_code >= 400:
            raise ApiError(response.status_code, "storage_error", response.text[:200])
        return response.content

    def fetch_to(self, url: str, path: Path, *, timeout: float = 300) -> Path:
        """Stream a presigned storage URL into ``path``."""
        path.parent.mkdir(parents=True, exist_ok=True)
        with self.http.get(url, stream=True, timeout=timeout) as response:
            if response.status_code >= 400:
                raise ApiError(response.status_code, "storage_error", response.text[:200])
            with path.open("wb") as sink:
                for block in response.iter_content(READ_BLOCK):
                    sink.write(block)
        return path

    # -- jobs ------------------------------------------------------------------------------

    def submit(
        self, image: ImageSource, *, idempotency_key: str | None = None, **options: Any
    ) -> Job:
        """Submit one image (a path, its bytes, or a PIL image) with job options such as
        ``mode="forward"``, ``reduction="max"``, ``per_layer=True``, ``arrays=True``.
        Every try sends one Idempotency-Key (a new UUID unless given), so a retry after a
        lost answer gets the same job instead of a second one."""
        name, data = _image_payload(image)
        response = self.request(
            "POST",
            "/jobs",
            files={"image": (name, data)},
            data=form_fields(options),
            headers=_idempotency(idempotency_key),
        )
        return Job(self, response.json())

    def job(self, job_id: str) -> Job:
        """An existing job, with its current document."""
        return Job(self, {"id": job_id}).refresh()

    # -- models ----------------------------------------------------------------------------

    def upload_model(self, path: str | Path, *, architecture: str, name: str | None = None) -> dict:
        """Upload weights (a safetensors file or a ``torch.save`` state_dict) for an enabled
        ``architecture``, streamed from disk; the model's document, whose ``id`` is what
        ``submit(..., model=...)`` and ``batch(..., model=...)`` take. Uploading the same
        file again gives the same id."""
        fields = form_fields({"architecture": architecture, "name": name})
        with MultipartFile("weights", Path(path), fields) as body:
            response = self.request(
                "POST",
                "/models",
                data=body,
                headers={"Content-Type": body.content_type},
                timeout=max(self.timeout, 600),
            )
        return response.json()

    def models(self) -> dict:
        """``{"architectures": [enabled], "uploads": [this token's uploaded models]}``."""
        return self.request("GET", "/models").json()

    def delete_model(self, model_id: str) -> None:
        self.request("DELETE", f"/models/{model_id}")

    # -- batches ---------------------------------------------------------------------------

    def batch(
        self,
        source: str | Path | Iterable[str | Path],
        *,
        idempotency_key: str | None = None,
        **options: Any,
    ) -> Batch:
        """Submit an archive (streamed from disk), a list of image paths (zipped on the way)
        or an ``s3://bucket/prefix/`` as one batch, with one Idempotency-Key as ``submit``."""
        headers = _idempotency(idempotency_key)
        if isinstance(source, str) and source.startswith("s3://"):
            body = {"source": source, **{k: v for k, v in options.items() if v is not None}}
            return Batch(self, self.request("POST", "/batches", json=body, headers=headers).json())
        if isinstance(source, str | Path):
            return self._submit_archive(Path(source), options, headers)
        with tempfile.TemporaryDirectory(prefix="featuremaps-") as scratch:
            archive = zip_images([Path(p) for p in source], Path(scratch) / "images.zip")
            return self._submit_archive(archive, options, headers)

    def get_batch(self, batch_id: str) -> Batch:
        return Batch(self, {"id": batch_id}).refresh()

    def _submit_archive(self, path: Path, options: dict[str, Any], headers: dict) -> Batch:
        with MultipartFile("archive", path, form_fields(options)) as body:
            response = self.request(
                "POST",
                "/batches",
                data=body,
                headers={**headers, "Content-Type": body.content_type},
                timeout=max(self.timeout, 600),
            )
        return Batch(self, response.json())


def _idempotency(key: str | None) -> dict[str, str]:
    return {IDEMPOTENCY_HEADER: key or str(uuid.uuid4())}


def _retryable(error: ApiError) -> bool:
    """Answers after which the API created nothing yet, so trying again is safe."""
    return isinstance(error, RateLimited | Unavailable) or error.code == "idempotency_in_progress"


class _Record:
    """What a job and a batch share on the client side: the id, the latest document, and
    fetching or cancelling it at ``/<collection>/<id>``."""

    collection = ""

    def __init__(self, client: Client, doc: dict) -> None:
        self.client = client
        self.id: str = doc["id"]
        self.doc = doc

    def __repr__(self) -> str:
        return f"<{type(self).__name__} {self.id} {self.status}>"

    @property
    def status(self) -> str:
        return self.doc.get("status", "unknown")

    def refresh(self) -> Self:
        self.doc = self.client.request("GET", f"/{self.collection}/{self.id}").json()
        return self

    def cancel(self) -> Self:
        self.doc = self.client.request("DELETE", f"/{self.collection}/{self.id}").json()
        return self


class Job(_Record):
    """A submitted job. ``doc`` is its latest document (``refresh()`` fetches it again)."""

    collection = "jobs"

    def __init__(self, client: Client, doc: dict) -> None:
        super().__init__(client, doc)
        self._manifest: dict | None = None

    @property
    def result(self) -> dict:
        return self.doc.get("result") or {}

    def wait(self, progress: Progress = False, *, interval: float = 0.25, timeout: float = 600):
        """Poll until the job has ended (whatever the outcome: see ``status``); ``progress``
        prints its status changes on stderr, or is called with each document."""
        echo = progress if callable(progress) else _status_line if progress else None
        deadline = time.monotonic() + timeout
        while True:
            self.refresh()
            if echo:
                echo(self.doc)
            if self.status in FINISHED:
                if echo is _status_line:
                    sys.stderr.write("\n")
                return self
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {self.id} still {self.status} after {timeout:g}s")
            time.sleep(interval)

    def _succeeded(self) -> dict:
        if self.status not in FINISHED:
            self.wait()
        if self.status != "succeeded":
            error = self.doc.get("error") or {}
            raise JobFailed(
                self.id, self.status, error.get("code", self.status), error.get("message", "")
            )
        return self.result

    def figure_bytes(self) -> bytes:
        return self.client.fetch(self._succeeded()["figure_url"])

    def figure(self) -> Image.Image:
        """The figure as a PIL image (jpg, png, webp; use figure_bytes() for svg/pdf)."""
        image = Image.open(io.BytesIO(self.figure_bytes()))
        image.load()
        return image

    @property
    def manifest(self) -> dict:
        if self._manifest is None:
            self._manifest = json.loads(self.client.fetch(self._succeeded()["manifest_url"]))
        return self._manifest

    def maps(self) -> dict[str, np.ndarray]:
        """Every layer's float32 map from maps.npz (the job needs ``arrays=True``)."""
        url = self._succeeded().get("arrays_url")
        if not url:
            raise OutputNotMade(
                self.id,
                "maps.npz",
                "the job succeeded but was submitted without arrays=True, so its float32 maps "
                "were not kept; submit the image again with arrays=True "
                "(client.submit(image, arrays=True)), or read the figure (job.figure_bytes())",
            )
        with np.load(io.BytesIO(self.client.fetch(url)), allow_pickle=False) as arrays:
            return {name: arrays[name] for name in arrays.files}

    def layer(self, name: str) -> np.ndarray:
        """One layer's float32 map, served by the API from maps.npz (needs ``arrays=True``)."""
        self._succeeded()
        response = self.client.request(
            "GET", f"/jobs/{self.id}/layers/{name}", headers={"Accept": "application/octet-stream"}
        )
        shape = tuple(int(n) for n in response.headers["X-Shape"].split(","))
        return np.frombuffer(response.content, dtype="<f4").reshape(shape)

    def download(self, out_dir: str | Path) -> list[Path]:
        """Figure, manifest and the optional outputs (maps.npz, per-layer PNGs) into a folder."""
        result, out = self._succeeded(), Path(out_dir)
        fmt = self.doc["options"].get("format", "jpg")
        wanted = [
            (result.get("figure_url"), f"feature_maps.{fmt}"),
            (result.get("manifest_url"), "manifest.json"),
            (result.get("arrays_url"), "maps.npz"),
        ]
        wanted += [
            (url, f"layers/{i:02d}.png") for i, url in enumerate(result.get("layer_urls") or [])
        ]
        return [self.client.fetch_to(url, out / name) for url, name in wanted if url]


class BatchItem:
    """One member of a batch, as the items page lists it."""

    def __init__(self, client: Client, doc: dict) -> None:
        self.client = client
        self.doc = doc
        self.id: str = doc["id"]
        self.name: str = doc["name"]
        self.status: str = doc["status"]
        self.error: dict | None = doc.get("error")

    def __repr__(self) -> str:
        return f"<BatchItem {self.name!r} {self.status}>"

    def _url(self, key: str) -> str:
        if self.status != "succeeded" or not self.doc.get(key):
            error = self.error or {}
            raise JobFailed(
                self.id, self.status, error.get("code", self.status), error.get("message", "")
            )
        return self.doc[key]

    def figure(self) -> Image.Image:
        image = Image.open(io.BytesIO(self.client.fetch(self._url("figure_url"))))
        image.load()
        return image

    def thumbnail(self) -> Image.Image:
        image = Image.open(io.BytesIO(self.client.fetch(self._url("thumbnail_url"))))
        image.load()
        return image


class Batch(_Record):
    """A submitted batch; iterate over it for its items (paged from the API)."""

    PAGE = 500
    collection = "batches"

    @property
    def counts(self) -> dict:
        return self.doc.get("counts") or {}

    @property
    def progress(self) -> float:
        """The fraction of items ended, 0..1, fetched now."""
        return float(self.refresh().doc.get("progress", 0.0))

    @property
    def finished(self) -> bool:
        """Ended, and its manifest and results.zip written."""
        return self.status in FINISHED and bool(self.doc.get("result"))

    def wait(self, progress: bool = False, *, interval: float = 0.5, timeout: float | None = None):
        """Poll until the batch is finished; ``progress`` shows a bar (done/total, failed,
        images/s, ETA)."""
        from tqdm import tqdm

        deadline = None if timeout is None else time.monotonic() + timeout
        with tqdm(
            total=0, unit="img", desc=self.id[:8], dynamic_ncols=True, disable=not progress
        ) as bar:
            while True:
                self.refresh()
                _update_bar(bar, self.doc)
                if self.finished:
                    return self
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"batch {self.id} still {self.status} after {timeout:g}s")
                time.sleep(interval)

    def items(self, *, page_size: int = PAGE) -> Iterator[BatchItem]:
        cursor: str | None = "0"
        while cursor is not None:
            page = self.client.request(
                "GET", f"/batches/{self.id}/items", params={"cursor": cursor, "limit": page_size}
            ).json()
            for doc in page["items"]:
                yield BatchItem(self.client, doc)
            cursor = page["next_cursor"]

    def __iter__(self) -> Iterator[BatchItem]:
        return self.items()

    def shards(self) -> list[dict]:
        """The result shards (index, first, items, manifest_url, archive_url), in order."""
        result = self.doc.get("result") or {}
        if not result:
            raise JobFailed(self.id, self.status, "not_finished", "the batch has no results yet")
        return result["shards"]

    def examples(self) -> Examples:
        """Its dataset examples: every layer's channels with their best items and tiles
        (:mod:`client.examples`). NotFound when it was run with ``examples=0``, Conflict
        until it has ended."""
        return Examples.fetch(self.client, self.id)

    def download_examples(self, out_dir: str | Path) -> list[Path]:
        """``examples.json`` and every sheet into ``out_dir`` (``sheets/<LL>-<GGG>.jpg``)."""
        return download_examples(self.client, self.refresh().doc, out_dir)

    def manifest_lines(self) -> Iterator[dict]:
        """Every member's manifest line, in member order, across all result shards (each
        line's ``figure`` names a file in its own shard's zip)."""
        for shard in self.shards():
            for line in self.client.fetch(shard["manifest_url"]).decode().splitlines():
                yield json.loads(line)

    def download(self, out_dir: str | Path) -> list[Path]:
        """``manifest.jsonl`` (every shard's lines, in member order) and every figure out of
        every shard's zip under ``out_dir/figures``. A figure's name is unique within its
        shard; one that an earlier shard used already gets the item id before its extension,
        as within a shard, and its manifest line says so."""
        out = Path(out_dir).resolve()
        out.mkdir(parents=True, exist_ok=True)
        manifest, figures, used = out / "manifest.jsonl", [], set()
        with manifest.open("w") as sink:
            for shard in self.shards():
                lines = self.client.fetch(shard["manifest_url"]).decode().splitlines()
                bundle = self.client.fetch_to(
                    shard["archive_url"], out / f".results-{shard['index']:05d}.zip"
                )
                with zipfile.ZipFile(bundle) as archive:
                    for line in map(json.loads, lines):
                        if line.get("figure"):
                            figures.append(_extract_figure(archive, line, out, used))
                        sink.write(json.dumps(line) + "\n")
                bundle.unlink()
        return [manifest, *figures]


def _extract_figure(archive: zipfile.ZipFile, line: dict, out: Path, used: set[str]) -> Path:
    """Write the manifest line's figure under ``out`` (renamed, and the line with it, when
    an earlier shard took its name); refuses a name that would land outside ``out``."""
    arcname = name = line["figure"]
    if name in used:
        stem, dot, ext = name.rpartition(".")
        name = f"{stem}.{line['item_id']}{dot}{ext}"
    target = (out / name).resolve()
    if not target.is_relative_to(out) or name in used:
        raise ApiError(502, "bad_archive", f"figure name {arcname!r} cannot be used")
    used.add(name)
    line["figure"] = name
    target.parent.mkdir(parents=True, exist_ok=True)
    with archive.open(arcname) as source, target.open("wb") as sink:
        shutil.copyfileobj(source, sink)
    return target


def _update_bar(bar, doc: dict) -> None:
    counts = doc["counts"]
    bar.total = counts["total"]
    bar.n = counts["succeeded"] + counts["failed"] + counts["canceled"] + counts.get("skipped", 0)
    rate = f"{doc['rate']:.1f}/s" if doc.get("rate") else "-"
    eta = f"{doc['eta_s']:.0f}s" if doc.get("eta_s") is not None else "-"
    bar.set_postfix_str(
        f"{doc['status']} failed={counts['failed']} skipped={counts.get('skipped', 0)} "
        f"rate={rate} eta={eta}",
        refresh=False,
    )
    bar.refresh()


def _status_line(doc: dict) -> None:
    extra = f" on {doc['worker']}" if doc.get("worker") else ""
    sys.stderr.write(f"\r{doc['id']}: {doc['status']}{extra}   ")
    sys.stderr.flush()


def form_fields(options: dict[str, Any]) -> dict[str, str]:
    """Job options as form fields: booleans as true/false, unset (None) ones left out so the
    server's defaults apply."""
    fields = {}
    for name, value in options.items():
        if value is None:
            continue
        fields[name] = ("true" if value else "false") if isinstance(value, bool) else str(value)
    return fields


def _image_payload(image: ImageSource) -> tuple[str, bytes]:
    if isinstance(image, Image.Image):
        buffer = io.BytesIO()
        image.save(buffer, "PNG")
        return "image.png", buffer.getvalue()
    if isinstance(image, bytes | bytearray):
        return "image", bytes(image)
    path = Path(image)
    return path.name, path.read_bytes()


def zip_images(paths: list[Path], target: Path) -> Path:
    """Store ``paths`` in a zip (no recompression: images are compressed already); repeated
    file names get -2, -3, … so no member hides another."""
    used: set[str] = set()
    with zipfile.ZipFile(target, "w", zipfile.ZIP_STORED) as archive:
        for path in paths:
            archive.write(path, unique_name(path.stem, path.suffix, used))
    return target


def unique_name(stem: str, suffix: str, used: set[str]) -> str:
    """``stem + suffix``, or with -2, -3, … before the suffix when taken; adds it to ``used``."""
    name, n = stem + suffix, 1
    while name in used:
        n += 1
        name = f"{stem}-{n}{suffix}"
    used.add(name)
    return name


class MultipartFile:
    """A multipart/form-data body (option fields, then one file) read from disk block by
    block. It has a length, so requests sends it with Content-Length, not all at once; it
    can be rewound for a retry."""

    def __init__(self, field: str, path: Path, fields: dict[str, str]) -> None:
        self.boundary = uuid.uuid4().hex
        self.path = path
        self._head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
            for name, value in fields.items()
        )
        self._head += (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        self._tail = f"\r\n--{self.boundary}--\r\n".encode()
        self._length = len(self._head) + path.stat().st_size + len(self._tail)
        self._parts: list[bytes | IO[bytes]] = []
        self.rewind()

    def rewind(self) -> None:
        self.close()
        self._parts = [self._head, self.path.open("rb"), self._tail]

    def close(self) -> None:
        for part in self._parts:
            if not isinstance(part, bytes):
                part.close()
        self._parts = []

    def __enter__(self) -> MultipartFile:
        return self

    def __exit__(self, *_exc: object) -> None:
        self.close()

    @property
    def content_type(self) -> str:
        return f"multipart/form-data; boundary={self.boundary}"

    def __len__(self) -> int:
        return self._length

    def read(self, size: int = READ_BLOCK) -> bytes:
        while self._parts:
            part = self._parts[0]
            if isinstance(part, bytes):
                self._parts.pop(0)
                if part:
                    return part
                continue
            data = part.read(size if size and size > 0 else READ_BLOCK)
            if data:
                return data
            part.close()
            self._parts.pop(0)
        return b""
