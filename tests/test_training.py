"""The toy VQA data (fast) and end-to-end training of SmartTrim on it (slow, ~1 minute on 2 CPU cores)."""

from __future__ import annotations

import statistics
import time

import numpy as np
import pytest
import torch

import smarttrim
from smarttrim import toydata
from smarttrim.demo import DEFAULT_FINETUNE_LR, evaluate, measure_macs, smarttrim_config, train
from smarttrim.toydata import ANSWERS, COLOR_NAMES, NUM_LABELS, SHAPES, VOCAB, make_toy_vqa

# ---------------------------------------------------------------------------------------------- toy data


def _decode_scene(pixels: torch.Tensor) -> dict[tuple[str, str], int]:
    """Independent reading of one image: {(color, shape): cell} from the pixels alone.

    A pixel belongs to an object when one of its channels is far from the gray background (objects are
    saturated colors); the shape is the closest pattern, the color the nearest palette entry.
    """
    img = pixels.numpy() * toydata.CLIP_STD[:, None, None] + toydata.CLIP_MEAN[:, None, None]  # (3, 32, 32)
    cells = img.reshape(3, 4, 8, 4, 8).transpose(1, 3, 2, 4, 0).reshape(16, 8, 8, 3)
    palette = np.array(list(toydata.COLORS.values()))
    scene = {}
    gray = np.median(img.mean(0))  # most cells are background
    for cell, patch in enumerate(cells):
        mask = np.abs(patch - gray).max(-1) > 0.3
        if mask.sum() < 8:
            continue
        shape = int(np.argmin([(mask != p).sum() for p in toydata.PATTERNS]))
        color = int(np.argmin(((palette - patch[mask].mean(0)) ** 2).sum(1)))
        scene[(COLOR_NAMES[color], SHAPES[shape])] = cell
    return scene


def _answer(scene: dict[tuple[str, str], int], question: list[str]) -> tuple[str, int]:
    """Answer a question (fillers ignored) from a decoded scene -> (answer, answering cell or -1)."""
    words = [w for w in question if w not in toydata.FILLERS]
    if words[:2] == ["what", "color"]:
        ((color, cell),) = [(c, i) for (c, s), i in scene.items() if s == words[4]]
        return color, cell
    if words[:2] == ["what", "shape"]:
        ((shape, cell),) = [(s, i) for (c, s), i in scene.items() if c == words[4]]
        return shape, cell
    assert words[:3] == ["is", "there", "a"]
    return ("yes" if (words[3], words[4]) in scene else "no"), -1


def test_toy_batch_format_and_vocabulary() -> None:
    data = make_toy_vqa(300, seed=3)
    n, t = data.input_ids.shape
    assert n == len(data) == 300 and t <= toydata.MAX_TEXT_LEN <= 24
    assert data.pixel_values.shape == (300, 3, 32, 32) and data.pixel_values.dtype == torch.float32
    assert data.labels.shape == (300, NUM_LABELS) and data.labels.dtype == torch.float32
    assert data.input_ids.dtype == data.attention_mask.dtype == torch.long
    lengths = data.attention_mask.sum(1)
    assert bool((data.attention_mask == (torch.arange(t)[None] < lengths[:, None]).long()).all())
    assert bool((data.input_ids[:, 0] == 0).all()), "every question starts with bos = [CLS]"
    assert bool((data.input_ids.gather(1, lengths[:, None] - 1) == 2).all()), "eos closes every question"
    words = data.input_ids[:, 1:][data.attention_mask[:, 1:].bool()]
    words = words[words != 2]
    assert int(words.min()) >= 3 and int(words.max()) < len(VOCAB) <= 512
    assert bool((data.input_ids[data.attention_mask == 0] == 1).all()), "padding uses pad id 1"
    assert len(set(lengths.tolist())) >= 8, "filler words must make question lengths vary"
    # the batch dict the model takes (text padding trimmed to the longest question of the batch)
    batch = data.batch(torch.arange(8))
    assert set(batch) == {"pixel_values", "input_ids", "attention_mask", "labels"}
    assert batch["input_ids"].shape[1] == int(lengths[:8].max())
    model = smarttrim.build_model("meter-tiny", task="vqa", num_labels=NUM_LABELS, trim=smarttrim_config())
    out = model(batch)
    assert out.loss is not None and bool(torch.isfinite(out.loss))


def test_toy_data_is_deterministic_by_seed() -> None:
    a, b, c = make_toy_vqa(200, seed=7), make_toy_vqa(200, seed=7), make_toy_vqa(200, seed=8)
    for name in ("pixel_values", "input_ids", "attention_mask", "labels", "answer", "qtype", "target_cell"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name
    assert not torch.equal(a.pixel_values, c.pixel_values) and not torch.equal(a.labels, c.labels)


def test_toy_labels_are_vqa_soft_scores() -> None:
    data = make_toy_vqa(2000, seed=0)
    values = {round(v, 4) for v in data.labels.unique().tolist()}
    assert values <= {0.0, 0.3, 0.6, 0.9, 1.0}
    assert len(values) >= 4, "simulated annotators must produce soft scores (0.3 / 0.6 ...)"
    # the true answer gets the best score; wrong votes stay within the question type
    best = data.labels.max(1).values
    assert bool((data.labels.gather(1, data.answer[:, None]).squeeze(1) == best).all())
    assert float(best.mean()) > 0.95
    kinds = torch.tensor([0] * len(COLOR_NAMES) + [1] * len(SHAPES) + [2, 2])  # answer kind per label
    assert bool(((data.labels > 0) <= (kinds[None] == data.qtype[:, None])).all())
    assert {ANSWERS[i] for i in data.answer.unique().tolist()} == set(ANSWERS)
    # without annotator noise, labels are the one-hot true answer
    clean = make_toy_vqa(200, seed=0, annotator_noise=0.0)
    assert torch.equal(clean.labels, torch.nn.functional.one_hot(clean.answer, NUM_LABELS).float())
    # a baseline that always answers the most frequent training answer
    val = make_toy_vqa(500, seed=1)
    baseline = toydata.majority_baseline(data.labels, val.labels)
    assert 0.1 < baseline < 0.4


def test_toy_answer_is_determined_by_image_and_question() -> None:
    data = make_toy_vqa(300, seed=11)
    inv = {i: w for w, i in VOCAB.items()}
    for i in range(len(data)):
        n = int(data.attention_mask[i].sum())
        question = [inv[int(t)] for t in data.input_ids[i, 1:n - 1]]
        scene = _decode_scene(data.pixel_values[i])
        assert 2 <= len(scene) <= 4
        answer, cell = _answer(scene, question)
        assert ANSWERS[int(data.answer[i])] == answer, (i, question, scene)
        assert int(data.target_cell[i]) == cell
    qtypes = data.qtype.tolist()
    assert all(qtypes.count(q) > 50 for q in range(3))
    exists = data.answer[data.qtype == 2]
    assert 0.3 < float((exists == ANSWERS.index("yes")).float().mean()) < 0.7, "yes/no roughly balanced"


def test_toy_data_is_fast() -> None:
    make_toy_vqa(100, seed=0)
    start = time.perf_counter()
    make_toy_vqa(4000, seed=0)
    assert time.perf_counter() - start < 2.0  # ~0.25 s on one core; slack for a shared machine


# ------------------------------------------------------------------------------------ end-to-end training

TARGET = 0.5
BACKBONE_STEPS, SMARTTRIM_STEPS = 250, 200
MACS_INSTANCES = 16


@pytest.fixture(scope="module")
def trained() -> dict[str, object]:
    """Train the plain backbone and SmartTrim (targets 0.5) once for the slow tests of this module."""
    torch.set_num_threads(1)
    train_data, val_data = make_toy_vqa(3000, seed=0), make_toy_vqa(400, seed=1)
    results: dict[str, object] = {"val": val_data,
                                  "baseline": toydata.majority_baseline(train_data.labels, val_data.labels)}
    torch.manual_seed(0)
    backbone = smarttrim.build_model("meter-tiny", task="vqa", num_labels=NUM_LABELS)
    train(backbone, train_data, BACKBONE_STEPS, seed=0, log_every=0)
    results["backbone"] = (backbone, evaluate(backbone, val_data), measure_macs(backbone, val_data, MACS_INSTANCES))
    # SmartTrim fine-tunes the trained backbone (the paper's recipe), trimmers from stable init
    torch.manual_seed(0)
    model = smarttrim.build_model("meter-tiny", task="vqa", num_labels=NUM_LABELS, trim=smarttrim_config(TARGET))
    model.load_backbone_state_dict(backbone.state_dict())
    train(model, train_data, SMARTTRIM_STEPS, lr=DEFAULT_FINETUNE_LR, seed=0, log_every=0)
    results["smarttrim"] = (model, evaluate(model, val_data), measure_macs(model, val_data, MACS_INSTANCES))
    return results


@pytest.mark.slow
def test_eval_keep_ratios_near_targets(trained: dict[str, object]) -> None:
    _, res, _ = trained["smarttrim"]
    assert set(res.keep_mean) == {"vision_tokens", "text_tokens", "heads"}
    for group, mean in res.keep_mean.items():
        # The cost loss pins the *training* (sampled) keep ratios to 0.5 within ~0.02. The eval path
        # thresholds π > 0 instead of sampling, which shifts the ratio: measured 0.49-0.58 on every group
        # for seeds 0-3 of this exact setup (0.55 / 0.55 / 0.53 for seed 0). 0.15 leaves room for that
        # shift and for numerical differences between machines, and still fails a trimmer that learned
        # nothing (1.0), collapsed (~0), or a trimmer lr too small to make the scores decisive (at 1e-2
        # one seed gave text 0.27).
        assert abs(mean - TARGET) < 0.15, (group, mean)


@pytest.mark.slow
def test_macs_well_below_keep_all(trained: dict[str, object]) -> None:
    *_, full = trained["backbone"]
    *_, trimmed = trained["smarttrim"]
    ratio = statistics.fmean(trimmed) / statistics.fmean(full)  # the same val instances, batch of one
    assert ratio < 0.75, ratio


@pytest.mark.slow
def test_trimming_is_adaptive_per_instance(trained: dict[str, object]) -> None:
    model, res, macs = trained["smarttrim"]
    assert len(set(macs)) >= 4 and statistics.pstdev(macs) > 0, macs
    assert res.keep_std["text_tokens"] > 0.01 and res.keep_std["vision_tokens"] > 0.0, res.keep_std
    # beyond text length: instances whose questions have the same length still get different budgets
    val = trained["val"]
    lengths = val.attention_mask[:MACS_INSTANCES].sum(1).tolist()
    same_length = {}
    for n, m in zip(lengths, macs, strict=True):
        same_length.setdefault(n, set()).add(m)
    assert any(len(v) > 1 for v in same_length.values()), same_length


@pytest.mark.slow
def test_backbone_beats_majority_baseline(trained: dict[str, object]) -> None:
    _, res, _ = trained["backbone"]
    baseline = trained["baseline"]
    assert res.vqa_score > baseline + 0.1, (res.vqa_score, baseline)


@pytest.mark.slow
def test_smarttrim_keeps_the_backbone_accuracy(trained: dict[str, object]) -> None:
    """Fine-tuned from the backbone at half the compute, SmartTrim keeps its score (paper: ~1% loss)."""
    _, full, _ = trained["backbone"]
    _, trimmed, _ = trained["smarttrim"]
    assert trimmed.vqa_score > full.vqa_score - 0.05, (trimmed.vqa_score, full.vqa_score)
