"""How exactly a job is computed: the ``precision`` option, resolved for the worker's device.

- ``exact``: the article's computation on any device — Pillow's full JPEG decode and bilinear
  resize, float32 throughout, TF32 off for cuDNN convolutions and matmuls. On the CPU the maps
  are bit for bit those of the article's code.
- ``fast`` on the CPU: JPEGs are decoded with libjpeg's DCT scaling (Pillow's draft mode) to
  the smallest 1/2, 1/4 or 1/8 scale that keeps both sides at least ``DRAFT_SIDE`` pixels,
  then resized as in ``exact``. Other formats decode as in ``exact``. The model runs on a
  channels-last copy of its weights, in bfloat16 where the CPU computes bfloat16 natively
  (AVX-512 BF16 or AMX, :func:`native_bf16`; emulated bfloat16 is slower than float32, so
  other CPUs stay float32, channels-last). The channel reductions and scores are computed
  in float32 from the bfloat16 activations. The maps stay within the tolerance
  tests/unit/test_precision.py holds them to; docs/benchmarks.md "Precision" has what was
  measured.
- ``fast`` on CUDA: TF32 allowed, and decode, resize and the JPEG figure run on the GPU
  (``worker/compute/device_stages.py``: nvJPEG, torch's antialiased resize, the torch renderer and
  the GPU JPEG encoder).
- ``auto`` (the default): ``exact`` on the CPU, ``fast`` on CUDA.

Every manifest records the resolved precision, the decoder, whether TF32 was allowed, whether
the stages ran on the device, and the model's compute dtype and memory format
(:meth:`Precision.describe`), so no output is approximate without saying so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import nn

if TYPE_CHECKING:
    from worker.compute.model import LoadedModel

# Twice the model's 224-pixel input: the draft keeps at least 2 source pixels per input pixel
# on each axis, so the bilinear resize that follows still averages over several samples.
DRAFT_SIDE = 448


@dataclass(frozen=True)
class Precision:
    mode: str  # "exact" or "fast"
    # JPEGs are decoded at reduced scale, to at least draft_side on each side; None: full size
    draft_side: int | None
    tf32: bool
    # decode, resize, and JPEG figures run on the model's device (worker/compute/device_stages.py)
    on_device: bool = False
    # the model's weights and activations: "float32" or "bfloat16"
    dtype: str = "float32"
    # "contiguous" (NCHW, as the article) or "channels_last" (NHWC weights and inputs)
    memory_format: str = "contiguous"

    @property
    def torch_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.dtype == "bfloat16" else torch.float32

    @property
    def channels_last(self) -> bool:
        return self.memory_format == "channels_last"

    @property
    def decoder(self) -> str:
        if self.on_device:
            return "torchvision"
        return "pillow-draft" if self.draft_side else "pillow"

    def describe(self) -> dict:
        """The manifest's ``precision`` entry."""
        return {
            "mode": self.mode,
            "decoder": self.decoder,
            "tf32": self.tf32,
            "on_device": self.on_device,
            "dtype": self.dtype,
            "memory_format": self.memory_format,
        }


def resolve(option: str, device: torch.device, *, on_device: bool | None = None) -> Precision:
    """The computation the ``precision`` option asks for on ``device``. ``fast`` runs its
    stages on the device on CUDA (``on_device`` forces the choice, as the tests do on the
    CPU, where Pillow's draft decode is the faster)."""
    mode = option if option != "auto" else ("fast" if device.type == "cuda" else "exact")
    if mode == "exact":
        return Precision("exact", draft_side=None, tf32=False)
    cuda = device.type == "cuda"
    if cuda if on_device is None else on_device:
        return Precision("fast", draft_side=None, tf32=cuda, on_device=True)
    if cuda:
        return Precision("fast", draft_side=DRAFT_SIDE, tf32=True)
    dtype = "bfloat16" if native_bf16() else "float32"
    return Precision(
        "fast", draft_side=DRAFT_SIDE, tf32=False, dtype=dtype, memory_format="channels_last"
    )


def native_bf16() -> bool:
    """Whether this CPU computes bfloat16 in hardware: AVX-512 BF16 or AMX on x86 (as
    detected by torch's cpuinfo). Elsewhere oneDNN emulates bfloat16 convolutions, slower
    than float32, so ``fast`` keeps float32 there."""
    capabilities = torch.cpu.get_capabilities()
    return bool(capabilities.get("avx512_bf16") or capabilities.get("amx_bf16"))


def model_and_input(
    loaded: LoadedModel, batch: torch.Tensor, precision: Precision
) -> tuple[nn.Module, torch.Tensor]:
    """The copy of the model ``precision`` computes with and ``batch`` (float32 NCHW) in its
    dtype and memory format; for ``exact`` the resident model and ``batch`` unchanged."""
    model = loaded.variant(precision.torch_dtype, precision.channels_last)
    if precision.channels_last:
        batch = batch.contiguous(memory_format=torch.channels_last)
    return model, batch.to(precision.torch_dtype)


@contextlib.contextmanager
def tf32(allowed: bool) -> Iterator[None]:
    """Allow or forbid TF32 in cuDNN convolutions and CUDA matmuls for the block, restoring
    the process's settings afterwards (PyTorch allows it for convolutions by default). The
    flags only affect CUDA; on the CPU the block runs in float32 either way."""
    saved = (torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32)
    torch.backends.cudnn.allow_tf32 = allowed
    torch.backends.cuda.matmul.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = saved


def compare_maps(reference: dict[str, np.ndarray], approximate: dict[str, np.ndarray]) -> dict:
    """How far ``approximate``'s maps are from ``reference``'s (both layer name -> H×W): the
    largest |difference| over each reference map's range (max − min), and the lowest
    correlation, over all layers. The bench reports these; the tests bound them."""
    worst, lowest = 0.0, 1.0
    for name, expected in reference.items():
        got = approximate[name]
        spread = float(expected.max() - expected.min())
        worst = max(worst, float(np.abs(got - expected).max()) / (spread or 1.0))
        if spread and float(got.max() - got.min()):
            correlation = float(np.corrcoef(got.ravel(), expected.ravel())[0, 1])
        else:  # a constant map has no correlation: equal or not is all there is to say
            correlation = 1.0 if np.array_equal(got, expected) else 0.0
        lowest = min(lowest, correlation)
    return {"max_abs_difference_over_range": worst, "min_correlation": lowest}
