"""From images to per-layer feature maps: the article's conv chain, true forward activations,
and the channel reductions that turn each layer's output into one 2-D map.

All functions take a batch: several images go through the model as one tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence

import numpy as np
import torch
from PIL import Image
from torch import Tensor, nn
from torchvision.ops import SqueezeExcitation

from shared.errors import InvalidOption
from shared.options import CHAIN_ARCHITECTURES, CHAIN_NOT_DEFINED

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

INPUT_SIDE = 224


def chain_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """The article's walk: top-level Conv2d children, then the Conv2d children of each block
    of each top-level Sequential. Downsample convs sit one level deeper and are not included,
    which for ResNet-18 gives 17 layers, ``conv1`` … ``layer4.1.conv2``."""
    convs: list[tuple[str, nn.Conv2d]] = []
    # Exact type checks, as in the article: subclasses of Sequential are not walked into.
    for name, child in model.named_children():
        if type(child) is nn.Conv2d:
            convs.append((name, child))
        elif type(child) is nn.Sequential:
            for block_name, block in child.named_children():
                for conv_name, conv in block.named_children():
                    if type(conv) is nn.Conv2d:
                        convs.append((f"{name}.{block_name}.{conv_name}", conv))
    return convs


def conv_layers(model: nn.Module) -> list[tuple[str, nn.Conv2d]]:
    """Every Conv2d module, by qualified name, in module order (``mode=forward``'s layers)."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, nn.Conv2d)]


def mode_layers(model: nn.Module, architecture: str, mode: str) -> list[str]:
    """The names of every layer ``mode`` yields for ``architecture``; the chain is refused
    where it is not defined (outside the ResNet family)."""
    if mode == "chain":
        if architecture not in CHAIN_ARCHITECTURES:
            raise InvalidOption(CHAIN_NOT_DEFINED)
        return [name for name, _ in chain_layers(model)]
    return [name for name, _ in conv_layers(model)]


def gating_layers(model: nn.Module) -> set[str]:
    """The convs of squeeze-and-excitation blocks (EfficientNet, MobileNetV3, RegNetY): they
    compute per-channel weights from a 1×1 pooled input, so their maps are 1×1 — nothing to
    see in a tile. The default choice of tiles leaves them out."""
    return {
        f"{block_name}.{name}"
        for block_name, block in model.named_modules()
        if isinstance(block, SqueezeExcitation)
        for name, module in block.named_modules()
        if isinstance(module, nn.Conv2d)
    }


def preprocess(images: Sequence[Image.Image], normalize: str) -> Tensor:
    """RGB images of any size -> one float32 batch [N, 3, 224, 224]."""
    return to_batch([resize_input(image) for image in images], normalize)


def resize_input(image: Image.Image) -> Image.Image:
    """The article's ``Resize((224, 224))`` on a PIL image: Pillow's bilinear resize, which
    always antialiases. Done as soon as an image is decoded, so a chunk of camera photos
    does not hold every full-size decode at once."""
    return image.resize((INPUT_SIDE, INPUT_SIDE), Image.Resampling.BILINEAR)


def to_batch(images: Sequence[Image.Image], normalize: str) -> Tensor:
    """224×224 RGB images -> one float32 batch [N, 3, 224, 224].

    With :func:`resize_input`, bit for bit what the article's ``Resize((224, 224))``,
    ``ToTensor()``, ``Normalize(0, 1)`` give image by image (the unit tests compare them),
    but ``uint8 / 255`` is one tensor operation for the whole batch instead of per-image
    copies. The article's ``Normalize(mean=0., std=1.)`` is ``(x - 0) / 1``, which is ``x``
    exactly in floating point, so it costs nothing here.
    """
    pixels = np.stack([np.asarray(image) for image in images])
    if pixels.shape[1:] != (INPUT_SIDE, INPUT_SIDE, 3):
        raise ValueError(f"expected 224×224 RGB images, got an array of {pixels.shape}")
    return to_model_input(torch.from_numpy(pixels).permute(0, 3, 1, 2), normalize)


def to_model_input(pixels: Tensor, normalize: str) -> Tensor:
    """uint8 [N, 3, 224, 224] on any device -> the model's float32 input on that device:
    ``/ 255`` (ToTensor), then ImageNet's mean/std with ``normalize="imagenet"``."""
    if normalize not in ("none", "imagenet"):
        raise ValueError(f"unknown normalize {normalize!r}")
    # Contiguous NCHW, as ToTensor gives: the convolutions' results depend on the layout.
    batch = pixels.contiguous().float().div_(255)
    if normalize == "imagenet":
        mean = torch.tensor(IMAGENET_MEAN, device=batch.device).view(1, 3, 1, 1)
        std = torch.tensor(IMAGENET_STD, device=batch.device).view(1, 3, 1, 1)
        batch.sub_(mean).div_(std)
    return batch


def conv_chain(
    model: nn.Module,
    batch: Tensor,
    *,
    keep: Callable[[Tensor], Tensor] | None = None,
    names: Collection[str] | None = None,
) -> list[tuple[str, Tensor]]:
    """Pass ``batch`` through the chain convs one after another (conv only: no BN, ReLU,
    pooling or residual), keeping every output (those in ``names`` when given). Outputs stay
    on the model's device.

    ``keep`` maps each output before it is kept (e.g. the channel reduction), so the full
    activations need not all stay alive at once.
    """
    outputs: list[tuple[str, Tensor]] = []
    with torch.inference_mode():
        x = batch.to(_device_of(model))
        for name, conv in chain_layers(model):
            x = conv(x)
            if names is None or name in names:
                outputs.append((name, keep(x) if keep else x))
    return outputs


def forward_activations(
    model: nn.Module,
    batch: Tensor,
    *,
    keep: Callable[[Tensor], Tensor] | None = None,
    names: Collection[str] | None = None,
) -> tuple[list[tuple[str, Tensor]], Tensor]:
    """One real forward pass in eval mode; returns every Conv2d's output (20 for ResNet-18,
    downsample included, in module order; those in ``names`` when given), each mapped by
    ``keep`` inside its hook (else copied there: an in-place op after the conv, as VGG's
    ``ReLU(inplace=True)``, would change a kept reference), and the logits.
    """
    convs = [(name, m) for name, m in conv_layers(model) if names is None or name in names]
    captured: dict[str, Tensor] = {}
    handles = []
    was_training = model.training
    try:
        for name, conv in convs:
            handles.append(conv.register_forward_hook(_capture(captured, name, keep)))
        model.eval()
        with torch.inference_mode():
            logits = model(batch.to(_device_of(model)))
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    return [(name, captured[name]) for name, _ in convs], logits


def reduce_channels(t: Tensor, reduction: str) -> Tensor:
    """[N, C, H, W] -> float32 [N, H, W].

    ``mean`` is computed as the article does, ``sum over channels / C``; ``std`` is the
    population standard deviation (numpy's default); ``l2`` is the Euclidean norm over
    channels.
    """
    if t.ndim != 4:
        raise ValueError(f"expected a [N, C, H, W] tensor, got shape {tuple(t.shape)}")
    if t.dtype != torch.float32 and reduction in ("mean", "max") and _channels_last(t):
        return _reduce_channels_last(t, reduction)
    with torch.inference_mode():
        t = t.float()
        if reduction == "mean":
            reduced = torch.sum(t, 1) / t.shape[1]
        elif reduction == "max":
            reduced = torch.amax(t, 1)
        elif reduction == "std":
            reduced = torch.std(t, 1, correction=0)
        elif reduction == "l2":
            reduced = torch.linalg.vector_norm(t, dim=1)
        else:
            raise ValueError(f"unknown reduction {reduction!r}")
    return reduced


def _channels_last(t: Tensor) -> bool:
    return t.shape[1] > 1 and t.is_contiguous(memory_format=torch.channels_last)


def _reduce_channels_last(t: Tensor, reduction: str) -> Tensor:
    """``precision=fast``'s bfloat16 channels-last activations: the channels are each pixel's
    contiguous run, so the sum runs along it, accumulated in float32 without a float32 copy
    of the activation (3× faster here than ``t.float()`` then the NCHW reduction, with the
    same result). The article's float32 NCHW path above stays as it is."""
    with torch.inference_mode():
        pixels = t.permute(0, 2, 3, 1)  # [N, H, W, C], contiguous
        if reduction == "mean":
            return torch.sum(pixels, -1, dtype=torch.float32) / t.shape[1]
        return torch.amax(pixels, -1).float()


def channel_scores(t: Tensor) -> Tensor:
    """[N, C, H, W] -> float32 [N, 2, C]: each channel's mean and maximum over (h, w), the
    dataset examples' two scores (docs/design.md "Dataset examples")."""
    with torch.inference_mode():
        t = t.float()
        return torch.stack((t.mean(dim=(2, 3)), t.amax(dim=(2, 3))), dim=1)


def _capture(store: dict[str, Tensor], name: str, keep: Callable[[Tensor], Tensor] | None):
    def hook(_module: nn.Module, _inputs: tuple, output: Tensor) -> None:
        store[name] = keep(output) if keep else output.clone()

    return hook


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device
