"""The fine-tuning recipe (pure parts, no Ray): METER's parameter groups, the schedule, configs, epoch plans."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
from conftest import tiny

import smarttrim
from smarttrim.data.loader import LoaderConfig
from smarttrim.training import TrainConfig, lr_lambda, param_groups
from stages.common import apply_overrides
from stages.finetune_config import FinetuneConfig, deepspeed_config, epoch_schedule
from stages.train_loop import step_position

ROOT = Path(__file__).resolve().parents[1]


def test_param_groups_follow_meter_multipliers_and_cover_every_parameter_once() -> None:
    model = tiny(trim=smarttrim.TrimConfig())
    cfg = TrainConfig(lr=1e-4, lr_mult_cross_modal=5, lr_mult_head=50, lr_mult_trimmer=10, weight_decay=0.01)
    groups = param_groups(model, cfg)
    by_id = {id(p): g for g in groups for p in g["params"]}
    assert len(by_id) == sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    names = dict(model.named_parameters())
    expect = {"backbone.text.encoder.layer.0.attention.self.query.weight": (1e-4, 0.01),
              "backbone.vision.blocks.0.norm1.weight": (1e-4, 0.0),
              "backbone.cross_modal_text_layers.0.attention.self.query.weight": (5e-4, 0.01),
              "backbone.cross_modal_image_pooler.dense.bias": (5e-4, 0.0),
              "head.0.weight": (5e-3, 0.01)}
    for name, (lr, wd) in expect.items():
        g = by_id[id(names[name])]
        assert g["lr"] == pytest.approx(lr) and g["peak_lr"] == g["lr"] and g["weight_decay"] == wd, name
    for name, p in names.items():
        if name.startswith("trimmers."):
            assert by_id[id(p)]["lr"] == pytest.approx(1e-3) and by_id[id(p)]["name"].startswith("trimmer/")
    assert [g["name"] for g in groups] == ["encoder/decay", "encoder/no_decay", "cross_modal/decay",
                                           "cross_modal/no_decay", "head/decay", "head/no_decay", "trimmer/decay",
                                           "trimmer/no_decay"]


def test_retrieval_rank_output_learns_at_meters_base_rate() -> None:
    """METER's ``set_schedule`` gives the head multiplier to its head names (``itm_score`` among them), not to
    ``rank_output``: the retrieval score learns at the base rate."""
    model = tiny("retrieval")
    groups = param_groups(model, TrainConfig(lr=1e-4, lr_mult_head=5, weight_decay=0.01))
    by_id = {id(p): g for g in groups for p in g["params"]}
    rank, bias, itm = model.rank_output.weight, model.rank_output.bias, model.head[0].weight
    assert (by_id[id(rank)]["lr"], by_id[id(rank)]["weight_decay"]) == (pytest.approx(1e-4), 0.01)
    assert by_id[id(bias)]["weight_decay"] == 0.0 and by_id[id(itm)]["lr"] == pytest.approx(5e-4)


def test_schedule_warmup_and_decay_by_hand() -> None:
    f = lr_lambda(TrainConfig(warmup=0.1, schedule="linear"), total_steps=100)
    assert [f(0), f(4), f(9)] == pytest.approx([0.1, 0.5, 1.0])
    assert [f(10), f(55), f(100)] == pytest.approx([1.0, 0.5, 0.0])
    c = lr_lambda(TrainConfig(warmup=0.0, schedule="cosine", end_lr_ratio=0.1), total_steps=10)
    assert [c(0), c(5), c(10)] == pytest.approx([1.0, 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 2)), 0.1])
    k = lr_lambda(TrainConfig(warmup=0.5, schedule="constant"), total_steps=4)
    assert [k(0), k(1), k(2), k(3)] == pytest.approx([0.5, 1.0, 1.0, 1.0])


def test_train_config_validation_names_the_field() -> None:
    for kwargs, match in [({"batch_size": 0}, "batch_size=0"), ({"warmup": 1.0}, "warmup=1.0"),
                          ({"schedule": "step"}, "schedule='step'"), ({"precision": "fp16"}, "precision='fp16'"),
                          ({"max_steps": 0}, "max_steps=0"), ({"betas": (0.9, 1.0)}, "betas")]:
        with pytest.raises(ValueError, match=match):
            TrainConfig(**kwargs)
    with pytest.raises(ValueError, match="unknown fields"):
        TrainConfig.from_dict({"lr": 1e-4, "learning_rate": 1})
    cfg = TrainConfig(betas=(0.9, 0.95), max_steps=7)
    assert TrainConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_finetune_config_round_trips_and_fingerprints_what_is_trained(tmp_path: Path) -> None:
    cfg = FinetuneConfig(shards="s", out=str(tmp_path / "a"), trim=smarttrim.TrimConfig(vision_token_layers=(1, 2)),
                         train=TrainConfig(max_steps=5, log_every=5), checkpoint_every=5)
    again = FinetuneConfig.from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg
    moved = FinetuneConfig.from_dict({**cfg.to_dict(), "out": str(tmp_path / "b"), "max_failures": 0})
    assert moved.fingerprint() == cfg.fingerprint(), "where and how robustly it runs is not what is trained"
    changed = FinetuneConfig.from_dict(apply_overrides(cfg.to_dict(), ["train.lr=0.002"]))
    assert changed.train.lr == 0.002 and changed.fingerprint() != cfg.fingerprint()
    assert cfg.storage_path == str(tmp_path / "a.ray") and cfg.name == "a"
    with pytest.raises(ValueError, match="unknown field 'lrr'"):
        apply_overrides(cfg.to_dict(), ["train.lrr=1"])
    with pytest.raises(ValueError, match="unknown fields"):
        FinetuneConfig.from_dict({**cfg.to_dict(), "epochz": 1})
    assert cfg.false_texts == 15, "METER's draw_false_text of its IRTR fine-tuning"
    fewer = FinetuneConfig.from_dict(apply_overrides(cfg.to_dict(), ["false_texts=3"]))
    assert fewer.false_texts == 3 and fewer.fingerprint() != cfg.fingerprint()
    with pytest.raises(ValueError, match="false_texts=0"):
        FinetuneConfig(shards="s", out="o", false_texts=0)


def test_deepspeed_configs_are_filled_from_the_training_config(tmp_path: Path) -> None:
    named = sorted(p.stem for p in (ROOT / "cluster" / "deepspeed").glob("*.json"))
    assert named == ["zero0", "zero1", "zero2"]
    train = TrainConfig(batch_size=4, grad_accum=3, max_grad_norm=None, precision="bf16", log_every=5)
    ds = deepspeed_config(FinetuneConfig(shards="s", out="o", deepspeed="zero2", train=train, checkpoint_every=5))
    assert ds["train_micro_batch_size_per_gpu"] == 4 and ds["gradient_accumulation_steps"] == 3
    assert ds["gradient_clipping"] == 0.0 and ds["bf16"] == {"enabled": True} and ds["zero_optimization"]["stage"] == 2
    with pytest.raises(ValueError, match="bf16 needs ZeRO stage >= 1"):
        FinetuneConfig(shards="s", out="o", train=TrainConfig(precision="bf16"))
    with pytest.raises(ValueError, match="checkpoint_every=7: must be a multiple of train.log_every=10"):
        FinetuneConfig(shards="s", out="o", checkpoint_every=7)
    with pytest.raises(ValueError, match="deepspeed='zero9': no such file"):
        FinetuneConfig(shards="s", out="o", deepspeed="zero9")
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"train_micro_batch_size_per_gpu": 4, "zero_optimization": {"stage": 1}}))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4 contradicts the training config"):
        FinetuneConfig(shards="s", out="o", deepspeed=str(bad))
    bad.write_text(json.dumps({"zero_optimization": {"stage": 3}}))
    with pytest.raises(ValueError, match="ZeRO stage 3 is not supported"):
        FinetuneConfig(shards="s", out="o", deepspeed=str(bad))


def test_epoch_schedule_and_resume_position() -> None:
    manifest = {"splits": {"train": {"shards": [{"file": f"train-{i}.tar", "samples": n}
                                                for i, n in enumerate([40, 40, 40, 33])]}}}
    cfg = FinetuneConfig(shards="s", out="o", train=TrainConfig(batch_size=8, grad_accum=2, epochs=3))
    plans, steps, total = epoch_schedule(cfg, manifest, LoaderConfig(batch_size=8, train=True), world=2)
    # each rank gets two shards; the emptiest rank has 73 or 80 samples -> 9 or 10 batches -> 4 or 5 steps
    assert len(plans) == 3 and all(s == p.batches_per_rank // 2 for s, p in zip(steps, plans, strict=True))
    assert all(s in (4, 5) for s in steps) and total == sum(steps)
    capped = FinetuneConfig(shards="s", out="o", train=TrainConfig(batch_size=8, grad_accum=2, max_steps=11))
    _, steps, total = epoch_schedule(capped, manifest, LoaderConfig(batch_size=8, train=True), world=2)
    assert total == 11 and sum(steps) >= 11 and sum(steps[:-1]) < 11
    assert step_position([4, 5, 4], 0, 2) == (0, 0)
    assert step_position([4, 5, 4], 6, 2) == (1, 4)
    assert step_position([4, 5, 4], 9, 2) == (2, 0)
    with pytest.raises(ValueError, match="past the planned epochs"):
        step_position([4, 5, 4], 13, 2)


def test_cli_help_documents_the_stage() -> None:
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "stages.finetune", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    for flag in ("--shards", "--init", "--trim", "--num-workers", "--deepspeed", "--set", "RAY_ADDRESS", "bf16"):
        assert flag in out, flag
