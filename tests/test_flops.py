"""FLOPs of the inference path: torchprofile per instance, monotone in the keep ratios, analytic agreement."""

from __future__ import annotations

import pytest
import torch
from conftest import instance, randomize_trimmers, score_layers, set_trimmer_bias, tiny

import smarttrim
from smarttrim.flops import analytic_macs, count_flops
from smarttrim.trimmers import HeadTrimmer


def _flops_and_analytic(model: smarttrim.SmartTrimModel, one: dict[str, torch.Tensor]) -> tuple[int, int]:
    macs = count_flops(model, one)
    with torch.no_grad():
        out = model.eval()(one)
    return macs, analytic_macs(model, out, text_len=one["input_ids"].shape[1])


@pytest.mark.parametrize(("trim", "stem"), [(None, "linear"), (smarttrim.TrimConfig(vision_head_trim=True), "linear"),
                                            (smarttrim.TrimConfig(vision_token_layers=(0, 1, 2)), "conv"),
                                            (None, "conv_context")])
def test_analytic_count_agrees_with_torchprofile(trim: smarttrim.TrimConfig | None, stem: str) -> None:
    model = tiny(trim=trim, patch_stem=stem)
    if trim is not None:
        randomize_trimmers(model, seed=0)
    batch = model.dummy_batch(4, seed=0)
    for i in range(4):
        macs, analytic = _flops_and_analytic(model, instance(batch, i))
        assert abs(analytic - macs) / macs < 0.05, (i, macs, analytic)


def test_flops_fall_strictly_as_token_keep_ratios_fall() -> None:
    """Switch trimmers from keep-all to drop-all one at a time, latest layer first: fewer tokens, fewer MACs."""
    model = tiny(trim=smarttrim.TrimConfig(head_target=1.0)).eval()
    set_trimmer_bias(model, token_bias=10.0, zero_weights=True)
    one = instance(model.dummy_batch(1, seed=1), 0)
    order = [("image_tokens", "1"), ("text_tokens", "1"), ("image_tokens", "0"), ("text_tokens", "0"),
             ("vision_tokens", "2"), ("vision_tokens", "1")]
    previous_keep, previous_macs = 1.0, count_flops(model, one)
    for placement, layer in order:
        with torch.no_grad():
            getattr(model.trimmers, placement)[layer].output_layer.bias.fill_(-10.0)
            keep = float(torch.cat(list(model(one).keep_groups.values())).mean())
        macs = count_flops(model, one)
        assert keep < previous_keep and macs < previous_macs, (placement, layer, keep, macs)
        previous_keep, previous_macs = keep, macs


def test_flops_fall_strictly_as_heads_are_dropped() -> None:
    model = tiny(trim=smarttrim.TrimConfig(token_target_vision=1.0, token_target_text=1.0,
                                           vision_head_trim=True)).eval()
    one = instance(model.dummy_batch(1, seed=2), 0)
    heads = model.config.cross_heads
    results = []
    for kept in range(heads, -1, -1):  # keep the first `kept` heads of every attention module
        set_trimmer_bias(model, head_bias=1.0, zero_weights=True)
        with torch.no_grad():
            for trimmer in model.trimmers.modules():
                if isinstance(trimmer, HeadTrimmer):
                    trimmer.output_layer.bias[kept:] = -1.0
            ratio = float(model(one).keep_groups["heads"].mean())
        results.append((ratio, count_flops(model, one)))
    assert [r for r, _ in results] == pytest.approx([k / heads for k in range(heads, -1, -1)])
    macs = [m for _, m in results]
    assert all(a > b for a, b in zip(macs, macs[1:], strict=False)), macs


def test_flops_fall_with_the_score_threshold() -> None:
    """Random score networks, bias swept down: keep ratios and MACs both fall monotonically."""
    model = tiny(trim=smarttrim.TrimConfig(vision_head_trim=True))
    randomize_trimmers(model, seed=3, std=0.3)
    one = instance(model.dummy_batch(1, seed=3), 0)
    points = []
    for shift in (30.0, 1.0, 0.0, -1.0, -30.0):
        with torch.no_grad():
            for last in score_layers(model):
                last.bias.fill_(shift)
            keep = float(torch.cat(list(model.eval()(one).keep_groups.values())).mean())
        points.append((keep, count_flops(model, one)))
    keeps, macs = zip(*points, strict=True)
    assert keeps[0] > 0.85 and keeps[-1] < 0.25, keeps
    assert all(a >= b for a, b in zip(keeps, keeps[1:], strict=False)), keeps
    assert all(a > b for a, b in zip(macs, macs[1:], strict=False)), macs


def test_count_flops_needs_a_batch_of_one_and_ignores_padding() -> None:
    model = tiny()
    batch = model.dummy_batch(2, seed=4)
    with pytest.raises(ValueError, match="batch of one"):
        count_flops(model, batch)
    one = {k: v[1:2] for k, v in batch.items()}  # instance 1 is padded to the batch's longest text
    assert int(one["attention_mask"].sum()) < one["attention_mask"].shape[1]
    assert count_flops(model, one) == count_flops(model, instance(batch, 1))
    assert model.training, "count_flops restores the train/eval mode"


@pytest.mark.slow
def test_meter_base_keep_all_matches_the_paper() -> None:
    """METER-CLIP16-RoBERTa at 288^2 (11 CLIP blocks, as METER builds them), keep-all, a 10-token VQA
    question: the paper's Table 1 gives 48.3 G (torchprofile MACs); we count 48.37 G, of which 45.3 G in
    Linear layers, 0.19 G in the patch convolution and 2.8 G in the attention products."""
    torch.set_num_threads(2)
    try:
        model = smarttrim.build_model("meter-base", task="vqa", num_labels=3129).eval()
        one = model.dummy_batch(1, seed=0)
        one = {**one, "input_ids": one["input_ids"][:, :10], "attention_mask": one["attention_mask"][:, :10]}
        macs = count_flops(model, one)
        with torch.no_grad():
            analytic = analytic_macs(model, model(one), text_len=10)
    finally:
        torch.set_num_threads(1)
    assert abs(macs / 1e9 - 48.3) / 48.3 < 0.01, macs / 1e9
    assert abs(analytic - macs) / macs < 0.01
