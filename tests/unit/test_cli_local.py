"""`featuremaps local`: files on disk, one error line per bad image, an honest exit code."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from client.cli import main

RANDOM = ["--weights", "random", "--device", "cpu"]


def test_writes_figure_manifest_arrays_and_layers(tmp_path, grace_hopper_path):
    out = tmp_path / "out"
    rc = main(["local", str(grace_hopper_path), "-o", str(out), *RANDOM, "--arrays", "--per-layer"])
    assert rc == 0
    folder = out / "grace_hopper"
    with Image.open(folder / "feature_maps.jpg") as figure:
        assert figure.format == "JPEG"
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["weights"] == {"name": "random", "seed": 0}
    names = [layer["name"] for layer in manifest["layers"]]
    with np.load(folder / "maps.npz") as maps:
        assert list(maps.keys()) == names
    pngs = sorted(path.name for path in (folder / "layers").iterdir())
    assert pngs == sorted(f"{index:02d}_{name}.png" for index, name in enumerate(names))


def test_bad_images_are_reported_and_the_rest_goes_on(tmp_path, capsys, photos, bad_inputs):
    inputs = []
    for name, (data, _) in bad_inputs.items():
        path = tmp_path / f"{name}.jpg"
        path.write_bytes(data)
        inputs.append(str(path))
    good = tmp_path / "good.png"
    good.write_bytes(photos[("shapes", "png")])
    missing = tmp_path / "missing.png"
    out = tmp_path / "out"

    argv = ["local", *inputs, str(good), str(missing), "-o", str(out), *RANDOM]
    rc = main([*argv, "--batch-size", "4", "--format", "png", "--mode", "forward"])

    assert rc == 1
    err = capsys.readouterr().err
    for name, (_, code) in bad_inputs.items():
        assert f"{name}.jpg: {code}:" in err
    assert "missing.png: unreadable:" in err
    assert f"1 of {len(inputs) + 2} image(s) written" in err
    assert (out / "good" / "feature_maps.png").is_file()
    assert sorted(path.name for path in out.iterdir()) == ["good"]


def test_same_stem_twice_gets_two_folders(tmp_path, photos):
    first, second = tmp_path / "a" / "cat.jpg", tmp_path / "b" / "cat.png"
    for path, ext in ((first, "jpg"), (second, "png")):
        path.parent.mkdir()
        path.write_bytes(photos[("gradient", ext)])
    out = tmp_path / "out"
    assert main(["local", str(first), str(second), "-o", str(out), *RANDOM]) == 0
    assert sorted(path.name for path in out.iterdir()) == ["cat", "cat-2"]


def test_unavailable_weights_exit_2(tmp_path, capsys, grace_hopper_path):
    missing = tmp_path / "nope.pt"
    rc = main(["local", str(grace_hopper_path), "-o", str(tmp_path), "--weights", str(missing)])
    assert rc == 2
    assert "weights_unavailable" in capsys.readouterr().err


def test_bad_arguments_are_refused_by_argparse(grace_hopper_path):
    with pytest.raises(SystemExit):
        main(["local", str(grace_hopper_path), "--reduction", "median"])
    with pytest.raises(SystemExit):
        main(["local", str(grace_hopper_path), "--batch-size", "0"])


def test_the_cli_does_not_import_torch_until_local_runs():
    code = "import sys, client.cli; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0
