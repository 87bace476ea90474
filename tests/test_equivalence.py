"""The tests that give real confidence in the trimming semantics (docs/ARCHITECTURE.md, "Trimming semantics")."""

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


@pytest.mark.parametrize("train", [False, True])
def test_text_encoder_forward_equals_transformers_roberta(train: bool) -> None:
    """Our lean RoBERTa forward on transformers' modules == ``RobertaModel.forward`` (padding included)."""
    from smarttrim.layers import roberta_forward

    model = tiny()
    model.train(train)
    batch = model.dummy_batch(4, seed=8)  # rows of different lengths: right padding
    assert not bool(batch["attention_mask"].all())
    text = model.backbone.text
    with torch.no_grad():
        ref = text(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        ours = roberta_forward(text, batch["input_ids"], batch["attention_mask"])
        one = {k: v[:1] for k, v in batch.items()}  # the longest row: no padding, no mask at all
        ref_one = text(input_ids=one["input_ids"], attention_mask=one["attention_mask"]).last_hidden_state
        ours_one = roberta_forward(text, one["input_ids"], one["attention_mask"])
    real = batch["attention_mask"].bool()
    torch.testing.assert_close(ours[real], ref[real], atol=ATOL, rtol=0)
    torch.testing.assert_close(ours_one, ref_one, atol=ATOL, rtol=0)


def _reference_attention(q, k, v, keep, scale):  # type: ignore[no-untyped-def]
    """Masked attention written out: exp(s - max) * m / sum, differentiable in m."""
    s = (q @ k.transpose(-1, -2)) * scale
    e = torch.exp(s - s.amax(-1, keepdim=True).detach()) * keep[:, None, None, :]
    return (e / e.sum(-1, keepdim=True)) @ v


def test_masked_attention_gradients_are_exact() -> None:
    """q, k, v and the mask get the gradients of the written-out formula, including the top-scoring key of
    every query (a clamp at the row maximum once zeroed those) and the would-be weights of pruned keys."""
    from smarttrim.trimmers import masked_attention

    g = torch.Generator().manual_seed(9)
    q, k, v = (torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(3))
    keep = torch.tensor([[1, 0, 1, 1, 0], [1, 1, 1, 0, 1]], dtype=torch.float64, requires_grad=True)
    out_grad = torch.randn(2, 3, 5, 4, generator=g, dtype=torch.float64)
    ref = torch.autograd.grad((_reference_attention(q, k, v, keep, 0.5) * out_grad).sum(), (q, k, v, keep))
    ours = masked_attention(q, k, v, keep, 0.5, 0.0)
    got = torch.autograd.grad((ours * out_grad).sum(), (q, k, v, keep))
    torch.testing.assert_close(ours, _reference_attention(q, k, v, keep, 0.5), atol=1e-12, rtol=0)
    for name, a, b in zip("qkvm", got, ref, strict=True):
        torch.testing.assert_close(a, b, atol=1e-10, rtol=0, msg=name)
    assert float(got[3][keep == 0].abs().min()) > 0, "pruned keys get a straight-through gradient"
    assert torch.autograd.gradcheck(lambda q, k, v: masked_attention(q, k, v, keep.detach(), 0.5, 0.0), (q, k, v))
    # without gradients it matches PyTorch's fused kernel with a boolean mask
    with torch.no_grad():
        fused = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=(keep > 0)[:, None, None, :],
                                                                 scale=0.5)
        torch.testing.assert_close(masked_attention(q, k, v, keep, 0.5, 0.0), fused, atol=1e-12, rtol=0)


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_kept_positions_agree_between_paths(task: str) -> None:
    """The pruning path tracks where each surviving token came from: the same positions the masking path keeps."""
    model = tiny(task, trim=smarttrim.TrimConfig()).eval()
    randomize_trimmers(model, seed=10)
    batch = model.dummy_batch(4, seed=10)
    with torch.no_grad():
        masked, pruned = model(batch, path="mask"), model(batch, path="prune")
        single = model(instance(batch, 1), path="prune")
    for kind in ("image", "text"):
        keep_m, keep_p = getattr(masked, f"{kind}_keep"), getattr(pruned, f"{kind}_keep")
        pos_p = getattr(pruned, f"{kind}_positions")
        for row in range(keep_m.shape[0]):
            want = keep_m[row].nonzero().flatten().tolist()
            assert sorted(pos_p[row][keep_p[row] > 0].tolist()) == want, (kind, row)
    rows = 2 if task == "nlvr2" else 1  # NLVR2: two image passes per instance
    for r in range(rows):  # alone, an instance keeps the positions it keeps packed in the batch
        batched = pruned.image_positions[rows + r][pruned.image_keep[rows + r] > 0]
        alone = single.image_positions[r][single.image_keep[r] > 0]  # NLVR2: two passes are packed too
        assert sorted(alone.tolist()) == sorted(batched.tolist())


def test_head_slices_are_cached_for_inference_and_follow_weight_updates() -> None:
    from smarttrim.layers import head_slice

    layer = torch.nn.Linear(8, 12)  # 3 heads of 4 output features
    index = torch.tensor([0, 2])
    with torch.no_grad():
        w, b = head_slice(layer, index, 3, 0)
        torch.testing.assert_close(w, layer.weight[[0, 1, 2, 3, 8, 9, 10, 11]])
        assert head_slice(layer, index, 3, 0)[0] is w, "the same kept heads reuse one slice"
        layer.weight.add_(1.0)  # an optimizer step: the cache notices
        w2, _ = head_slice(layer, index, 3, 0)
        torch.testing.assert_close(w2, layer.weight[[0, 1, 2, 3, 8, 9, 10, 11]])
        cols, none = head_slice(torch.nn.Linear(12, 5), torch.tensor([1]), 3, 1)
        assert cols.shape == (5, 4) and none is None
    trained = head_slice(layer, index, 3, 0)[0]  # with gradients: a fresh, differentiable slice
    assert trained.requires_grad and trained is not w2


def test_fused_guides_equal_the_separate_networks_and_follow_weight_updates() -> None:
    """Inference computes a co-attention layer's guide networks (token trimmers' g W_k, head trimmers' scores) as
    one: the same values as each network alone, rebuilt when a weight changes."""
    model = tiny(trim=smarttrim.TrimConfig()).eval()
    randomize_trimmers(model, seed=5)
    tr = model.trimmers
    h = model.config.hidden_size
    c_t, c_i = torch.randn(3, h), torch.randn(3, h)

    def separate(layer: int) -> dict[str, torch.Tensor]:
        return {"text_tokens": tr.get("text_tokens", layer).global_query(c_t, c_i),
                "image_tokens": tr.get("image_tokens", layer).global_query(c_i, c_t),
                "text_msa_heads": tr.get("text_msa_heads", layer)(c_t),
                "text_mca_heads": tr.get("text_mca_heads", layer)(torch.cat([c_t, c_i], -1)),
                "image_msa_heads": tr.get("image_msa_heads", layer)(c_i),
                "image_mca_heads": tr.get("image_mca_heads", layer)(torch.cat([c_i, c_t], -1))}

    with torch.no_grad():
        for layer in range(model.config.cross_layers):
            fused, flags = tr.fused_guides(layer)(c_t, c_i)
            want = separate(layer)
            assert fused.keys() == want.keys() and not flags, "host decisions only for a batch of one"
            for name, value in want.items():
                torch.testing.assert_close(fused[name], value, atol=1e-5, rtol=1e-5)
        one, flags = tr.fused_guides(0)(c_t[:1], c_i[:1])
        assert flags["image_mca_heads"] == (one["image_mca_heads"][0] > 0).tolist()
        first = tr.fused_guides(0)
        assert tr.fused_guides(0) is first, "built once per weight version"
        tr.get("image_mca_heads", 0).output_layer.bias.add_(1.0)
        assert tr.fused_guides(0) is not first
        torch.testing.assert_close(tr.fused_guides(0)(c_t, c_i)[0]["image_mca_heads"], separate(0)["image_mca_heads"],
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
@pytest.mark.parametrize(("grouped", "attention"), [(False, "padded"), (False, "per_instance"),
                                                    (True, "per_instance")])
def test_fast_paths_equal_the_reference_pruning_path(task: str, grouped: bool, attention: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """The inference fast paths (packed kept tokens; attention on the batch padded to its longest instance or
    instance by instance on the packed rows; kept heads by runs of consecutive heads on a head-major weight copy, no
    per-call weight slices; instances that keep different heads run as their union or, ``grouped``, in groups of
    equal heads) give the reference pruning path's values, on a mixed batch whose instances keep different tokens and
    heads and on its instances alone; and they really run (counted)."""
    from smarttrim import layers, packed

    if grouped:  # grouping whenever it saves any work (at this size the cost model keeps the union)
        monkeypatch.setattr(packed, "OP_OVERHEAD_MACS", 0)
    modes = {"per_instance": 0, "padded": 0}

    def forced(pq: packed.Packing, pkv: packed.Packing, width: int) -> bool:
        modes[attention] += pq.b > 1
        return attention == "per_instance"

    monkeypatch.setattr(packed, "per_instance", forced)
    groups = {"n": 0}
    real_groups = packed.head_groups

    def counted_groups(*args: object, **kwargs: object) -> list[packed.HeadGroup] | None:
        found = real_groups(*args, **kwargs)
        groups["n"] += found is not None
        return found

    monkeypatch.setattr(packed, "head_groups", counted_groups)

    torch.manual_seed(5)
    model = tiny(task, trim=smarttrim.TrimConfig(vision_head_trim=True)).eval()
    randomize_trimmers(model, seed=5)
    batch = model.dummy_batch(6, seed=5)
    _mix_head_decisions(model, batch)
    calls = {"fast": 0, "gated": 0}
    real, decide = layers.head_attention, layers.Heads.from_decision

    def counted(*args: object, **kwargs: object) -> torch.Tensor:
        calls["fast"] += 1
        return real(*args, **kwargs)

    def gated(decision: torch.Tensor, prune: bool) -> layers.Heads:
        heads = decide(decision, prune)
        calls["gated"] += heads.gate is not None  # instances of the batch keep different heads
        return heads

    monkeypatch.setattr(layers, "head_attention", counted)
    monkeypatch.setattr(layers.Heads, "from_decision", staticmethod(gated))
    with torch.no_grad():
        fast = model(batch)
        fast_singles = [model(instance(batch, i)) for i in range(6)]
        ran = calls["fast"]
        with layers.reference_path():
            ref = model(batch)
            ref_singles = [model(instance(batch, i)) for i in range(6)]
    assert ran > 0 and calls["fast"] == ran, "the fast path ran, and the reference path did not use it"
    assert calls["gated"] > 0, "some module of the batch ran instances that keep different heads"
    assert (groups["n"] > 0) == grouped, "grouped by their heads exactly when asked"
    assert modes[attention] > 0, f"{attention} attention ran on batches of several instances"
    torch.testing.assert_close(fast.logits, ref.logits, atol=ATOL, rtol=0)
    for f, r in zip(fast_singles, ref_singles, strict=True):
        torch.testing.assert_close(f.logits, r.logits, atol=ATOL, rtol=0)
    for name in ref.keep:
        torch.testing.assert_close(fast.keep[name], ref.keep[name])


def _mix_head_decisions(model: smarttrim.SmartTrimModel, batch: dict[str, torch.Tensor]) -> None:
    """Make every head trimmer's decisions differ between the instances of ``batch``: its scores become 100x their
    deviation from their mean over the batch (a random tiny model's [CLS] features, which head trimmers read, barely
    differ between instances, so their decisions would all agree)."""
    from smarttrim.trimmers import HeadTrimmer

    seen: dict[HeadTrimmer, torch.Tensor] = {}
    trimmers = [m for m in model.trimmers.modules() if isinstance(m, HeadTrimmer)]
    hooks = [m.register_forward_hook(lambda m, a, out: seen.__setitem__(m, out.detach().mean(0))) for m in trimmers]
    with torch.enable_grad():  # the unfused path: each head trimmer runs as a module (hooks see it)
        model(batch)
    for h in hooks:
        h.remove()
    with torch.no_grad():
        for m in trimmers:
            last = m.output_layer
            last.bias.sub_(seen[m]).mul_(100.0)
            last.weight.mul_(100.0)


def test_head_runs_and_head_major_layout() -> None:
    from smarttrim.layers import head_major, head_runs, output_runs, project_runs

    assert head_runs((0, 1, 2, 5, 7, 8)) == ((0, 3), (5, 6), (7, 9)) and head_runs(()) == ()
    torch.manual_seed(0)
    q, k, v = (torch.nn.Linear(12, 12) for _ in range(3))  # 3 heads of 4
    owner = torch.nn.Module()
    weight, bias = head_major(owner, tuple((m.weight, m.bias) for m in (q, k, v)), 3, "qkv")
    assert head_major(owner, tuple((m.weight, m.bias) for m in (q, k, v)), 3, "qkv")[0] is weight, "cached"
    x = torch.randn(2, 5, 12)
    qh, kh, vh = project_runs(x, weight, bias, head_runs((0, 2)), 3, 4)
    for got, lin in ((qh, q), (kh, k), (vh, v)):
        full = lin(x).view(2, 5, 3, 4).transpose(1, 2)  # (B, H, N, Dh)
        torch.testing.assert_close(got, full[:, [0, 2]])
    out = torch.nn.Linear(12, 7)
    ctx = torch.randn(2, 5, 8)  # heads 0 and 2
    ref = torch.nn.functional.linear(ctx, out.weight[:, [0, 1, 2, 3, 8, 9, 10, 11]], out.bias)
    torch.testing.assert_close(output_runs(ctx, out, head_runs((0, 2)), 4), ref)
    with torch.no_grad():
        q.weight.add_(1.0)  # a new weight version: rebuilt
    assert not torch.equal(head_major(owner, tuple((m.weight, m.bias) for m in (q, k, v)), 3, "qkv")[0], weight)


def test_fast_paths_run_under_bf16_autocast(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under autocast (bf16 projections, fp32 residual stream) the packed and grouped paths place values of the
    projections' dtype (index_put_ and index_copy_ need matching dtypes) and stay close to the reference path."""
    from smarttrim import layers, packed

    monkeypatch.setattr(packed, "OP_OVERHEAD_MACS", 0)  # the grouped path too
    torch.manual_seed(5)
    model = tiny("vqa", trim=smarttrim.TrimConfig(vision_head_trim=True)).eval()
    randomize_trimmers(model, seed=5)
    batch = model.dummy_batch(6, seed=5)
    _mix_head_decisions(model, batch)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        fast = model(batch)
        with layers.reference_path():
            ref = model(batch)
    torch.testing.assert_close(fast.logits.float(), ref.logits.float(), atol=5e-2, rtol=5e-2)
