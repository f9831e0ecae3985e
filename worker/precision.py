"""How exactly a job is computed: the ``precision`` option, resolved for the worker's device.

- ``exact``: the article's computation on any device — Pillow's full JPEG decode and bilinear
  resize, float32 throughout, TF32 off for cuDNN convolutions and matmuls. On the CPU the maps
  are bit for bit those of the article's code.
- ``fast``: JPEGs are decoded with libjpeg's DCT scaling (Pillow's draft mode) to the smallest
  1/2, 1/4 or 1/8 scale that keeps both sides at least ``DRAFT_SIDE`` pixels, then resized as
  in ``exact``; on CUDA, TF32 is allowed as well. Other formats decode as in ``exact``.
  Measured on camera-size photos (docs/benchmarks.md "Precision"): the 224×224 input differs
  from the exact one by at most a few levels, and each map by well under 2 % of its range
  (correlation above 0.9999), for 3-4× less decode time on 12 MP photos.
- ``auto`` (the default): ``exact`` on the CPU, ``fast`` on CUDA.

Every manifest records the resolved precision, the decoder and whether TF32 was allowed
(:meth:`Precision.describe`), so no output is approximate without saying so.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass

import torch

# Twice the model's 224-pixel input: the draft keeps at least 2 source pixels per input pixel
# on each axis, so the bilinear resize that follows still averages over several samples.
DRAFT_SIDE = 448


@dataclass(frozen=True)
class Precision:
    mode: str  # "exact" or "fast"
    # JPEGs are decoded at reduced scale, to at least draft_side on each side; None: full size
    draft_side: int | None
    tf32: bool

    @property
    def decoder(self) -> str:
        return "pillow-draft" if self.draft_side else "pillow"

    def describe(self) -> dict:
        """The manifest's ``precision`` entry."""
        return {"mode": self.mode, "decoder": self.decoder, "tf32": self.tf32}


def resolve(option: str, device: torch.device) -> Precision:
    """The computation the ``precision`` option asks for on ``device``."""
    mode = option if option != "auto" else ("fast" if device.type == "cuda" else "exact")
    if mode == "exact":
        return Precision("exact", draft_side=None, tf32=False)
    return Precision("fast", draft_side=DRAFT_SIDE, tf32=device.type == "cuda")


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
