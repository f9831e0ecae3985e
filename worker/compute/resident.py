"""The models a worker process keeps loaded: ResNet-18 always, and a bounded set of others
(architectures of ``FEATUREMAPS_MODELS``, uploaded models) loaded on first use and evicted
least recently used first (docs/design.md "Models"). Loading is the caller's ``load``
function (an upload's weights come from storage, which this package does not touch)."""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Callable

import torch

from worker.compute.model import LoadedModel


class ResidentModels:
    """``get(key)``: the model named ``key`` (an architecture or an upload id), loaded with
    ``load(key)`` when it is not resident. At most ``capacity`` models stay besides the
    pinned one. ``loads``, ``evictions`` and ``peak`` (the most ever resident besides the
    pinned one) are counted for the worker's metrics."""

    def __init__(
        self, pinned: LoadedModel, load: Callable[[str], LoadedModel], *, capacity: int
    ) -> None:
        if capacity < 1:
            raise ValueError("capacity must be at least 1")
        self.pinned = pinned
        self._load = load
        self.capacity = capacity
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self.loads = 0
        self.evictions = 0
        self.peak = 0

    def get(self, key: str) -> LoadedModel:
        if key == self.pinned.architecture:
            return self.pinned
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                return self._models[key]
            loaded = self._load(key)
            self.loads += 1
            self._models[key] = loaded
            while len(self._models) > self.capacity:
                _key, evicted = self._models.popitem(last=False)
                self.evictions += 1
                _release(evicted)
            self.peak = max(self.peak, len(self._models))
            return loaded

    def discard(self, key: str) -> None:
        """Forget ``key`` (an upload that was deleted): its memory goes now."""
        with self._lock:
            evicted = self._models.pop(key, None)
        if evicted is not None:
            self.evictions += 1
            _release(evicted)

    def resident(self) -> list[str]:
        """The keys resident besides the pinned model, least recently used first."""
        with self._lock:
            return list(self._models)


def _release(loaded: LoadedModel) -> None:
    """Drop the copies made for ``precision=fast``; on CUDA hand cached blocks back."""
    loaded._variants.clear()
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()
