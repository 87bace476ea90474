"""The shipped pre-trained checkpoint: made by ``python -m pipeline.run pretrain`` with the quickstart config (its
``pretrain`` section), its files are those recorded, it loads, and its recorded numbers hold."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from conftest import bench_module

import smarttrim
from pipeline.config import load_config
from pipeline.publish import CHECK_SAMPLES, RECORD, sha256_files
from stages.pretrain import evaluate_pretraining
from stages.shard import ShardConfig
from stages.shard import run as shard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = load_config(ROOT / "pipeline" / "configs" / "quickstart.yaml")
SHIPPED = ROOT / QUICKSTART.model.pretrained


def _record() -> dict:
    return json.loads((SHIPPED / RECORD).read_text())


def test_shipped_checkpoint_is_what_its_record_says() -> None:
    record = _record()
    assert sha256_files(SHIPPED) == record["sha256"], "the files are the ones the record hashed"
    assert sum(p.stat().st_size for p in SHIPPED.rglob("*") if p.is_file()) < 20 * 2**20
    assert record["command"].startswith("python -m pipeline.run pretrain --config pipeline/configs/quickstart.yaml")
    # the committed config still describes how it was made
    cfg = QUICKSTART.to_dict()
    assert record["config"]["pretrain"] == cfg["pretrain"] and record["config"]["model"] == cfg["model"]
    model = smarttrim.load_model(SHIPPED)
    assert model.config.name == QUICKSTART.model.preset and model.config.task == "retrieval"
    ev = record["evaluation"]  # ITM: half the pairs are hard negatives (chance 0.5); MLM: against rolled images
    assert ev["itm_accuracy"] > 0.65 and ev["mlm_accuracy"] > ev["mlm_accuracy_permuted_images"] + 0.15
    assert record["evaluation"]["split"] == "val" and record["training"]["steps"] == QUICKSTART.pretrain.train.max_steps


def test_shipped_start_sees_shapes() -> None:
    """Its visual encoder separates the four shapes of one-object images (``bench/perception.py``; measured 0.96,
    an untrained one 0.47): what a fine-tuning needs to answer shape questions from the image."""
    probe = bench_module("perception").probe_model(smarttrim.load_model(SHIPPED), n=600)
    assert probe["shape"]["mean"] >= 0.85 and probe["color"]["mean"] >= 0.95, probe


def test_recorded_numbers_hold_on_a_regenerated_sample(tmp_path: Path) -> None:
    """The built-in data is generated deterministically: the first validation captions, regenerated here, give
    the recorded accuracies (up to one pair or token either way for CPU arithmetic differences)."""
    record = _record()
    data = record["data"]["config"]
    sizes = (1, CHECK_SAMPLES, 1)
    shard(ShardConfig(source="shapes", task=data["task"], out=str(tmp_path / "shards"), shapes_sizes=sizes,
                      shard_size=CHECK_SAMPLES, seed=data["seed"], shapes_image_size=data["shapes_image_size"],
                      tokenizer=str(SHIPPED / "tokenizer")))
    got = evaluate_pretraining(SHIPPED, str(tmp_path / "shards"), "val", batch_size=CHECK_SAMPLES,
                               limit=CHECK_SAMPLES, threads=1)
    want = record["check"]
    assert got["itm_pairs"] == want["itm_pairs"] and got["mlm_tokens"] == want["mlm_tokens"]
    assert abs(got["itm_accuracy"] - want["itm_accuracy"]) * got["itm_pairs"] <= 1
    assert abs(got["mlm_accuracy"] - want["mlm_accuracy"]) * got["mlm_tokens"] <= 1
    assert got["mlm_accuracy"] > got["mlm_accuracy_permuted_images"] + 0.05, "masked words are read off the image"


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_task_models_start_from_it(task: str) -> None:
    from smarttrim.checkpoints import load_pretrained, pretrained_config

    model = smarttrim.SmartTrimModel(pretrained_config(SHIPPED, task, 20 if task == "vqa" else 2),
                                     smarttrim.TrimConfig())
    report = load_pretrained(model, SHIPPED)
    assert report.head_loaded is False and report.loaded > 100
