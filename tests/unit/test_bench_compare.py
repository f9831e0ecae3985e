"""``python -m bench compare OLD NEW``: every number in both results side by side, and a
regression in the wrong direction marked, whether the files are one section or a whole run."""

from __future__ import annotations

import json

import pytest

from bench.__main__ import main
from bench.compare import compare, direction, load, numbers

OLD = {
    "section": "bulk",
    "model_only_images_per_s": 20.0,
    "end_to_end": {"1_worker": {"seconds": 30.0, "images_per_s": 10.0}},
    "ratios": {"1_worker_vs_model_only": 0.5},
    "machine": {"cpus": 2, "quiet": True},
    "sizes": [[320, 240, 6]],
}


def test_numbers_are_found_by_their_path_and_booleans_are_not_numbers():
    found = numbers(OLD)
    assert found["end_to_end.1_worker.seconds"] == 30.0
    assert found["sizes[0][1]"] == 240.0
    assert "machine.quiet" not in found and "section" not in found


def test_the_direction_comes_from_the_name():
    assert direction("end_to_end.1_worker.images_per_s") == 1
    assert direction("ratios.1_worker_vs_model_only") == 1
    assert direction("end_to_end.1_worker.seconds") == -1
    assert direction("data_path.stage_cpu_ms_per_image.decode") == 0
    assert direction("data_path.wall_ms_per_image") == -1
    assert direction("fast.data_path.host_cpu_ms_outside_model") == -1
    assert direction("expansion_s") == -1
    assert direction("machine.cpus") == 0


def test_a_twenty_percent_loss_of_throughput_is_marked_worse():
    new = json.loads(json.dumps(OLD))
    new["end_to_end"]["1_worker"] = {"seconds": 37.5, "images_per_s": 8.0}
    new["model_only_images_per_s"] = 21.0
    rows = {row["path"]: row for row in compare(OLD, new)}
    assert rows["end_to_end.1_worker.images_per_s"]["verdict"] == "worse"
    assert rows["end_to_end.1_worker.images_per_s"]["ratio"] == pytest.approx(0.8)
    assert rows["end_to_end.1_worker.seconds"]["verdict"] == "worse"
    assert rows["model_only_images_per_s"]["verdict"] == ""  # +5 %: within the threshold
    assert rows["machine.cpus"]["verdict"] == ""


def test_the_command_reads_a_section_file_against_a_whole_run(tmp_path, capsys):
    new = json.loads(json.dumps(OLD))
    new["end_to_end"]["1_worker"]["images_per_s"] = 13.0
    (tmp_path / "bulk.json").write_text(json.dumps(OLD))
    (tmp_path / "all.json").write_text(json.dumps({"bulk": new, "core": {"x_per_s": 1}}))
    assert load(tmp_path / "bulk.json").keys() == {"bulk"}
    status = main(["compare", str(tmp_path / "bulk.json"), str(tmp_path / "all.json")])
    out = capsys.readouterr().out
    assert status == 0
    assert "bulk.end_to_end.1_worker.images_per_s" in out and "better" in out
    assert "core.x_per_s" not in out  # only numbers present in both are compared
    new["end_to_end"]["1_worker"]["images_per_s"] = 5.0
    (tmp_path / "all.json").write_text(json.dumps({"bulk": new}))
    assert main(["compare", "--fail", str(tmp_path / "bulk.json"), str(tmp_path / "all.json")]) == 1
    assert "worse" in capsys.readouterr().out
