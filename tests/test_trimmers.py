"""Trimmer modules, eq. 8's sampler, stable init, variants and gradient flow."""

from __future__ import annotations

import pytest
import torch
from conftest import randomize_trimmers, tiny

import smarttrim
from smarttrim.trimmers import HeadTrimmer, RandomTokenTrimmer, TokenTrimmer, decide, gumbel_sigmoid, random_rate


def test_gumbel_sigmoid_keep_probability_is_sigmoid_of_score() -> None:
    """Hard samples of σ((π + G' - G'')/τ) > 0.5 are 1 with probability σ(π), whatever τ."""
    logits = torch.tensor([-2.0, 0.0, 1.5]).repeat(200_000, 1)
    for tau in (0.5, 1.0, 2.0):
        samples = gumbel_sigmoid(logits, tau)
        assert set(samples.unique().tolist()) <= {0.0, 1.0}
        torch.testing.assert_close(samples.mean(0), torch.sigmoid(logits[0]), atol=4e-3, rtol=0)


def test_gumbel_sigmoid_straight_through_gradient_is_the_soft_samples() -> None:
    logits = torch.randn(64, requires_grad=True)
    torch.manual_seed(1)
    hard = gumbel_sigmoid(logits, tau=0.7)
    (hard * torch.arange(64.0)).sum().backward()
    torch.manual_seed(1)  # same noise, the soft sample written out by hand
    g1 = -torch.empty(64).exponential_().log()
    g2 = -torch.empty(64).exponential_().log()
    ref_logits = logits.detach().clone().requires_grad_(True)
    soft = torch.sigmoid((ref_logits + g1 - g2) / 0.7)
    assert torch.equal(hard.detach(), (soft > 0.5).float())
    (soft * torch.arange(64.0)).sum().backward()
    torch.testing.assert_close(logits.grad, ref_logits.grad)


def test_deterministic_decision_is_sigmoid_above_half() -> None:
    scores = torch.tensor([[-1.0, -1e-6, 1e-6, 3.0]])
    assert decide(scores, tau=1.0, sample=False).tolist() == [[0.0, 0.0, 1.0, 1.0]]


def test_token_trimmer_scores_follow_eqs_3_to_6() -> None:
    trimmer = TokenTrimmer(dim=8, self_dim=8, other_dim=6, trim_dim=4, kind="cross_modal", init_keep_logit=None)
    x, cs, cc = torch.randn(2, 5, 8), torch.randn(2, 8), torch.randn(2, 6)
    h = trimmer.proj(x)
    local = trimmer.local(h).squeeze(-1)
    g = trimmer.global_mlp(torch.cat([cs, cc], -1))
    glob = torch.stack([g[b] @ trimmer.w_k.weight.T @ h[b].T for b in range(2)])  # g W_k H'^T
    torch.testing.assert_close(trimmer(x, cs, cc), local + glob)
    local_only = TokenTrimmer(8, 8, 6, 4, "local", None)
    assert not hasattr(local_only, "global_mlp")
    torch.testing.assert_close(local_only(x, cs, cc), local_only.local(local_only.proj(x)).squeeze(-1))
    # the global score depends on the other modality's [CLS]; the local one does not
    assert not torch.allclose(trimmer(x, cs, cc), trimmer(x, cs, cc + 1))
    torch.testing.assert_close(local_only(x, cs, cc), local_only(x, cs, cc + 1))


def test_stable_init_scores_are_a_constant_keep() -> None:
    trimmer = TokenTrimmer(8, 8, 8, 4, "cross_modal", init_keep_logit=5.0)
    scores = trimmer(torch.randn(3, 7, 8), torch.randn(3, 8), torch.randn(3, 8))
    torch.testing.assert_close(scores, torch.full((3, 7), 5.0))
    heads = HeadTrimmer(16, 4, 4, init_keep_logit=5.0)
    torch.testing.assert_close(heads(torch.randn(3, 16)), torch.full((3, 4), 5.0))


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_stable_init_keeps_all_at_step_zero(task: str) -> None:
    model = tiny(task, trim=smarttrim.TrimConfig(vision_head_trim=True))
    batch = model.dummy_batch(4, seed=0)
    model.eval()
    with torch.no_grad():
        out = model(batch)
    assert all(bool((v == 1).all()) for v in out.keep.values())
    model.train()  # sampled: every decision keeps with probability σ(init_keep_logit) = 0.993
    kept = torch.cat(list(model(batch).keep_groups.values())).detach()
    assert float(kept.mean()) > 0.98
    unstable = tiny(task, trim=smarttrim.TrimConfig(vision_head_trim=True, stable_init=False)).train()
    kept = torch.cat([v.detach() for k, v in unstable(batch).keep.items() if k.endswith("heads")])
    assert 0.2 < float(kept.mean()) < 0.8, "without stable init, heads are kept at random (σ(π) ~ 0.5)"


@pytest.mark.parametrize("stable_init", [True, False])
@pytest.mark.parametrize("kind", ["cross_modal", "local"])
def test_gradients_reach_every_trimmer(stable_init: bool, kind: str) -> None:
    model = tiny("vqa", trim=smarttrim.TrimConfig(token_trimmer=kind, vision_head_trim=True,
                                                  stable_init=stable_init)).train()
    if not stable_init:
        randomize_trimmers(model, seed=1)
    model(model.dummy_batch(8, seed=1)).loss.backward()
    for name, module in model.trimmers.named_children():
        for key, trimmer in module.items():
            grads = [p.grad for p in trimmer.parameters()]
            assert all(g is not None and torch.isfinite(g).all() for g in grads), f"{name}.{key}"
            assert any(float(g.abs().sum()) > 0 for g in grads), f"{name}.{key}: no gradient"
            if not stable_init:  # no zero-initialized layer blocks the flow: every tensor gets gradient
                assert all(float(g.abs().sum()) > 0 for g in grads), f"{name}.{key}"


def test_random_trimmer_keeps_the_target_ratio() -> None:
    for target, k in ((0.5, 1), (0.5, 4), (0.3, 6)):
        r = random_rate(target, k)
        assert abs(sum(r**i for i in range(1, k + 1)) / k - target) < 1e-9
    model = tiny(trim=smarttrim.TrimConfig(token_trimmer="random", token_target_vision=0.5,
                                           token_target_text=0.6)).eval()
    assert all(isinstance(t, RandomTokenTrimmer) for t in model.trimmers.vision_tokens.values())
    assert not any(p for n, p in model.trimmers.named_parameters() if "tokens" in n)
    batch = model.dummy_batch(32, seed=2)
    with torch.no_grad():
        groups = model(batch).keep_groups
    assert abs(float(groups["vision_tokens"].mean()) - 0.5) < 0.08
    assert abs(float(groups["text_tokens"].mean()) - 0.6) < 0.1
    assert float(groups["vision_tokens"].std()) > 0


def test_placement_and_targets_configure_the_trimmers() -> None:
    trim = smarttrim.TrimConfig(vision_token_layers=(2,), cross_token_layers=(1,), token_target_text=1.0,
                                cross_head_trim=False)
    model = tiny(trim=trim)
    t = model.trimmers
    assert list(t.vision_tokens) == ["2"] and list(t.image_tokens) == ["1"] and len(t.text_tokens) == 0
    assert all(len(getattr(t, f"{s}_{a}_heads")) == 0 for s in ("text", "image") for a in ("msa", "mca"))
    out = model.eval()(model.dummy_batch(2))
    assert set(out.keep) == {"vision.2.tokens", "cross.image.1.tokens"}
    assert set(out.keep_groups) == {"vision_tokens"}
    with pytest.raises(ValueError, match="vision_token_layers"):
        tiny(trim=smarttrim.TrimConfig(vision_token_layers=(9,)))
