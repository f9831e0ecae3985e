"""The models a worker keeps loaded (worker/compute/resident.py) and the ``model`` and
``layers`` options and settings that choose them (docs/design.md "Models")."""

from __future__ import annotations

import threading

import pytest
import torch
from pydantic import ValidationError

from shared.errors import InvalidOption
from shared.options import JobOptions
from shared.settings import Settings
from worker.compute.model import LoadedModel
from worker.compute.resident import ResidentModels


def _fake(architecture: str) -> LoadedModel:
    return LoadedModel(
        model=torch.nn.Identity(),
        device=torch.device("cpu"),
        weights={"name": "random", "seed": 0},
        categories=None,
        architecture=architecture,
    )


def test_least_recently_used_is_evicted_and_resnet18_stays():
    loaded: list[str] = []

    def load(key: str) -> LoadedModel:
        loaded.append(key)
        return _fake(key)

    pinned = _fake("resnet18")
    models = ResidentModels(pinned, load, capacity=2)
    assert models.get("resnet18") is pinned
    vgg = models.get("vgg16")
    models.get("densenet121")
    assert models.get("vgg16") is vgg  # resident: not loaded again, now most recent
    models.get("resnet50")  # evicts densenet121, the least recently used
    assert models.resident() == ["vgg16", "resnet50"]
    models.get("densenet121")  # evicts vgg16
    assert models.resident() == ["resnet50", "densenet121"]
    assert loaded == ["vgg16", "densenet121", "resnet50", "densenet121"]
    assert (models.loads, models.evictions, models.peak) == (4, 2, 2)
    assert models.get("resnet18") is pinned
    models.discard("resnet50")
    assert models.resident() == ["densenet121"] and models.evictions == 3


def test_what_is_resident_is_answered_while_a_load_holds_the_lock():
    """The heartbeat reads resident() on its own thread while a task may be loading an
    upload's weights for a long time: waiting on that load would let the heartbeat expire
    and the busy worker's task be handed over as if it were dead."""
    loading, release = threading.Event(), threading.Event()

    def slow_load(key: str) -> LoadedModel:
        loading.set()
        assert release.wait(30)
        return _fake(key)

    models = ResidentModels(_fake("resnet18"), slow_load, capacity=2)
    task = threading.Thread(target=models.get, args=("vgg16",))
    task.start()
    try:
        assert loading.wait(10)
        answer: list[list[str]] = []
        reader = threading.Thread(target=lambda: answer.append(models.resident()))
        reader.start()
        reader.join(5)
        assert answer == [[]], "resident() waited for the load in progress"
    finally:
        release.set()
        task.join(10)
    assert models.resident() == ["vgg16"]


def test_model_option_names_an_architecture_or_an_upload():
    assert JobOptions().model == "resnet18"
    assert JobOptions(model="vgg16", mode="forward").model == "vgg16"
    assert JobOptions(model="ab" * 12).model == "ab" * 12
    with pytest.raises(InvalidOption, match="vgg19"):
        JobOptions(model="vgg19", mode="forward")
    with pytest.raises(InvalidOption, match="use mode=forward"):
        JobOptions.for_job({"model": "densenet121"})
    with pytest.raises(InvalidOption, match="not enabled here; enabled: resnet18, vgg16"):
        JobOptions(model="resnet50").check_enabled(("resnet18", "vgg16"))
    with pytest.raises(InvalidOption, match="not a layer name"):
        JobOptions(layers="layer1;rm -rf")
    # model and layers change the outputs: they are part of the reuse digest's options.
    identity = JobOptions(model="resnet50", layers="layer4.*").output_identity()
    assert '"model":"resnet50"' in identity and '"layers":"layer4.*"' in identity


def test_models_setting():
    assert Settings(models="vgg16, resnet50").enabled_models == ("resnet18", "vgg16", "resnet50")
    assert Settings().enabled_models == ("resnet18",)
    with pytest.raises(ValidationError, match="not among the supported"):
        Settings(models="vgg19")
    with pytest.raises(ValidationError, match="ResNet-18's weights only"):
        Settings(models="vgg16", weights="/weights/resnet18.pt")
    assert Settings(weights="/weights/resnet18.pt").enabled_models == ("resnet18",)
