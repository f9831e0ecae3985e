"""Sub-commands that talk to the featuremaps service over HTTP: `submit`, `status`,
`download`, through :class:`client.api.Client`. The API address and token come from flags or
FEATUREMAPS_API_URL / FEATUREMAPS_API_TOKEN."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from client.api import DEFAULT_URL, Client
from client.errors import ApiError

OPTION_FLAGS = (
    *("mode", "reduction", "normalize", "format", "colormap", "renderer", "precision"),
    *("model", "layers"),
)


def client_for(args: argparse.Namespace, **kwargs) -> Client:
    return Client(args.api, args.token, **kwargs)


def cmd_submit(args) -> int:
    client = client_for(args)
    options = options_from_args(args)
    failures = 0
    for image in args.images:
        try:
            job = client.submit(Path(image), **options)
        except (ApiError, OSError) as exc:
            print(f"{image}: {exc}", file=sys.stderr)
            failures += 1
            continue
        if not args.wait:
            print(json.dumps(job.doc))
            continue
        job.wait(progress=True)
        print(json.dumps(job.doc, indent=2))
        if job.status != "succeeded":
            failures += 1
        elif args.download:
            target = Path(args.download) / (job.id if len(args.images) > 1 else "")
            for path in job.download(target):
                print(f"downloaded {path}", file=sys.stderr)
    return 1 if failures else 0


def cmd_status(args) -> int:
    try:
        print(json.dumps(client_for(args).job(args.id).doc, indent=2))
    except ApiError as exc:
        print(exc, file=sys.stderr)
        return 1
    return 0


def cmd_download(args) -> int:
    try:
        job = client_for(args).job(args.id)
    except ApiError as exc:
        print(exc, file=sys.stderr)
        return 1
    if job.status != "succeeded":
        print(f"job {args.id} is {job.status}; nothing to download", file=sys.stderr)
        return 1
    for path in job.download(Path(args.output)):
        print(path)
    return 0


def add_connection_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--api",
        default=os.environ.get("FEATUREMAPS_API_URL", DEFAULT_URL),
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
    parser.add_argument(
        "--callback-url", metavar="URL", help="POSTed the signed status document when it ends"
    )


def options_from_args(args: argparse.Namespace) -> dict[str, str]:
    """The job options given by add_option_flags' flags, and the callback URL, as form
    fields (unset ones left out so the server's defaults apply)."""
    values = {name: getattr(args, name) for name in OPTION_FLAGS}
    values["per_layer"] = "true" if args.per_layer else None
    values["arrays"] = "true" if args.arrays else None
    values["callback_url"] = args.callback_url
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
