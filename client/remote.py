"""Sub-commands that talk to the featuremaps service over HTTP: `submit`, `status`,
`download`. The API address and token come from flags or FEATUREMAPS_API_URL /
FEATUREMAPS_API_TOKEN."""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import requests

FINISHED = ("succeeded", "failed", "canceled")
OPTION_FLAGS = ("mode", "reduction", "normalize", "format", "colormap", "renderer")


class ApiClient:
    def __init__(self, base_url: str, token: str | None = None, timeout: float = 30.0) -> None:
        self.base_url = base_url.rstrip("/")
        self.session = requests.Session()
        if token:
            self.session.headers["Authorization"] = f"Bearer {token}"
        self.timeout = timeout

    def request(self, method: str, path: str, **kwargs) -> requests.Response:
        response = self.session.request(
            method, f"{self.base_url}{path}", timeout=self.timeout, **kwargs
        )
        if response.status_code >= 400:
            raise ApiError(response)
        return response

    def submit(self, image: Path, options: dict[str, str]) -> dict:
        with image.open("rb") as fh:
            return self.request(
                "POST", "/jobs", files={"image": (image.name, fh)}, data=options
            ).json()

    def job(self, job_id: str) -> dict:
        return self.request("GET", f"/jobs/{job_id}").json()

    def wait(self, job_id: str, *, interval: float = 0.25, timeout: float = 600, echo=None) -> dict:
        deadline = time.monotonic() + timeout
        while True:
            doc = self.job(job_id)
            if echo:
                echo(doc)
            if doc["status"] in FINISHED:
                return doc
            if time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {doc['status']} after {timeout:g}s")
            time.sleep(interval)

    def download(self, doc: dict, out_dir: Path) -> list[Path]:
        """Fetch the figure, manifest and optional outputs of a succeeded job."""
        result = doc.get("result") or {}
        out_dir.mkdir(parents=True, exist_ok=True)
        fmt = doc["options"].get("format", "jpg")
        wanted = [
            (result.get("figure_url"), f"feature_maps.{fmt}"),
            (result.get("manifest_url"), "manifest.json"),
            (result.get("arrays_url"), "maps.npz"),
        ]
        wanted += [
            (url, f"layers/{i:02d}.png") for i, url in enumerate(result.get("layer_urls") or [])
        ]
        written = []
        for url, name in wanted:
            if not url:
                continue
            response = requests.get(url, timeout=self.timeout)
            response.raise_for_status()
            path = out_dir / name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(response.content)
            written.append(path)
        return written


class ApiError(Exception):
    def __init__(self, response: requests.Response) -> None:
        try:
            error = response.json()["error"]
            self.code, message = error["code"], error["message"]
        except (ValueError, KeyError, TypeError):
            self.code, message = f"http_{response.status_code}", response.text[:200]
        super().__init__(f"{response.status_code} {self.code}: {message}")
        self.status = response.status_code


def _client(args) -> ApiClient:
    return ApiClient(args.api, args.token)


def _status_line(doc: dict) -> None:
    extra = f" on {doc['worker']}" if doc.get("worker") else ""
    sys.stderr.write(f"\r{doc['id']}: {doc['status']}{extra}   ")
    sys.stderr.flush()


def cmd_submit(args) -> int:
    client = _client(args)
    options = options_from_args(args)
    failures = 0
    for image in args.images:
        try:
            accepted = client.submit(Path(image), options)
        except (ApiError, OSError) as exc:
            print(f"{image}: {exc}", file=sys.stderr)
            failures += 1
            continue
        if not args.wait:
            print(json.dumps(accepted))
            continue
        doc = client.wait(accepted["id"], echo=_status_line)
        sys.stderr.write("\n")
        print(json.dumps(doc, indent=2))
        if doc["status"] != "succeeded":
            failures += 1
        elif args.download:
            target = Path(args.download) / (accepted["id"] if len(args.images) > 1 else "")
            for path in client.download(doc, target):
                print(f"downloaded {path}", file=sys.stderr)
    return 1 if failures else 0


def cmd_status(args) -> int:
    try:
        print(json.dumps(_client(args).job(args.id), indent=2))
    except ApiError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def cmd_download(args) -> int:
    client = _client(args)
    try:
        doc = client.job(args.id)
    except ApiError as exc:
        print(exc, file=sys.stderr)
        return 1
    if doc["status"] != "succeeded":
        print(f"job {args.id} is {doc['status']}; nothing to download", file=sys.stderr)
        return 1
    for path in client.download(doc, Path(args.output)):
        print(path)
    return 0


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api",
        default=os.environ.get("FEATUREMAPS_API_URL", "http://127.0.0.1:8000"),
        help="API base URL (env FEATUREMAPS_API_URL)",
    )
    parser.add_argument(
        "--token",
        default=os.environ.get("FEATUREMAPS_API_TOKEN"),
        help="bearer token (env FEATUREMAPS_API_TOKEN)",
    )


def add_option_flags(parser: argparse.ArgumentParser) -> None:
    for name in OPTION_FLAGS:
        parser.add_argument(f"--{name}", help=f"job option {name} (server validates)")
    parser.add_argument("--per-layer", action="store_true", help="also store per-layer PNGs")
    parser.add_argument("--arrays", action="store_true", help="also store maps.npz")


def options_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The job options given by add_option_flags' flags, as form fields (unset ones left out
    so the server's defaults apply)."""
    values = {name: getattr(args, name) for name in OPTION_FLAGS}
    values["per_layer"] = "true" if args.per_layer else None
    values["arrays"] = "true" if args.arrays else None
    return {k: v for k, v in values.items() if v is not None}


def add_parsers(sub) -> None:
    submit = sub.add_parser("submit", help="submit images to the service")
    submit.add_argument("images", nargs="+", metavar="IMAGE")
    submit.add_argument("--wait", action="store_true", help="poll until each job finishes")
    submit.add_argument("--download", metavar="DIR", help="with --wait: fetch outputs into DIR")
    add_option_flags(submit)
    add_connection_flags(submit)
    submit.set_defaults(func=cmd_submit)

    status = sub.add_parser("status", help="print a job's document")
    status.add_argument("id")
    add_connection_flags(status)
    status.set_defaults(func=cmd_status)

    download = sub.add_parser("download", help="download a succeeded job's outputs")
    download.add_argument("id")
    download.add_argument("-o", "--output", default=".", metavar="DIR")
    add_connection_flags(download)
    download.set_defaults(func=cmd_download)
