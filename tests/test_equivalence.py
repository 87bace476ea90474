"""The tests that give real confidence in the trimming semantics (DESIGN.md, 'Trimming semantics')."""

from __future__ import annotations

import pytest
import torch
from conftest import instance, randomize_trimmers, score_layers, set_trimmer_bias, tiny

import smarttrim
from smarttrim.layers import Stream
from smarttrim.model import _Run
from smarttrim.trimmers import TokenTrimmer

ATOL = 1e-5


def _pair(task: str, **trim_kwargs: object) -> tuple[smarttrim.SmartTrimModel, smarttrim.SmartTrimModel]:
    """(plain backbone, trimmed model) sharing every backbone weight."""
    backbone = tiny(task)
    trimmed = tiny(task, trim=smarttrim.TrimConfig(**trim_kwargs))
    trimmed.load_backbone_state_dict(backbone.state_dict())
    return backbone, trimmed


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "snli_ve", "retrieval"])
def test_backbone_parameter_names_identical(task: str) -> None:
    backbone, trimmed = _pair(task, vision_head_trim=True)
    names = [k for k in trimmed.state_dict() if not k.startswith("trimmers.")]
    assert names == list(backbone.state_dict())
    assert any(k.startswith("trimmers.") for k in trimmed.state_dict())
    assert not any("trimmers" in k for k in backbone.state_dict())


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_keep_all_equals_backbone_inference(task: str) -> None:
    backbone, trimmed = _pair(task, vision_head_trim=True)
    batch = backbone.dummy_batch(4, seed=1)
    backbone.eval(), trimmed.eval()
    with torch.no_grad():
        ref, out = backbone(batch), trimmed(batch)
    assert all(bool((v == 1).all()) for v in out.keep.values()), "stable init must keep all in eval"
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss, ref.loss, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_keep_all_equals_backbone_training_path(task: str) -> None:
    # init_keep_logit 30: P(drop) = σ(-30) ~ 1e-13 per sampled decision, so training keeps everything and
    # the differentiable masked-softmax attention runs against the backbone's fused attention.
    backbone, trimmed = _pair(task, vision_head_trim=True, init_keep_logit=30.0)
    batch = backbone.dummy_batch(4, seed=2)
    backbone.train(), trimmed.train()
    ref, out = backbone(batch), trimmed(batch)
    assert all(bool((v == 1).all()) for v in out.keep.values())
    torch.testing.assert_close(out.logits, ref.logits, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.loss_parts["task"], ref.loss_parts["task"], atol=ATOL, rtol=0)


def test_vision_encoder_matches_timm_forward() -> None:
    """Our re-implemented ViT forward (needed for trimming) == timm's own forward_features: no drift."""
    model = tiny().eval()
    pv = model.dummy_batch(3)["pixel_values"]
    text_cls = torch.zeros(3, model.config.text_hidden)
    with torch.no_grad():
        ours = model._encode_image(pv, text_cls, _Run(None, sample=False, prune=True, tau=1.0)).x
        ref = model.backbone.vision.forward_features(pv)
    torch.testing.assert_close(ours, ref, atol=ATOL, rtol=0)


def _kept_rows(hidden: torch.Tensor, keep: torch.Tensor) -> list[torch.Tensor]:
    return [h[k > 0] for h, k in zip(hidden, keep, strict=True)]


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
@pytest.mark.parametrize("seed", [0, 1])
def test_masking_path_equals_pruning_path(task: str, seed: int) -> None:
    """Same (deterministic) hard decisions: the fixed-shape masked forward == the physically pruned one."""
    model = tiny(task, trim=smarttrim.TrimConfig(vision_head_trim=True)).eval()
    randomize_trimmers(model, seed=seed)
    batch = model.dummy_batch(4, seed=seed)
    with torch.no_grad():
        masked, pruned = model(batch, path="mask"), model(batch, path="prune")
    fractions = torch.cat([v for v in masked.keep.values()])
    assert 0.05 < float(fractions.mean()) < 0.95, "decisions must be mixed for this test to mean anything"
    assert pruned.image_hidden.shape[1] < masked.image_hidden.shape[1], "pruning must shrink the shapes"
    torch.testing.assert_close(pruned.logits, masked.logits, atol=ATOL, rtol=0)
    for name in masked.keep:
        torch.testing.assert_close(pruned.keep[name], masked.keep[name])
    for hidden, keep in (("text_hidden", "text_keep"), ("image_hidden", "image_keep")):
        rows_m = _kept_rows(getattr(masked, hidden), getattr(masked, keep))
        rows_p = _kept_rows(getattr(pruned, hidden), getattr(pruned, keep))
        for m, p in zip(rows_m, rows_p, strict=True):
            torch.testing.assert_close(p, m, atol=ATOL, rtol=0)


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_batched_pruning_equals_single_instances(task: str) -> None:
    """Packing instances with different kept tokens/heads (padding + key masks, union of heads + gates)
    gives each instance exactly what it gets alone."""
    model = tiny(task, trim=smarttrim.TrimConfig(vision_head_trim=True)).eval()
    randomize_trimmers(model, seed=3)
    batch = model.dummy_batch(4, seed=3)
    with torch.no_grad():
        batched = model(batch)
        singles = [model(instance(batch, i)) for i in range(4)]
    assert len({tuple(float(s.keep[k][0]) for k in s.keep) for s in singles}) > 1, "instances must differ"
    for i, single in enumerate(singles):
        torch.testing.assert_close(batched.logits[i : i + 1], single.logits, atol=ATOL, rtol=0)
        for name in single.keep:
            torch.testing.assert_close(batched.keep[name][i : i + 1], single.keep[name])


def test_pruning_batch_of_one_has_no_padding_or_gates() -> None:
    """A single instance runs exactly the kept tokens and heads: no key mask, no head gate."""
    model = tiny(trim=smarttrim.TrimConfig()).eval()
    randomize_trimmers(model, seed=4)
    one = instance(model.dummy_batch(2, seed=4), 0)
    with torch.no_grad():
        out = model(one)
    assert bool((out.image_keep == 1).all()) and bool((out.text_keep == 1).all())
    last = model.config.cross_layers - 1
    assert out.image_hidden.shape[1] == int(out.sizes[f"cross.image.{last}.tokens"][0])
    assert out.text_hidden.shape[1] == int(out.sizes[f"cross.text.{last}.tokens"][0])


@pytest.mark.parametrize("path", ["mask", "prune"])
def test_prefix_tokens_never_pruned(path: str) -> None:
    model = tiny("nlvr2", trim=smarttrim.TrimConfig()).eval()
    set_trimmer_bias(model, token_bias=-30.0, zero_weights=True)  # every trimmable token dropped
    batch = model.dummy_batch(3, seed=5)
    with torch.no_grad():
        out = model(batch, path=path)
    for name, fraction in out.keep.items():
        if name.endswith(".tokens"):
            assert bool((fraction == 0).all()), name
            assert bool((out.sizes[name] == 1).all()), f"{name}: only the prefix token survives"
    assert bool((out.text_keep[:, 0] == 1).all()) and bool((out.image_keep[:, 0] == 1).all())
    assert torch.isfinite(out.logits).all()


def test_stream_apply_keeps_prefix_and_padding_counts_as_pruned() -> None:
    x = torch.randn(2, 5, 3)
    keep = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.float)  # row 0: 2 padding slots
    s = Stream(x, keep, keep.sum(1) - 1)
    decision = torch.tensor([[0, 1, 0, 1, 1], [0, 0, 1, 1, 0]], dtype=torch.float)
    masked = s.apply(decision, prune=False)
    assert masked.keep.tolist() == [[1, 1, 0, 0, 0], [1, 0, 1, 1, 0]]
    torch.testing.assert_close(masked.kept_fraction(), torch.tensor([1 / 2, 2 / 4]))
    pruned = s.apply(decision, prune=True)
    assert pruned.x.shape == (2, 3, 3)  # packed to the longest kept row (3 tokens)
    assert pruned.keep.tolist() == [[1, 1, 0], [1, 1, 1]]
    torch.testing.assert_close(pruned.x[1], x[1, [0, 2, 3]])
    torch.testing.assert_close(pruned.x[0, :2], x[0, [0, 1]])
    # cumulative: a dropped token stays dropped whatever the next decision says
    again = masked.apply(torch.ones(2, 5), prune=False)
    assert again.keep.tolist() == masked.keep.tolist()


def test_inference_is_deterministic() -> None:
    model = tiny(trim=smarttrim.TrimConfig(token_trimmer="cross_modal")).eval()
    randomize_trimmers(model, seed=6)
    batch = model.dummy_batch(4, seed=6)
    with torch.no_grad():
        a, b = model(batch), model(batch)
    torch.testing.assert_close(a.logits, b.logits, atol=0, rtol=0)
    assert all(torch.equal(a.keep[k], b.keep[k]) for k in a.keep)


def test_trim_none_is_plain_backbone() -> None:
    model = tiny(trim=None)
    out = model(model.dummy_batch(2))
    assert model.trimmers is None and out.keep == {} and out.keep_groups == {}
    assert set(out.loss_parts) == {"task"}


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_training_path_with_hard_masks_equals_pruning_path(task: str) -> None:
    """Train mode (sampled straight-through masks, differentiable masked softmax, head gates with
    gradients) with saturated scores |π| >> 1, so the sampled masks are the deterministic decisions:
    the logits equal the pruning path's, and the gradient still reaches the trimmers."""
    model = tiny(task, trim=smarttrim.TrimConfig(vision_head_trim=True, self_distill=False))
    randomize_trimmers(model, seed=7)
    with torch.no_grad():  # scale every score network's output: |π| ~ 100s, Gumbel noise cannot flip it
        for last in score_layers(model):
            last.weight.mul_(300.0), last.bias.mul_(300.0)
        for trimmer in model.trimmers.modules():
            if isinstance(trimmer, TokenTrimmer):
                trimmer.w_k.weight.mul_(300.0)
    batch = model.dummy_batch(4, seed=7)
    model.eval()
    with torch.no_grad():
        pruned = model(batch)
    model.train()
    masked = model(batch)
    assert all(torch.equal(masked.keep[k], pruned.keep[k]) for k in pruned.keep), "masks must be the decisions"
    assert 0.05 < float(torch.cat(list(masked.keep.values())).detach().mean()) < 0.95
    torch.testing.assert_close(masked.logits, pruned.logits, atol=ATOL, rtol=0)
    masked.loss.backward()
    assert all(p.grad is not None for p in model.trimmers.parameters())
