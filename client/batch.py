"""`featuremaps batch ARCHIVE|s3://bucket/prefix/ [--wait] [--download DIR]`: submit a whole
archive (streamed from disk, never read into memory) or an S3 prefix as one batch, follow it
with a progress bar (done/total, failed, images/s, ETA), and fetch its manifest and figures
(from every result shard); `featuremaps examples BATCH_ID [-o DIR]`: fetch an ended batch's
dataset examples (examples.json and the sheets) — all through :class:`client.api.Client`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from client.errors import ApiError
from client.remote import add_connection_flags, add_option_flags, client_for, options_from_args


def cmd_batch(args: argparse.Namespace) -> int:
    client = client_for(args, timeout=600)
    try:
        options = options_from_args(args)
        if args.item_callbacks:
            options["item_callbacks"] = "true"
        if args.archive_encoding:
            options["archive_encoding"] = args.archive_encoding
        batch = client.batch(args.source, **options)
    except (ApiError, OSError) as exc:
        print(f"{args.source}: {exc}", file=sys.stderr)
        return 1
    if not (args.wait or args.download):
        print(json.dumps(batch.doc))
        return 0
    batch.wait(progress=True)
    print(json.dumps({k: batch.doc[k] for k in ("id", "status", "counts", "error")}, indent=2))
    if args.download:
        paths = batch.download(Path(args.download))
        shards = len(batch.shards())
        print(
            f"downloaded {len(paths) - 1} figures and the manifest "
            f"({shards} result shard{'s' if shards > 1 else ''}) to {args.download}"
        )
    return 0 if batch.status == "succeeded" else 1


def cmd_examples(args: argparse.Namespace) -> int:
    try:
        paths = client_for(args, timeout=600).get_batch(args.id).download_examples(args.output)
    except (ApiError, OSError) as exc:
        print(f"batch {args.id}: {exc}", file=sys.stderr)
        return 1
    print(f"downloaded examples.json and {len(paths) - 1} sheets to {args.output}")
    return 0


def add_parser(sub) -> None:
    batch = sub.add_parser("batch", help="submit an archive or s3:// prefix as one batch")
    batch.add_argument("source", metavar="ARCHIVE|s3://bucket/prefix/")
    batch.add_argument("--wait", action="store_true", help="follow progress until it finishes")
    batch.add_argument("--download", metavar="DIR", help="wait, then fetch manifest and figures")
    add_option_flags(batch)
    batch.add_argument(
        "--item-callbacks",
        action="store_true",
        help="with --callback-url: also POST each item's document when it ends",
    )
    batch.add_argument(
        "--archive-encoding",
        metavar="CODEC",
        help="how to read member names that are not UTF-8 (gbk, shift_jis…; zip default cp437)",
    )
    add_connection_flags(batch)
    batch.set_defaults(func=cmd_batch)

    examples = sub.add_parser(
        "examples", help="download an ended batch's dataset examples (examples.json, sheets)"
    )
    examples.add_argument("id", metavar="BATCH_ID")
    examples.add_argument("-o", "--output", default=".", metavar="DIR")
    add_connection_flags(examples)
    examples.set_defaults(func=cmd_examples)
