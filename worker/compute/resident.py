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
        # What resident() answers, replaced whole under the lock: the heartbeat thread reads
        # it while a task may hold the lock for a whole load (an upload's weights from storage),
        # and a heartbeat that waited on that would make a busy worker look dead.
        self._names: tuple[str, ...] = ()
        self.loads = 0
        self.evictions = 0
        self.peak = 0

    def get(self, key: str) -> LoadedModel:
        if key == self.pinned.architecture:
            return self.pinned
        with self._lock:
            if key in self._models:
                self._models.move_to_end(key)
                self._names = tuple(self._models)
                return self._models[key]
            loaded = self._load(key)
            self.loads += 1
            self._models[key] = loaded
            while len(self._models) > self.capacity:
                _key, evicted = self._models.popitem(last=False)
                self.evictions += 1
                _release(evicted)
            self.peak = max(self.peak, len(self._models))
            self._names = tuple(self._models)
            return loaded

    def discard(self, key: str) -> None:
        """Forget ``key`` (an upload that was deleted): its memory goes now."""
        with self._lock:
            evicted = self._models.pop(key, None)
            self._names = tuple(self._models)
        if evicted is not None:
            self.evictions += 1
            _release(evicted)

    def resident(self) -> list[str]:
        """The keys resident besides the pinned model, least recently used first; never waits
        for a load in progress."""
        return list(self._names)


def _release(loaded: LoadedModel) -> None:
    """Drop the copies made for ``precision=fast``; on CUDA hand cached blocks back."""
    loaded._variants.clear()
    if loaded.device.type == "cuda":
        torch.cuda.empty_cache()
