"""bench.gpu, the benchmark prepared for a CUDA machine, kept working here on the CPU with a
tiny run: every figure is there, and on the CPU (precision auto = exact) its maps are the
exact reference's."""

from __future__ import annotations

from bench import gpu


def test_a_tiny_cpu_run_reports_every_figure():
    numbers = gpu.measure(8, 4, sizes=((320, 240, 6), (200, 150, None)), distinct=4, processes=1)
    assert numbers["images"] == 8
    assert numbers["model_only"]["images_per_s"] > 0
    assert numbers["data_path"]["images_per_s"] > 0
    assert numbers["data_path"]["host_cpu_ms_per_image"] > 0
    assert numbers["data_path"]["precision"]["mode"] == "exact"
    # auto is exact on the CPU: the data path's maps are the reference's, bit for bit.
    assert numbers["reference"]["max_abs_difference_over_range"] == 0
    assert numbers["reference"]["min_correlation"] == 1.0
    assert numbers["single_image_latency_ms"] > 0
    assert numbers["data_path_vs_model_only"] > 0
