"""`featuremaps batch ARCHIVE|s3://bucket/prefix/ [--wait] [--download DIR]`: submit a whole
archive (streamed from disk, never read into memory) or an S3 prefix as one batch, follow it
with a progress bar (done/total, failed, images/s, ETA), and fetch its manifest and figures."""

from __future__ import annotations

import argparse
import json
import sys
import time
import uuid
import zipfile
from pathlib import Path
from typing import IO

import requests
from tqdm import tqdm

from client.remote import (
    ApiClient,
    ApiError,
    add_connection_flags,
    add_option_flags,
    options_from_args,
)

FINISHED = ("succeeded", "failed", "canceled")
READ_BLOCK = 1024 * 1024


class MultipartFile:
    """A multipart/form-data body (option fields, then one file) read from disk block by
    block. It has a length, so requests sends it with Content-Length, not all at once."""

    def __init__(self, field: str, path: Path, fields: dict[str, str]) -> None:
        self.boundary = uuid.uuid4().hex
        head = b"".join(
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n'
            f"{value}\r\n".encode()
            for name, value in fields.items()
        )
        head += (
            f'--{self.boundary}\r\nContent-Disposition: form-data; name="{field}"; '
            f'filename="{path.name}"\r\nContent-Type: application/octet-stream\r\n\r\n'
        ).encode()
        self._parts: list[bytes | IO[bytes]] = [head, path.open("rb"), self._tail()]
        self._length = len(head) + path.stat().st_size + len(self._tail())

    def _tail(self) -> bytes:
        return f"\r\n--{self.boundary}--\r\n".encode()

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


def submit_batch(client: ApiClient, source: str, options: dict[str, str]) -> dict:
    if source.startswith("s3://"):
        return client.request("POST", "/batches", json={"source": source, **options}).json()
    body = MultipartFile("archive", Path(source), options)
    return client.request(
        "POST", "/batches", data=body, headers={"Content-Type": body.content_type}
    ).json()


def follow(client: ApiClient, batch_id: str, *, interval: float = 0.5) -> dict:
    """Poll the batch with a progress bar until it is finished and its results are written."""
    with tqdm(total=0, unit="img", desc=batch_id[:8], dynamic_ncols=True) as bar:
        while True:
            doc = client.request("GET", f"/batches/{batch_id}").json()
            counts = doc["counts"]
            bar.total = counts["total"]
            bar.n = counts["succeeded"] + counts["failed"] + counts["canceled"]
            rate = f"{doc['rate']:.1f}/s" if doc.get("rate") else "-"
            eta = f"{doc['eta_s']:.0f}s" if doc.get("eta_s") is not None else "-"
            bar.set_postfix_str(
                f"{doc['status']} failed={counts['failed']} rate={rate} eta={eta}", refresh=False
            )
            bar.refresh()
            if doc["status"] in FINISHED and doc.get("result"):
                return doc
            time.sleep(interval)


def download(doc: dict, out_dir: Path, *, timeout: float = 300) -> list[Path]:
    """manifest.jsonl, and every figure out of results.zip under ``out_dir/figures``."""
    out_dir.mkdir(parents=True, exist_ok=True)
    manifest = out_dir / "manifest.jsonl"
    bundle = out_dir / "results.zip"
    for url, path in (
        (doc["result"]["manifest_url"], manifest),
        (doc["result"]["archive_url"], bundle),
    ):
        with requests.get(url, stream=True, timeout=timeout) as response:
            response.raise_for_status()
            with path.open("wb") as sink:
                for block in response.iter_content(READ_BLOCK):
                    sink.write(block)
    with zipfile.ZipFile(bundle) as archive:
        # extractall drops absolute parts and '..' from names; ours have neither anyway.
        archive.extractall(out_dir)
        figures = [out_dir / name for name in archive.namelist()]
    bundle.unlink()
    return [manifest, *figures]


def cmd_batch(args: argparse.Namespace) -> int:
    client = ApiClient(args.api, args.token, timeout=600)
    options = options_from_args(args)
    try:
        accepted = submit_batch(client, args.source, options)
    except (ApiError, OSError) as exc:
        print(f"{args.source}: {exc}", file=sys.stderr)
        return 1
    if not (args.wait or args.download):
        print(json.dumps(accepted))
        return 0
    doc = follow(client, accepted["id"])
    print(json.dumps({k: doc[k] for k in ("id", "status", "counts", "error")}, indent=2))
    if args.download:
        paths = download(doc, Path(args.download))
        print(f"downloaded {len(paths) - 1} figures and the manifest to {args.download}")
    return 0 if doc["status"] == "succeeded" else 1


def add_parser(sub) -> None:
    batch = sub.add_parser("batch", help="submit an archive or s3:// prefix as one batch")
    batch.add_argument("source", metavar="ARCHIVE|s3://bucket/prefix/")
    batch.add_argument("--wait", action="store_true", help="follow progress until it finishes")
    batch.add_argument("--download", metavar="DIR", help="wait, then fetch manifest and figures")
    add_option_flags(batch)
    add_connection_flags(batch)
    batch.set_defaults(func=cmd_batch)
