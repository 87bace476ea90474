"""The perception probe (``bench/perception.py``): a linear probe of a model's frozen visual features on one-object
images, against the same architecture untrained. It must be able to fail: random convolutions separate colours,
so the colour probe of an untrained model is near 1 and its shape probe is far below it."""

from __future__ import annotations

from pathlib import Path

import torch
from conftest import bench_module

import smarttrim


def test_probe_reads_colour_from_untrained_features_and_reports_both(tmp_path: Path) -> None:
    bench = bench_module("perception")
    torch.manual_seed(0)
    model = smarttrim.build_model("meter-tiny", task="vqa", num_labels=4, patch_stem="conv_context",
                                  image_size=64, dropout=0.0)
    out = smarttrim.save_pretrained(model, tmp_path / "model")
    result = bench.run(str(out), n=300)
    assert result["held_out"] == 100 and set(result["probe"]) == {"shape", "color"}
    for probe in (result["probe"], result["random_init"]):
        assert set(probe["shape"]) == set(probe["color"]) == {"mean", "cls"}
    assert result["probe"]["color"]["mean"] >= 0.9, result  # colour is linear in random conv features
    assert result["probe"]["color"]["mean"] > result["probe"]["shape"]["mean"] + 0.2, result
    pixels, shapes, colors = bench.images(30, 64)
    assert pixels.shape == (30, 3, 64, 64) and int(shapes.max()) <= 3 and int(colors.max()) <= 5
    assert bench.images(30, 64)[0].equal(pixels), "the drawing is seeded"
