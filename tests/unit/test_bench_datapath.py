"""bench.datapath's stage meter: stages are CPU time, nested stages are not counted twice,
and the wrapped functions are put back."""

from __future__ import annotations

import time
import types

from bench.datapath import StageMeter


def busy(seconds: float) -> None:
    end = time.thread_time() + seconds
    while time.thread_time() < end:
        pass


def test_nested_stage_is_taken_out_of_the_outer_one():
    module = types.SimpleNamespace(inner=lambda: busy(0.02))
    module.outer = lambda: (busy(0.03), module.inner())
    meter = StageMeter()
    with meter.wrapping(module, "outer", "model"), meter.wrapping(module, "inner", "reduce"):
        module.outer()
    assert 15 <= meter.cpu_ms["reduce"] <= 60
    assert 25 <= meter.cpu_ms["model"] <= 60  # without the inner 20 ms


def test_wrapping_restores_the_original_and_skips_missing_names():
    original = lambda: 1  # noqa: E731
    module = types.SimpleNamespace(stage=original)
    meter = StageMeter()
    with meter.wrapping(module, "stage", "decode"), meter.wrapping(module, "absent", "x"):
        assert module.stage is not original and module.stage() == 1
    assert module.stage is original and not hasattr(module, "absent")
    assert set(meter.cpu_ms) == {"decode"}
