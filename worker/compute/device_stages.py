"""The data path's stages as tensor operations on the model's device (``precision=fast`` on
CUDA): JPEGs decoded in one batched call (nvJPEG on CUDA, libjpeg-turbo on the CPU, through
``torchvision.io.decode_jpeg``), resized to 224×224 on the device, and JPEG figures drawn
there (:func:`worker.compute.render_tensor.draw_grids`) and encoded there
(``torchvision.io.encode_jpeg``), so only encoded bytes come back to the host.

The same functions run on the CPU, which is how the unit tests cover them here; the
pipeline only chooses them on CUDA (:func:`worker.compute.precision.resolve`), because on the CPU
Pillow's draft decode and renderer are faster. What differs from ``exact`` and by how much:
the resize is torch's antialiased bilinear, not Pillow's (a few levels on the 224×224 input),
and the figure's JPEG comes from another encoder (same quality, other bytes). docs/benchmarks.md
has the measured tolerance.

Inputs these decoders should not take — other formats, CMYK or grayscale JPEGs, JPEGs that
do not end with their end-of-image marker (truncated ones included), anything whose header
does not read — go through :func:`shared.imaging.decode` as in the host path, so they decode,
or fail with their proper error, exactly as there.

torchvision 0.29 deprecates its image decode/encode in favour of TorchCodec; the warning is
silenced here, where the functions are used on purpose, and nowhere else.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
import torchvision.io
from torch import Tensor

from shared.errors import FeatureMapsError
from shared.imaging import decode, jpeg_header
from worker.compute.features import INPUT_SIDE
from worker.compute.render import INPUT_PREVIEW_SIDE, render_input_preview
from worker.compute.render_tensor import draw_grids, to_image

# The host renderer's JPEG quality (worker/compute/render.py), so both figures are alike.
JPEG_QUALITY = 90


@dataclass
class DeviceImage:
    # the manifest's ``input`` entry, as DecodedImage.describe gives it
    input: dict
    # uint8 [3, 224, 224] on the device
    resized: Tensor
    # the upright input as a small JPEG (single jobs only), else b""
    preview: bytes


def decode_resize(
    images: list[bytes], device: torch.device, *, max_pixels: int, previews: bool = False
) -> list[DeviceImage | FeatureMapsError]:
    """Each input decoded, turned upright and resized to 224×224 on ``device``: the plain
    RGB JPEGs in one batched decode, the rest through Pillow."""
    headers = [jpeg_header(data, max_pixels=max_pixels) for data in images]
    batched = [i for i, h in enumerate(headers) if h is not None and h.mode == "RGB"]
    pictures = _decode_jpegs(images, batched, device)
    out: list[DeviceImage | FeatureMapsError] = []
    for position, data in enumerate(images):
        if position in pictures:
            described = headers[position].describe()
            picture = pictures[position]
        else:
            try:
                source = decode(data, max_pixels=max_pixels)
            except FeatureMapsError as exc:
                out.append(exc)
                continue
            described = source.describe()
            picture = torch.from_numpy(np.array(source.image)).permute(2, 0, 1).to(device)
        preview = _preview(picture) if previews else b""
        out.append(DeviceImage(described, _resize(picture, (INPUT_SIDE, INPUT_SIDE)), preview))
    return out


def draw_and_encode(
    layers: list[tuple[str, tuple[int, int, int], Tensor]], colormap: str, caption: str
) -> list[bytes]:
    """Each image's grid drawn and JPEG-encoded on the maps' device; the bytes on the host."""
    canvases = draw_grids(layers, colormap, caption)
    chw = [canvas.permute(2, 0, 1).contiguous() for canvas in canvases]
    with _deprecation_silenced():
        encoded = torchvision.io.encode_jpeg(chw, quality=JPEG_QUALITY)
    return [data.cpu().numpy().tobytes() for data in encoded]


def _decode_jpegs(
    images: list[bytes], positions: list[int], device: torch.device
) -> dict[int, Tensor]:
    """The JPEGs at ``positions``, upright RGB [3, H, W] on ``device``, in one batched call;
    if that fails, one by one, leaving out those that fail (Pillow then reports them)."""
    data = {i: torch.frombuffer(bytearray(images[i]), dtype=torch.uint8) for i in positions}
    if not data:
        return {}
    try:
        return dict(zip(data, _torchvision_decode(list(data.values()), device), strict=True))
    except RuntimeError:
        pictures = {}
        for position, encoded in data.items():
            try:
                pictures[position] = _torchvision_decode([encoded], device)[0]
            except RuntimeError:
                continue
        return pictures


def _torchvision_decode(data: list[Tensor], device: torch.device) -> list[Tensor]:
    with _deprecation_silenced():
        return torchvision.io.decode_jpeg(
            data,
            mode=torchvision.io.ImageReadMode.RGB,
            device=device,
            apply_exif_orientation=True,
        )


def _resize(picture: Tensor, size: tuple[int, int]) -> Tensor:
    """uint8 [3, H, W] -> uint8 [3, height, width]: antialiased bilinear, rounded."""
    resized = F.interpolate(picture[None].float(), size=size, mode="bilinear", antialias=True)
    return resized[0].round_().clamp_(0, 255).to(torch.uint8)


def _preview(picture: Tensor) -> bytes:
    # Scaled down on the device first, so a 12 MP picture never crosses to the host.
    height, width = picture.shape[1:]
    scale = min(1.0, INPUT_PREVIEW_SIDE / max(height, width))
    size = (max(1, round(height * scale)), max(1, round(width * scale)))
    return render_input_preview(to_image(_resize(picture, size).permute(1, 2, 0)))


@contextlib.contextmanager
def _deprecation_silenced() -> Iterator[None]:
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*deprecated since torchvision.*")
        yield
