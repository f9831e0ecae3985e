"""The result digest of worker/reuse.py: equal for equal inputs, different as soon as anything
that changes the outputs differs (bytes, an option, the weights, the computation version)."""

from __future__ import annotations

import pytest

from shared.options import JobOptions
from worker import reuse
from worker.reuse import Source, _rekeyed, result_digest

WEIGHTS = {"name": "random", "seed": 0}
DATA = b"\xff\xd8 some jpeg bytes"


def test_equal_inputs_have_equal_digests():
    options = JobOptions.from_mapping({"colormap": "gray", "arrays": "true"})
    same = JobOptions(colormap="gray", arrays=True)
    assert result_digest(dict(WEIGHTS), options, DATA) == result_digest(WEIGHTS, same, DATA)


@pytest.mark.parametrize(
    "weights, options, data",
    [
        (WEIGHTS, JobOptions(), DATA + b"!"),
        ({"name": "random", "seed": 1}, JobOptions(), DATA),
        ({"name": "state_dict", "path": "/w.pt", "sha256": "ab"}, JobOptions(), DATA),
        *[
            (WEIGHTS, JobOptions(**{name: value}), DATA)
            for name, value in (
                ("mode", "forward"),
                ("reduction", "max"),
                ("normalize", "imagenet"),
                ("format", "png"),
                ("colormap", "gray"),
                ("renderer", "matplotlib"),
                ("per_layer", True),
                ("arrays", True),
            )
        ],
    ],
)
def test_anything_that_changes_the_outputs_changes_the_digest(weights, options, data):
    assert result_digest(weights, options, data) != result_digest(WEIGHTS, JobOptions(), DATA)


def test_another_owner_has_another_digest():
    assert result_digest(WEIGHTS, JobOptions(), DATA, owner="alice") != result_digest(
        WEIGHTS, JobOptions(), DATA, owner="bob"
    )


def test_another_computation_version_changes_the_digest(monkeypatch):
    before = result_digest(WEIGHTS, JobOptions(), DATA)
    monkeypatch.setattr(reuse, "COMPUTATION_VERSION", reuse.COMPUTATION_VERSION + 1)
    assert result_digest(WEIGHTS, JobOptions(), DATA) != before


@pytest.mark.parametrize("folder", ["results/src/g12/", "results/src/"])
def test_a_copied_result_names_the_targets_own_keys_in_its_attempts_folder(folder):
    # The source's outputs in the folder of its attempt, or in the layout before attempts.
    source = Source(
        "src",
        {
            "figure_key": f"{folder}feature_maps.jpg",
            "manifest_key": f"{folder}manifest.json",
            "input_preview_key": f"{folder}input.jpg",
            "layer_keys": [f"{folder}layers/00_conv1.png"],
            "weights": WEIGHTS,
        },
    )
    stored = _rekeyed(source, "dst-000001", attempt="g40", input_preview=False)
    assert stored == {
        "figure_key": "results/dst-000001/g40/feature_maps.jpg",
        "manifest_key": "results/dst-000001/g40/manifest.json",
        "layer_keys": ["results/dst-000001/g40/layers/00_conv1.png"],
        "weights": WEIGHTS,
    }


def test_a_key_outside_the_sources_folder_is_never_copied():
    source = Source(
        "src",
        {"figure_key": "results/other/g1/f.jpg", "manifest_key": "results/src/g2/manifest.json"},
    )
    with pytest.raises(ValueError, match="is not under"):
        _rekeyed(source, "dst", attempt="g3", input_preview=False)


def test_the_digest_names_the_precision_that_ran_not_the_option():
    import torch

    from worker.compute.precision import resolve

    def digest(option: str, device: str) -> str:
        precision = resolve(option, torch.device(device))
        return result_digest(WEIGHTS, JobOptions(precision=option), DATA, precision=precision)

    # auto is exact on a CPU: the same computation, one result.
    assert digest("auto", "cpu") == digest("exact", "cpu")
    # fast computes other maps, and auto on CUDA is fast on the device: never shared with exact.
    assert digest("fast", "cpu") != digest("exact", "cpu")
    assert digest("auto", "cuda") != digest("auto", "cpu")
    assert digest("auto", "cuda") == digest("fast", "cuda")
