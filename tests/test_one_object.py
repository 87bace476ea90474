"""The one-object world in the official VQA v2 layout (``bench/one_object.py``): fine-tuned from the shipped
pre-trained start with the quickstart's backbone recipe, the model answers colour and shape questions from the
image (the question alone gives 1/6 and 1/4).

Measured (500 training images, 300 steps of 32): colour 1.00, shape 1.00 (issue 9's target: 0.9 on both; the
previous start, without the supervised visual pre-training and the ``conv_context`` stem, reached 1.00 / 0.46)."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import bench_module

pytestmark = pytest.mark.slow


def test_one_object_vqa_v2_layout_is_answered_from_the_image(tmp_path: Path) -> None:
    result = bench_module("one_object").run(tmp_path, train_images=500, val_images=100)
    assert set(result["labels"]) == {"red", "green", "blue", "yellow", "purple", "cyan", "circle", "square",
                                     "triangle", "cross"}
    assert result["accuracy"]["color"] >= 0.9 and result["accuracy"]["shape"] >= 0.9, result["accuracy"]
    assert result["text_only_baseline"] < 0.3, "each question text alone says nothing about its answer"
    assert result["permuted_images"]["changed"] > 0.35, "the answers follow the image"
    assert result["permuted_images"]["metric"] < result["vqa_score"] - 0.3
