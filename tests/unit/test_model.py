"""worker.compute.model: every weights source loads what it says, or fails saying how to fix it.

Nothing here touches the network: the imagenet checkpoint is planted in a temporary
TORCH_HOME, and the "cannot download" case replaces torch.hub's downloader.
"""

from __future__ import annotations

import urllib.error

import pytest
import torch

from shared.errors import DeviceUnavailable, WeightsUnavailable
from worker.compute import model as model_module
from worker.compute.model import imagenet_checkpoint_path, load_count, load_model, resolve_device

EXPECTED_FILE = "resnet18-f37072fd.pth"


def _outputs(loaded, seed: int = 3) -> torch.Tensor:
    batch = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(seed))
    with torch.inference_mode():
        return loaded.model(batch)


@pytest.fixture
def torch_home(tmp_path, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    return tmp_path / "torch"


@pytest.fixture
def no_network(monkeypatch):
    def refuse(url, *args, **kwargs):
        raise urllib.error.URLError("network disabled in tests")

    monkeypatch.setattr(torch.hub, "download_url_to_file", refuse)


def test_random_weights_are_seeded_and_leave_the_global_rng_alone(random_model):
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    again = load_model("random", device="cpu", seed=0)
    assert torch.equal(torch.rand(3), expected_next)
    for (name, a), (_, b) in zip(
        random_model.model.state_dict().items(), again.model.state_dict().items(), strict=True
    ):
        assert torch.equal(a, b), name
    other = load_model("random", device="cpu", seed=1)
    assert not torch.equal(other.model.conv1.weight, again.model.conv1.weight)
    assert again.weights == {"name": "random", "seed": 0}
    assert again.categories is None
    assert not again.model.training
    assert again.device == torch.device("cpu")


def test_state_dict_file_gives_identical_outputs(random_model, tmp_path):
    path = tmp_path / "weights.pt"
    torch.save(random_model.model.state_dict(), path)
    loaded = load_model(str(path), device="cpu", seed=99)
    assert torch.equal(_outputs(loaded), _outputs(random_model))
    assert loaded.weights["name"] == "state_dict"
    assert loaded.weights["path"] == str(path.resolve())
    assert len(loaded.weights["sha256"]) == 64


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "does not exist"),
        (b"not a torch file", "not a loadable state_dict"),
        ("tensor", "not a state_dict"),
        ("wrong_keys", "do not fit"),
    ],
)
def test_bad_state_dict_files(tmp_path, content, message):
    path = tmp_path / "weights.pt"
    if isinstance(content, bytes):
        path.write_bytes(content)
    elif content == "tensor":
        torch.save(torch.zeros(3), path)
    elif content == "wrong_keys":
        torch.save({"fc.weight": torch.zeros(3)}, path)
    with pytest.raises(WeightsUnavailable, match=message) as caught:
        load_model(str(path), device="cpu")
    assert caught.value.code == "weights_unavailable"


def test_imagenet_loads_from_torchvisions_cache(random_model, torch_home, no_network):
    path = imagenet_checkpoint_path()
    assert path == torch_home / "hub" / "checkpoints" / EXPECTED_FILE
    path.parent.mkdir(parents=True)
    torch.save(random_model.model.state_dict(), path)
    loaded = load_model("imagenet", device="cpu")
    assert torch.equal(_outputs(loaded), _outputs(random_model))
    assert loaded.weights["name"] == "imagenet"
    assert loaded.weights["id"] == "IMAGENET1K_V1"
    assert loaded.weights["file"] == EXPECTED_FILE
    assert len(loaded.categories) == 1000
    assert loaded.categories[0] == "tench"


def test_imagenet_missing_is_a_clear_error_and_workers_never_download(
    torch_home, no_network, monkeypatch
):
    fetched = []
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", lambda *a, **k: fetched.append(a))
    with pytest.raises(WeightsUnavailable) as caught:
        load_model("imagenet", device="cpu")
    message = caught.value.message
    assert str(torch_home / "hub" / "checkpoints" / EXPECTED_FILE) in message
    assert EXPECTED_FILE in message
    assert "FEATUREMAPS_WEIGHTS=random" in message
    assert "Workers never download" in message
    assert fetched == []  # no download was even tried


def test_imagenet_corrupt_cache_file(torch_home, no_network):
    path = imagenet_checkpoint_path()
    path.parent.mkdir(parents=True)
    path.write_bytes(b"half a download")
    with pytest.raises(WeightsUnavailable, match="cannot be read"):
        load_model("imagenet", device="cpu")


def test_every_enabled_architectures_checkpoint_is_checked_before_workers_start(
    random_model, torch_home, no_network
):
    from shared.settings import Settings
    from worker.launcher import check_weights

    path = imagenet_checkpoint_path()
    path.parent.mkdir(parents=True)
    torch.save(random_model.model.state_dict(), path)
    check_weights(Settings(weights="imagenet"))
    with pytest.raises(WeightsUnavailable) as caught:
        check_weights(Settings(weights="imagenet", models="vgg16"))
    message = caught.value.message
    assert "VGG-16 ImageNet weights are not in torchvision's cache" in message
    assert str(imagenet_checkpoint_path("vgg16")) in message
    check_weights(Settings(weights="random", models="vgg16"))


def test_every_load_is_counted():
    before = load_count()
    load_model("random", device="cpu")
    assert load_count() == before + 1
    assert model_module.load_count() == load_count()


def test_devices():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type in ("cpu", "cuda")
    with pytest.raises(DeviceUnavailable):
        resolve_device("gpu please")
    with pytest.raises(DeviceUnavailable):
        resolve_device("cuda:99")
