"""``bench/adaptive_inference.py`` at meter-tiny: its calibration reaches the FLOPs targets with decisions that differ
per instance, the static reference matches SmartTrim's FLOPs, and the JSON holds every model's ratios at every batch
size (the speed figures themselves are measured at meter-base, README "Does it get faster?")."""

from __future__ import annotations

import pytest
from conftest import bench_module


def test_adaptive_bench_calibrates_targets_and_reports_every_model(capsys: pytest.CaptureFixture[str]) -> None:
    bench = bench_module("adaptive_inference")
    out = bench.main(["--preset", "meter-small", "--instances", "16", "--single-instances", "4", "--batch-sizes",
                      "1,8", "--repeats", "1", "--targets", "2", "--search-steps", "4"])
    results = out["results"]
    assert set(results) == {"backbone", "keep_all", "smarttrim-2x", "static-2x"}
    st, static = results["smarttrim-2x"], results["static-2x"]
    assert st["flops_reduction"] == pytest.approx(2.0, rel=0.15), "calibrated to the target"
    assert st["mmacs_min"] < st["mmacs_max"], "instances cost different amounts: decisions differ per instance"
    assert static["mmacs"] == pytest.approx(st["mmacs"], rel=0.1), "the static reference at equal FLOPs"
    assert results["keep_all"]["flops_reduction"] == pytest.approx(1.0, abs=0.03), "keep-all trims nothing"
    for name, entry in results.items():
        assert entry["bs1"]["latency_ms"] > 0 and entry["bs8"]["throughput_per_s"] > 0, name
        if name != "backbone":
            assert entry["bs8"]["efficiency"] == pytest.approx(
                entry["bs8"]["throughput_speedup"] / entry["bs8"]["flops_reduction"], rel=0.01), name
            # bs 8 timed every input, bs 1 the first 4: each efficiency uses the FLOPs of the inputs it timed
            assert entry["bs8"]["flops_reduction"] == pytest.approx(entry["flops_reduction"], rel=1e-3), name
            assert entry["bs1"]["efficiency"] == pytest.approx(
                entry["bs1"]["latency_speedup"] / entry["bs1"]["flops_reduction"], rel=0.01), name
    assert results["smarttrim-2x"]["bs1"]["flops_reduction"] != pytest.approx(
        results["smarttrim-2x"]["flops_reduction"], rel=1e-4), "the first 4 inputs cost differently from all 16"
    faults = out["page_faults_timed"]
    assert set(faults) == {"bs1", "bs8"} and all(isinstance(v, int) and v >= 0 for v in faults.values()), faults
    assert capsys.readouterr().out.lstrip().startswith("{"), "stdout is the JSON alone"
