"""Config validation: bad values name the field; unknown keys are errors; presets build."""

from __future__ import annotations

import pytest
import torch
from conftest import tiny

from smarttrim.config import PRESETS, ModelConfig, TrimConfig, model_config


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"token_target_vision": 0.0}, "token_target_vision"), ({"head_target": 1.5}, "head_target"),
    ({"tau": 0.0}, "tau"), ({"lambda_cost": -1.0}, "lambda_cost"), ({"curriculum": 2.0}, "curriculum"),
    ({"token_trimmer": "topk"}, "token_trimmer"), ({"vision_token_layers": (1, 1)}, "vision_token_layers"),
    ({"trimmer_dim": 1}, "trimmer_dim"), ({"init_keep_logit": -1.0}, "init_keep_logit"),
])
def test_trim_config_rejects_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        TrimConfig(**kwargs)


def test_trim_config_round_trips_and_rejects_unknown_keys() -> None:
    trim = TrimConfig(vision_token_layers=(1, 2), token_trimmer="local")
    assert TrimConfig.from_dict(trim.to_dict()) == trim
    with pytest.raises(ValueError, match="unknown keys"):
        TrimConfig.from_dict({"token_target": 0.5})


@pytest.mark.parametrize(("kwargs", "field"), [
    ({"image_size": 30}, "image_size"), ({"hidden_size": 65}, "hidden_size"), ({"task": "caption"}, "task"),
    ({"task": "nlvr2", "num_labels": 5}, "num_labels"), ({"dropout": 1.0}, "dropout"),
    ({"max_text_len": 600}, "max_text_len"),
])
def test_model_config_rejects_bad_values(kwargs: dict, field: str) -> None:
    with pytest.raises(ValueError, match=field):
        ModelConfig(**{"num_labels": 3129, **kwargs})


def test_presets() -> None:
    with pytest.raises(ValueError, match="preset"):
        model_config("meter-huge")
    with pytest.raises(ValueError, match="num_labels"):
        model_config("meter-tiny", task="vqa")
    assert model_config("meter-tiny", task="nlvr2").num_labels == 2
    base = model_config("meter-base", task="vqa", num_labels=3129)
    assert (base.image_size, base.patch_size, base.vision_width, base.vision_layers) == (288, 16, 768, 11)
    assert (base.text_hidden, base.text_layers, base.cross_layers, base.hidden_size, base.cross_heads) == (
        768, 12, 6, 768, 12)
    assert set(PRESETS) == {"meter-base", "meter-small", "meter-tiny"}
    small = model_config("meter-small", task="vqa", num_labels=20)
    assert small.num_patches == 144 and small.patch_stem == "conv_context" and base.patch_stem == "linear"
    with pytest.raises(ValueError, match="patch_stem"):
        model_config("meter-tiny", task="nlvr2", patch_stem="cnn")
    with pytest.raises(ValueError, match="power of 2"):
        model_config("meter-tiny", task="nlvr2", patch_stem="conv", patch_size=6, image_size=36)
    with pytest.raises(ValueError, match="power of 2"):
        model_config("meter-tiny", task="nlvr2", patch_stem="conv_context", patch_size=6, image_size=36)


@pytest.mark.parametrize("task", ["vqa", "nlvr2", "snli_ve", "retrieval"])
def test_every_task_runs_both_paths(task: str) -> None:
    model = tiny(task, trim=TrimConfig())
    batch = model.dummy_batch(2, seed=0)
    out = model(batch)
    # retrieval: one rank_output score per image-text pair, the true text and 2 false ones (METER's IRTR)
    shape = (2, 3) if task == "retrieval" else (2, model.config.num_labels)
    assert out.logits.shape == shape and torch.isfinite(out.loss)
    assert set(out.keep_groups) == {"vision_tokens", "text_tokens", "heads"}
    model.eval()
    with torch.no_grad():
        assert model(batch).logits.shape == shape


def test_bad_batches_raise_clear_errors() -> None:
    model = tiny()
    batch = model.dummy_batch(2)
    with pytest.raises(KeyError, match="pixel_values"):
        model({k: v for k, v in batch.items() if k != "pixel_values"})
    with pytest.raises(ValueError, match=r"pixel_values.*\(2, 3, 32, 32\)"):
        model({**batch, "pixel_values": torch.zeros(2, 3, 64, 64)})
    with pytest.raises(ValueError, match="labels"):
        model({**batch, "labels": torch.zeros(2, 7)})
    with pytest.raises(ValueError, match="attention_mask"):
        model({**batch, "attention_mask": batch["attention_mask"][:, :3]})
    with pytest.raises(ValueError, match="CLS"):
        model({**batch, "attention_mask": torch.zeros_like(batch["attention_mask"])})
    with pytest.raises(ValueError, match="path"):
        model(batch, path="fast")
    nlvr2 = tiny("nlvr2")
    with pytest.raises(ValueError, match=r"\(2, 2, 3, 32, 32\)"):
        nlvr2({**nlvr2.dummy_batch(2), "pixel_values": torch.zeros(2, 3, 32, 32)})


@pytest.mark.parametrize(("stem", "field"), [("conv", 15), ("conv_context", 31)])
def test_conv_stem_receptive_field(stem: str, field: int) -> None:
    """A token of the ``conv`` stem at patch 8 sees 15 x 15 pixels; ``conv_context`` adds a stride-1 3x3
    convolution at the patch grid, so 31 x 31 (the gradient of one output token is zero outside that window)."""
    import torch

    from smarttrim.model import conv_stem

    torch.manual_seed(0)
    net = conv_stem(8, 32, stem)
    image = torch.randn(1, 3, 96, 96, requires_grad=True)
    net(image)[0, :, 6, 6].sum().backward()
    rows, cols = (image.grad[0].abs().sum(0) > 0).nonzero(as_tuple=True)
    assert int(rows.max() - rows.min()) + 1 == field and int(cols.max() - cols.min()) + 1 == field
