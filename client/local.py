"""``featuremaps local IMAGE... -o DIR``: the whole pipeline in this process, no services.

Writes ``DIR/<image stem>/feature_maps.<fmt>`` and ``manifest.json`` per image, plus
``maps.npz`` (``--arrays``) and ``layers/NN_<layer>.png`` (``--per-layer``). A bad image is
reported on stderr with its error code and the others go on; the exit status is 1 when any
image failed, 2 when the model could not be set up. torch is imported only when the command
runs, so the other sub-commands start quickly.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from client.api import unique_name
from shared.options import (
    ARCHITECTURES,
    COLORMAPS,
    DEFAULTS,
    FORMATS,
    MODES,
    NORMALIZATIONS,
    PRECISIONS,
    REDUCTIONS,
    RENDERERS,
)

if TYPE_CHECKING:
    from worker.compute.pipeline import ImageResult

# Above this many images a progress bar is worth its line.
PROGRESS_MIN_IMAGES = 4


def add_parser(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "local",
        help="render feature maps in this process (no services needed)",
        description="Run ResNet-18 on each image here and write its feature-map figure.",
    )
    parser.add_argument("images", nargs="+", type=Path, metavar="IMAGE")
    parser.add_argument("-o", "--output", type=Path, default=Path("out"), metavar="DIR")
    parser.add_argument("--mode", choices=MODES, default=DEFAULTS.mode)
    parser.add_argument("--model", choices=ARCHITECTURES, default=DEFAULTS.model)
    parser.add_argument(
        "--layers", default="", help="layer names or patterns, comma separated (layer4.*)"
    )
    parser.add_argument("--reduction", choices=REDUCTIONS, default=DEFAULTS.reduction)
    parser.add_argument("--normalize", choices=NORMALIZATIONS, default=DEFAULTS.normalize)
    parser.add_argument("--format", choices=FORMATS, default=DEFAULTS.format)
    parser.add_argument("--colormap", choices=COLORMAPS, default=DEFAULTS.colormap)
    parser.add_argument("--renderer", choices=RENDERERS, default=DEFAULTS.renderer)
    parser.add_argument(
        "--precision",
        choices=PRECISIONS,
        default=DEFAULTS.precision,
        help="exact: the article's computation; fast: JPEG draft decode (+TF32 on CUDA); "
        "auto: exact on CPU, fast on CUDA",
    )
    parser.add_argument(
        "--weights",
        help="imagenet, random or a state_dict path (default: FEATUREMAPS_WEIGHTS or imagenet)",
    )
    parser.add_argument("--arrays", action="store_true", help="also write maps.npz")
    parser.add_argument("--per-layer", action="store_true", help="also write one PNG per layer")
    parser.add_argument("--batch-size", type=_positive_int, default=8, metavar="N")
    parser.add_argument("--device", help="auto, cpu, cuda or cuda:N (default: FEATUREMAPS_DEVICE)")
    parser.add_argument(
        "--max-pixels", type=_positive_int, help="default: FEATUREMAPS_MAX_IMAGE_PIXELS"
    )
    parser.set_defaults(func=run)
    return parser


def run(args: argparse.Namespace) -> int:
    from tqdm import tqdm

    from shared.errors import FeatureMapsError
    from shared.options import JobOptions
    from shared.settings import Settings
    from worker.compute.model import load_model
    from worker.compute.pipeline import tiled_layers

    settings = Settings()
    max_pixels = args.max_pixels or settings.max_image_pixels
    try:
        options = JobOptions(
            mode=args.mode,
            reduction=args.reduction,
            normalize=args.normalize,
            format=args.format,
            colormap=args.colormap,
            renderer=args.renderer,
            precision=args.precision,
            model=args.model,
            layers=args.layers,
            per_layer=args.per_layer,
            arrays=args.arrays,
        )
        loaded = load_model(
            args.weights or settings.weights,
            device=args.device or settings.device,
            seed=settings.weights_seed,
            architecture=args.model,
        )
        tiled_layers(loaded, options)  # a layers pattern that matches nothing, said once
    except FeatureMapsError as exc:
        print(f"featuremaps: {exc.code}: {exc.message}", file=sys.stderr)
        return 2

    images: list[Path] = args.images
    output_dirs = _output_dirs(images, args.output)
    failed = 0
    with tqdm(
        total=len(images),
        unit="image",
        disable=len(images) < PROGRESS_MIN_IMAGES,
        file=sys.stderr,
    ) as progress:
        for start in range(0, len(images), args.batch_size):
            positions = range(start, min(start + args.batch_size, len(images)))
            failed += _run_batch(
                loaded, images, positions, output_dirs, options, max_pixels, progress
            )

    done = len(images) - failed
    print(f"{done} of {len(images)} image(s) written to {args.output}", file=sys.stderr)
    return 1 if failed else 0


def _run_batch(loaded, images, positions, output_dirs, options, max_pixels, progress) -> int:
    """Read, process and write one batch of the given images; returns how many failed."""
    from shared.errors import FeatureMapsError
    from worker.compute.pipeline import process_images

    failed = 0
    readable, payloads = [], []
    for position in positions:
        try:
            payloads.append(images[position].read_bytes())
            readable.append(position)
        except OSError as exc:
            failed += 1
            progress.write(f"{images[position]}: unreadable: {exc}", file=sys.stderr)
            progress.update()
    results = process_images(loaded, payloads, options, max_pixels=max_pixels)
    for position, result in zip(readable, results, strict=True):
        if isinstance(result, FeatureMapsError):
            failed += 1
            progress.write(f"{images[position]}: {result.code}: {result.message}", file=sys.stderr)
        else:
            _write_result(output_dirs[position], result)
        progress.update()
    return failed


def _write_result(directory: Path, result: ImageResult) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / f"feature_maps.{result.figure_ext}").write_bytes(result.figure)
    (directory / "manifest.json").write_text(json.dumps(result.manifest, indent=2) + "\n")
    if result.arrays is not None:
        (directory / "maps.npz").write_bytes(result.arrays)
    if result.layer_pngs:
        layers = directory / "layers"
        layers.mkdir(exist_ok=True)
        for index, name, png in result.layer_pngs:
            (layers / f"{index:02d}_{name}.png").write_bytes(png)


def _output_dirs(images: list[Path], output: Path) -> list[Path]:
    """One directory per image, named by its stem; repeated stems get -2, -3, ..."""
    used: set[str] = set()
    return [output / unique_name(path.stem, "", used) for path in images]


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, not {value}")
    return value
