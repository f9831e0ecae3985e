"""Entry point of the `featuremaps` console script: one sub-command per module."""

from __future__ import annotations

import argparse
import sys

from client import batch, local, remote


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="featuremaps",
        description="Show what a ResNet-18 sees: feature-map figures, locally or via the service.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    local.add_parser(sub)
    remote.add_parsers(sub)
    batch.add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
