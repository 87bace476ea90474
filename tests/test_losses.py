"""Eqs. 9-12 against hand computations, and the curriculum scheduler."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import randomize_trimmers, tiny

import smarttrim
from smarttrim.losses import cost_loss, distill_kl, task_loss


def test_cost_loss_hand_computed() -> None:
    groups = {"vision_tokens": torch.tensor([0.2, 0.6]), "text_tokens": torch.tensor([1.0, 0.5]),
              "heads": torch.tensor([0.75, 0.75])}
    gamma = {"vision_tokens": 0.5, "text_tokens": 0.5, "heads": 0.25}
    # β = (0.4, 0.75, 0.75); ((0.4-0.5)^2 + (0.75-0.5)^2 + (0.75-0.25)^2) / 3
    expected = (0.01 + 0.0625 + 0.25) / 3
    assert math.isclose(float(cost_loss(groups, gamma)), expected, rel_tol=1e-6)
    with pytest.raises(ValueError):
        cost_loss({}, gamma)


def test_distill_kl_hand_computed() -> None:
    trimmed, full = torch.tensor([[1.0, 0.0, -1.0]]), torch.tensor([[0.0, 2.0, 0.0]])
    p = torch.softmax(full, -1)[0].tolist()
    q = torch.softmax(trimmed, -1)[0].tolist()
    expected = sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))  # KL(full || trimmed)
    assert math.isclose(float(distill_kl("nlvr2", trimmed, full)), expected, rel_tol=1e-5)
    # VQA: independent Bernoullis per answer, summed over answers
    sig = lambda v: 1 / (1 + math.exp(-v))
    bern = sum(sig(f) * math.log(sig(f) / sig(t)) + (1 - sig(f)) * math.log((1 - sig(f)) / (1 - sig(t)))
               for t, f in zip(trimmed[0].tolist(), full[0].tolist(), strict=True))
    assert math.isclose(float(distill_kl("vqa", trimmed, full)), bern, rel_tol=1e-5)
    assert float(distill_kl("vqa", full, full)) == pytest.approx(0.0, abs=1e-7)
    # the full model is the (detached) target
    full_param, trimmed_param = full.clone().requires_grad_(True), trimmed.clone().requires_grad_(True)
    distill_kl("snli_ve", trimmed_param, full_param).backward()
    assert full_param.grad is None and trimmed_param.grad is not None


def test_task_losses_as_meter() -> None:
    logits, soft = torch.tensor([[0.5, -1.0, 2.0]]), torch.tensor([[1.0, 0.0, 0.3]])
    bce = -sum(y * math.log(1 / (1 + math.exp(-x))) + (1 - y) * math.log(1 - 1 / (1 + math.exp(-x)))
               for x, y in zip(logits[0].tolist(), soft[0].tolist(), strict=True))
    assert math.isclose(float(task_loss("vqa", logits, soft)), bce, rel_tol=1e-5)  # summed over answers
    assert math.isclose(float(task_loss("nlvr2", logits[:, :2], torch.tensor([1]))),
                        float(F.cross_entropy(logits[:, :2], torch.tensor([1]))))


def test_curriculum_schedule() -> None:
    trim = smarttrim.TrimConfig(token_target_vision=0.4, token_target_text=0.6, head_target=0.5, curriculum=0.5)
    assert trim.gamma(0.0) == {"vision_tokens": 1.0, "text_tokens": 1.0, "heads": 1.0}
    g = trim.gamma(0.25)  # halfway through the ramp
    assert g["vision_tokens"] == pytest.approx(0.7) and g["heads"] == pytest.approx(0.75)
    assert trim.gamma(0.5) == pytest.approx(trim.targets)
    assert trim.gamma(1.0) == pytest.approx(trim.targets)
    off = smarttrim.TrimConfig(curriculum=0.0)
    assert off.gamma(0.0) == pytest.approx(off.targets)


def test_retrieval_loss_is_meters_rank_softmax_over_one_true_and_n_false_texts() -> None:
    """METER's ``compute_irtr``: every image is scored with each of its 1 + N texts by ``rank_output`` on the pair's
    pooled features, one forward per pair; the loss is the cross-entropy of the softmax over them, the true text
    (first) as class 0. Not the binary ITM head: it gets no gradient (METER freezes it)."""
    model = tiny("retrieval")
    with torch.no_grad():  # a rank_output unlike its start (the ITM head's match row)
        model.rank_output.weight.normal_(0.0, 0.3)
    model.train()
    batch = model.dummy_batch(3, seed=4, false_texts=3)
    assert batch["input_ids"].shape[:2] == (3, 4) and batch["labels"].tolist() == [0, 0, 0]
    out = model(batch)
    assert out.logits.shape == (3, 4)
    for b in range(3):
        for k in range(4):
            pair = {"pixel_values": batch["pixel_values"][b:b + 1], "input_ids": batch["input_ids"][b, k:k + 1],
                    "attention_mask": batch["attention_mask"][b, k:k + 1]}
            torch.testing.assert_close(out.logits[b, k], model(pair).logits[0, 0], atol=1e-5, rtol=0)
    scores = out.logits.detach().double().tolist()
    expected = sum(math.log(sum(math.exp(s) for s in row)) - row[0] for row in scores) / 3
    assert float(out.loss.detach()) == pytest.approx(expected, rel=1e-5) and set(out.loss_parts) == {"task"}
    out.loss.backward()
    assert model.rank_output.weight.grad is not None and model.head[0].weight.grad is None
    with pytest.raises(ValueError, match=r"\(B, K, T\) groups"):
        model({**model.dummy_batch(3, with_labels=False), "labels": torch.zeros(3, dtype=torch.long)})


def test_retrieval_groups_trim_each_pair_and_report_the_image_mean() -> None:
    """Trimming works per image-text pair in a group (the visual trimmers read each pair's text); an image's keep
    ratio is the mean of its pairs' (as NLVR2's two passes), and the trimmers get gradients from the rank loss."""
    model = tiny("retrieval", trim=smarttrim.TrimConfig(vision_head_trim=True))
    randomize_trimmers(model, seed=2, std=0.3)
    batch = model.dummy_batch(2, seed=5, false_texts=2)
    model.eval()
    with torch.no_grad():
        out = model(batch)
        for b in range(2):
            pairs = {"pixel_values": batch["pixel_values"][b:b + 1].expand(3, -1, -1, -1),
                     "input_ids": batch["input_ids"][b], "attention_mask": batch["attention_mask"][b]}
            one = model(pairs)
            torch.testing.assert_close(out.logits[b], one.logits[:, 0], atol=1e-5, rtol=0)
            for g, v in one.keep_groups.items():
                torch.testing.assert_close(out.keep_groups[g][b], v.mean(), atol=1e-6, rtol=0)
    assert out.keep_groups["vision_tokens"].max() < 1, "the pairs are really trimmed"
    model.train()
    out = model(batch)
    assert set(out.loss_parts) == {"task", "cost", "sd_task", "sd_kl", "sd"}
    out.loss.backward()
    assert all(p.grad is not None for p in model.trimmers.parameters())


@pytest.mark.parametrize("task", ["vqa", "snli_ve", "retrieval"])
@pytest.mark.parametrize("progress", [0.0, 0.3, 1.0])
def test_total_loss_is_eq_12(task: str, progress: float) -> None:
    trim = smarttrim.TrimConfig(lambda_cost=20.0, lambda_sd=1.0, vision_head_trim=True)
    model = tiny(task, trim=trim).train()
    randomize_trimmers(model, seed=0)
    model.set_progress(progress)
    batch = model.dummy_batch(4, seed=0)
    out = model(batch)
    parts = out.loss_parts
    gamma = trim.gamma(progress)
    beta = {g: float(v.detach().mean()) for g, v in out.keep_groups.items()}
    cost = sum((beta[g] - gamma[g]) ** 2 for g in beta) / len(beta)
    assert float(parts["cost"].detach()) == pytest.approx(cost, rel=1e-5)
    # keep_groups are the per-group means of the per-module keep ratios
    members = {"heads": lambda k: k.endswith("heads"),
               "text_tokens": lambda k: k.startswith("cross.text.") and k.endswith(".tokens"),
               "vision_tokens": lambda k: k.endswith(".tokens") and not k.startswith("cross.text.")}
    for group, is_member in members.items():
        mods = [v for k, v in out.keep.items() if is_member(k)]
        torch.testing.assert_close(out.keep_groups[group], torch.stack(mods).mean(0))
    # self-distillation: the full-capacity forward is the plain backbone on the same weights
    backbone = tiny(task).train()
    backbone.load_backbone_state_dict(model.backbone_state_dict())
    ref = backbone(batch)
    torch.testing.assert_close(parts["sd_task"], ref.loss_parts["task"], atol=1e-5, rtol=0)
    kl = distill_kl(task, out.logits, ref.logits)
    torch.testing.assert_close(parts["sd_kl"], kl, atol=1e-5, rtol=0)
    total = parts["task"] + 20.0 * parts["cost"] + 1.0 * (parts["sd_task"] + parts["sd_kl"])
    torch.testing.assert_close(out.loss, total)


def test_switches_remove_their_terms() -> None:
    model = tiny(trim=smarttrim.TrimConfig(self_distill=False)).train()
    out = model(model.dummy_batch(2))
    assert set(out.loss_parts) == {"task", "cost"}
    torch.testing.assert_close(out.loss, out.loss_parts["task"] + 20.0 * out.loss_parts["cost"])
    model.eval()
    with torch.no_grad():
        out = model(model.dummy_batch(2))
    assert set(out.loss_parts) == {"task"} and torch.equal(out.loss, out.loss_parts["task"])
    with pytest.raises(ValueError, match="progress"):
        model.set_progress(1.5)
