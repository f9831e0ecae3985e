"""Uploaded weights read without running anything in them (shared/weights_files.py), checked
against the architecture table (shared/architectures.json), and loaded strictly by the
worker (worker/compute/model.py load_uploaded). docs/design.md "Uploaded models"."""

from __future__ import annotations

import io
import os
import pickle
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torchvision.models import get_model

from shared.weights_files import (
    NotAStateDict,
    UnsafeWeights,
    WeightsMismatch,
    check_fits,
    inspect_weights,
)
from worker.compute.architecture_table import TABLE, render, table
from worker.compute.model import load_uploaded


class _RunsCommand:
    """Unpickling this calls os.system: what a malicious weights file does."""

    def __init__(self, command: str) -> None:
        self.command = command

    def __reduce__(self):
        return (os.system, (self.command,))


def malicious_pickle(side_effect: Path) -> bytes:
    return pickle.dumps({"conv1.weight": _RunsCommand(f"touch {side_effect}")}, protocol=2)


def malicious_torch_zip(side_effect: Path) -> bytes:
    """A torch.save zip of a real state_dict whose data.pkl also carries the payload."""
    buffer = io.BytesIO()
    torch.save({"w": torch.zeros(2)}, buffer)
    source = zipfile.ZipFile(io.BytesIO(buffer.getvalue()))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as target:
        for info in source.infolist():
            data = source.read(info)
            if info.filename.endswith("/data.pkl"):
                data = malicious_pickle(side_effect)
            target.writestr(info, data)
    return out.getvalue()


def seeded_state_dict(architecture: str = "resnet18", seed: int = 7) -> dict:
    torch.manual_seed(seed)
    return get_model(architecture, weights=None).state_dict()


def saved(state_dict: dict) -> bytes:
    buffer = io.BytesIO()
    torch.save(state_dict, buffer)
    return buffer.getvalue()


def test_the_architecture_table_is_torchvisions():
    assert TABLE.read_text() == render(table()), "run python -m worker.compute.architecture_table"


def test_a_torch_state_dict_and_safetensors_are_read_and_fit(tmp_path):
    state_dict = seeded_state_dict()
    weights = inspect_weights(io.BytesIO(saved(state_dict)))
    assert weights.format == "pytorch"
    assert weights.shapes == {name: tuple(t.shape) for name, t in state_dict.items()}
    check_fits(weights, "resnet18")

    path = tmp_path / "resnet18.safetensors"
    save_file(state_dict, str(path))
    with path.open("rb") as stream:
        weights = inspect_weights(stream)
    assert weights.format == "safetensors"
    check_fits(weights, "resnet18")


def test_another_architectures_weights_are_named_mismatches():
    weights = inspect_weights(io.BytesIO(saved(seeded_state_dict("resnet18"))))
    with pytest.raises(WeightsMismatch) as refused:
        check_fits(weights, "resnet34")
    message = refused.value.message
    assert "do not fit torchvision's resnet34" in message
    assert "missing: layer1.2.conv1.weight" in message
    head = seeded_state_dict("resnet18")
    head["fc.weight"] = torch.zeros(10, 512)
    with pytest.raises(WeightsMismatch, match=r"wrong shape: fc.weight \[10, 512\]"):
        check_fits(inspect_weights(io.BytesIO(saved(head))), "resnet18")


@pytest.mark.parametrize("make", [malicious_pickle, malicious_torch_zip])
def test_a_file_that_would_run_code_is_refused_without_running_it(make, tmp_path):
    side_effect = tmp_path / "pwned"
    data = make(side_effect)
    with pytest.raises(UnsafeWeights, match="system"):
        inspect_weights(io.BytesIO(data))
    assert not side_effect.exists()
    # The worker's loader refuses it too (torch.load(weights_only=True)).
    path = tmp_path / "weights.pt"
    path.write_bytes(data)
    with pytest.raises(Exception, match="weights"):
        load_uploaded("resnet18", path, {"name": "upload"}, device="cpu")
    assert not side_effect.exists()


@pytest.mark.parametrize(
    "data",
    [
        saved({"epoch": 3, "model": seeded_state_dict()}),
        saved(torch.zeros(3)),
        pickle.dumps({"conv1.weight": [1, 2, 3]}, protocol=2),
        b"\x10\x00\x00\x00\x00\x00\x00\x00not json at all!",
        os.urandom(4096),
    ],
    ids=["checkpoint", "tensor", "bare_pickle", "bad_safetensors", "noise"],
)
def test_what_is_not_a_state_dict_is_said_so(data):
    with pytest.raises(NotAStateDict):
        inspect_weights(io.BytesIO(data))


def test_uploaded_weights_load_strictly(tmp_path):
    state_dict = seeded_state_dict()
    path = tmp_path / "w.pt"
    path.write_bytes(saved(state_dict))
    identity = {"name": "upload", "id": "ab" * 12, "sha256": "0" * 64, "label": "mine"}
    loaded = load_uploaded("resnet18", path, identity, device="cpu")
    assert loaded.architecture == "resnet18" and loaded.weights == identity
    assert torch.equal(loaded.model.conv1.weight, state_dict["conv1.weight"])
    with pytest.raises(Exception, match="do not fit torchvision's resnet34"):
        load_uploaded("resnet34", path, identity, device="cpu")
