"""Loading the networks a worker runs, and saying exactly which weights each has.

Any architecture of ``shared.options.ARCHITECTURES`` (torchvision's classification models);
ResNet-18 is the one every worker keeps resident. ``FEATUREMAPS_WEIGHTS`` selects the
weights: ``imagenet`` (torchvision's IMAGENET1K_V1 of the architecture through its normal
cache under ``TORCH_HOME``), ``random`` (seeded, deterministic) or, for ResNet-18 only, a path
to a ``state_dict`` file. Uploaded weights (POST /models) load with :func:`load_uploaded`.
Nothing falls back silently: when the asked-for weights cannot be had,
:class:`WeightsUnavailable` says how to fix it, and :attr:`LoadedModel.weights` travels into
every manifest and figure.
"""

from __future__ import annotations

import copy
import hashlib
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlparse

import torch
from torch import nn
from torchvision.models import ResNet18_Weights, get_model, get_model_weights

from shared.errors import DeviceUnavailable, WeightsUnavailable
from shared.options import DEFAULT_MODEL

IMAGENET_WEIGHTS = ResNet18_Weights.IMAGENET1K_V1
# How figures' captions name each architecture.
DISPLAY_NAMES = {
    "resnet18": "ResNet-18",
    "resnet34": "ResNet-34",
    "resnet50": "ResNet-50",
    "vgg16": "VGG-16",
    "vgg16_bn": "VGG-16-BN",
    "mobilenet_v3_large": "MobileNetV3-Large",
    "efficientnet_b0": "EfficientNet-B0",
    "densenet121": "DenseNet-121",
    "convnext_tiny": "ConvNeXt-Tiny",
    "regnet_y_400mf": "RegNetY-400MF",
}

_load_count = 0


@dataclass
class LoadedModel:
    model: nn.Module
    device: torch.device
    # e.g. {"name": "imagenet", "id": "IMAGENET1K_V1", "sha256": ...}; goes into manifests.
    weights: dict
    # ImageNet class names for the imagenet weights; None when the classes mean nothing.
    categories: list[str] | None
    # the torchvision architecture (shared.options.ARCHITECTURES)
    architecture: str = DEFAULT_MODEL
    # copies of ``model`` in another dtype / memory format, made on first use
    _variants: dict[tuple[torch.dtype, bool], nn.Module] = field(
        default_factory=dict, repr=False, compare=False
    )

    def variant(self, dtype: torch.dtype, channels_last: bool) -> nn.Module:
        """The model with its weights in ``dtype`` and, with ``channels_last``, in NHWC
        layout (``precision=fast`` on the CPU): a copy made once and kept beside ``model``,
        which stays float32 NCHW for ``exact``."""
        if dtype == torch.float32 and not channels_last:
            return self.model
        key = (dtype, channels_last)
        if key not in self._variants:
            memory_format = torch.channels_last if channels_last else torch.contiguous_format
            self._variants[key] = (
                copy.deepcopy(self.model).to(dtype=dtype, memory_format=memory_format).eval()
            )
        return self._variants[key]


def load_count() -> int:
    """How many models this process has loaded (a worker should show exactly one)."""
    return _load_count


def resolve_device(device: str) -> torch.device:
    """``auto`` is the first CUDA device when there is one, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        resolved = torch.device(device)
    except RuntimeError as exc:
        raise DeviceUnavailable(
            f"device {device!r} is not one of auto, cpu, cuda, cuda:N ({exc})"
        ) from exc
    if resolved.type == "cpu":
        return resolved
    if resolved.type != "cuda":
        raise DeviceUnavailable(f"device {device!r} is not one of auto, cpu, cuda, cuda:N")
    if not torch.cuda.is_available():
        raise DeviceUnavailable(f"device {device!r} was asked for but CUDA is not available")
    if resolved.index is not None and resolved.index >= torch.cuda.device_count():
        raise DeviceUnavailable(
            f"device {device!r} does not exist: {torch.cuda.device_count()} CUDA device(s) "
            "visible (CUDA_VISIBLE_DEVICES renumbers them from 0)"
        )
    return resolved


def load_model(
    weights: str, *, device: str = "auto", seed: int = 0, architecture: str = DEFAULT_MODEL
) -> LoadedModel:
    """Build ``architecture`` with the selected weights, in eval mode, on the resolved
    device."""
    categories = None
    if weights == "imagenet":
        state_dict, identity = _imagenet_state_dict(architecture)
        categories = list(imagenet_weights(architecture).meta["categories"])
    elif weights == "random":
        state_dict, identity = None, {"name": "random", "seed": seed}
    else:
        state_dict, identity = _file_state_dict(Path(weights))
    return _built(architecture, state_dict, identity, categories, device=device, seed=seed)


def load_uploaded(
    architecture: str, path: Path, identity: dict, *, device: str = "auto"
) -> LoadedModel:
    """``architecture`` with the weights of an uploaded file (safetensors, or a state_dict
    read with ``torch.load(weights_only=True)``: no code in it can run), loaded strictly."""
    return _built(architecture, read_weights_file(path), identity, None, device=device, seed=0)


def read_weights_file(path: Path) -> Mapping[str, torch.Tensor]:
    """The tensors of a safetensors file or of a ``torch.save`` state_dict, never unpickling
    anything but tensors and containers."""
    with path.open("rb") as stream:
        head = stream.read(8)
    try:
        if head[:2] == b"PK" or head[:1] == b"\x80":
            state_dict = torch.load(path, map_location="cpu", weights_only=True)
        else:
            from safetensors.torch import load_file

            state_dict = load_file(path, device="cpu")
    except Exception as exc:
        raise WeightsUnavailable(f"weights file {path.name} cannot be read: {exc}") from exc
    if not isinstance(state_dict, Mapping):
        raise WeightsUnavailable(
            f"weights file {path.name} holds a {type(state_dict).__name__}, not a state_dict"
        )
    return state_dict


def _built(
    architecture: str,
    state_dict: Mapping[str, torch.Tensor] | None,
    identity: dict,
    categories: list[str] | None,
    *,
    device: str,
    seed: int,
) -> LoadedModel:
    global _load_count
    target = resolve_device(device)
    # A private RNG stream: seeding must not disturb the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = get_model(architecture, weights=None)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise WeightsUnavailable(
                f"the {identity['name']} weights do not fit torchvision's {architecture}: {exc}"
            ) from exc
    model.eval().to(target)
    _load_count += 1
    return LoadedModel(
        model=model,
        device=target,
        weights=identity,
        categories=categories,
        architecture=architecture,
    )


def check_imagenet_checkpoint(architecture: str) -> dict:
    """Read ``architecture``'s ImageNet checkpoint from torchvision's cache (the launcher does
    this for every enabled architecture before any worker starts, so a missing one is an
    error at start, never a job's failure); :class:`WeightsUnavailable` says how to fix it.
    Returns the weights' identity."""
    _state_dict, identity = _imagenet_state_dict(architecture)
    return identity


def imagenet_weights(architecture: str = DEFAULT_MODEL):
    """torchvision's IMAGENET1K_V1 weights enum of ``architecture``."""
    return get_model_weights(architecture)["IMAGENET1K_V1"]


def imagenet_checkpoint_path(architecture: str = DEFAULT_MODEL) -> Path:
    """Where torchvision's cache keeps the IMAGENET1K_V1 checkpoint (follows TORCH_HOME)."""
    file_name = os.path.basename(urlparse(imagenet_weights(architecture).url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _imagenet_state_dict(architecture: str) -> tuple[Mapping[str, torch.Tensor], dict]:
    """The cached checkpoint. Workers never download: a missing one is a clear error at
    start (the local stack fetches them first, the worker image bakes them in)."""
    enum = imagenet_weights(architecture)
    path = imagenet_checkpoint_path(architecture)
    if not path.is_file():
        raise WeightsUnavailable(
            f"{DISPLAY_NAMES[architecture]} ImageNet weights are not in torchvision's cache: "
            f"no file at {path} (file name {path.name}, under TORCH_HOME="
            f"{Path(torch.hub.get_dir()).parent}). Workers never download: fetch {enum.url} "
            "there (`make up` does on its first run; the worker image takes "
            "--build-arg FEATUREMAPS_MODELS=...), or set FEATUREMAPS_WEIGHTS=random for "
            "offline work"
        )
    try:
        state_dict = enum.get_state_dict(progress=False, check_hash=True, weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(
            f"the cached ImageNet checkpoint {path} cannot be read ({exc}); delete it and "
            f"place a good copy of {enum.url} there, or set FEATUREMAPS_WEIGHTS=random"
        ) from exc
    identity = {
        "name": "imagenet",
        "id": enum.name,
        "file": path.name,
        "sha256": _sha256(path),
    }
    return state_dict, identity


def _file_state_dict(path: Path) -> tuple[Mapping[str, torch.Tensor], dict]:
    hint = "FEATUREMAPS_WEIGHTS must be imagenet, random or the path of a state_dict file"
    if not path.is_file():
        raise WeightsUnavailable(f"weights file {path} does not exist; {hint}")
    try:
        state_dict = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:
        raise WeightsUnavailable(
            f"weights file {path} is not a loadable state_dict ({exc}); {hint}"
        ) from exc
    if not isinstance(state_dict, Mapping):
        raise WeightsUnavailable(
            f"weights file {path} holds a {type(state_dict).__name__}, not a state_dict; {hint}"
        )
    identity = {"name": "state_dict", "path": str(path.resolve()), "sha256": _sha256(path)}
    return state_dict, identity


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as stream:
        for block in iter(lambda: stream.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
