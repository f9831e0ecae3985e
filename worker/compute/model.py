"""Loading the ResNet-18 a worker keeps resident, and saying exactly which weights it has.

``FEATUREMAPS_WEIGHTS`` selects the weights: ``imagenet`` (torchvision's IMAGENET1K_V1 through
its normal cache under ``TORCH_HOME``), ``random`` (seeded, deterministic) or a path to a
``state_dict`` file. Nothing falls back silently: when the asked-for weights cannot be had,
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
from torchvision.models import ResNet18_Weights, resnet18

from shared.errors import DeviceUnavailable, WeightsUnavailable

IMAGENET_WEIGHTS = ResNet18_Weights.IMAGENET1K_V1

_load_count = 0


@dataclass
class LoadedModel:
    model: nn.Module
    device: torch.device
    # e.g. {"name": "imagenet", "id": "IMAGENET1K_V1", "sha256": ...}; goes into manifests.
    weights: dict
    # ImageNet class names for the imagenet weights; None when the classes mean nothing.
    categories: list[str] | None
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


def load_model(weights: str, *, device: str = "auto", seed: int = 0) -> LoadedModel:
    """Build ResNet-18 with the selected weights, in eval mode, on the resolved device."""
    global _load_count
    target = resolve_device(device)
    categories = None
    if weights == "imagenet":
        state_dict, identity = _imagenet_state_dict()
        categories = list(IMAGENET_WEIGHTS.meta["categories"])
    elif weights == "random":
        state_dict, identity = None, {"name": "random", "seed": seed}
    else:
        state_dict, identity = _file_state_dict(Path(weights))

    # A private RNG stream: seeding must not disturb the caller's global torch RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = resnet18(weights=None)
    if state_dict is not None:
        try:
            model.load_state_dict(state_dict)
        except RuntimeError as exc:
            raise WeightsUnavailable(
                f"the {identity['name']} weights do not fit torchvision's resnet18: {exc}"
            ) from exc
    model.eval().to(target)
    _load_count += 1
    return LoadedModel(model=model, device=target, weights=identity, categories=categories)


def imagenet_checkpoint_path() -> Path:
    """Where torchvision's cache keeps the IMAGENET1K_V1 checkpoint (follows TORCH_HOME)."""
    file_name = os.path.basename(urlparse(IMAGENET_WEIGHTS.url).path)
    return Path(torch.hub.get_dir()) / "checkpoints" / file_name


def _imagenet_state_dict() -> tuple[Mapping[str, torch.Tensor], dict]:
    path = imagenet_checkpoint_path()
    try:
        # Loads the cached file, or downloads it into the cache (hash-checked) when missing.
        state_dict = IMAGENET_WEIGHTS.get_state_dict(
            progress=False, check_hash=True, weights_only=True
        )
    except Exception as exc:
        if path.is_file():
            raise WeightsUnavailable(
                f"the cached ImageNet checkpoint {path} cannot be read ({exc}); delete it and "
                f"place a good copy of {IMAGENET_WEIGHTS.url} there, or set "
                "FEATUREMAPS_WEIGHTS=random"
            ) from exc
        raise WeightsUnavailable(
            f"ResNet-18 ImageNet weights are not in torchvision's cache and could not be "
            f"downloaded ({type(exc).__name__}: {exc}). Download {IMAGENET_WEIGHTS.url} and "
            f"place it at {path} (file name {path.name}, under TORCH_HOME="
            f"{Path(torch.hub.get_dir()).parent}), or set FEATUREMAPS_WEIGHTS=random for "
            "offline work"
        ) from exc
    identity = {
        "name": "imagenet",
        "id": IMAGENET_WEIGHTS.name,
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
