"""The evaluate stage: every sample once on the pruning path, metrics equal an independent recomputation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
import webdataset as wds
import yaml
from conftest import randomize_trimmers, tiny

import smarttrim
from smarttrim.data import shapes
from smarttrim.data.gallery import read_gallery
from smarttrim.data.loader import LoaderConfig, load_image, make_loader
from smarttrim.data.records import question_kind
from smarttrim.data.shapes import generate
from smarttrim.data.tokenizer import load_tokenizer
from smarttrim.flops import strip_padding
from stages.evaluate import EvaluateConfig, best_ranks, main, rank_gallery, rerank_scores, run, topk_candidates
from stages.shard import ShardConfig
from stages.shard import run as shard

os.environ.setdefault("HF_HUB_OFFLINE", "1")
ROOT = Path(__file__).resolve().parents[1]


def _shards(tmp: Path, task: str) -> Path:
    out = tmp / task
    shard(ShardConfig(source="shapes", task=task, out=str(out), shapes_sizes=(6, 21, 3), shard_size=8))
    return out


def _recompute(model_dir: Path, shards: Path) -> dict[str, float]:
    """Per-instance scores from batch-of-one forwards (no packing), independent of the stage's batching."""
    model = smarttrim.load_model(model_dir).eval()
    tok = load_tokenizer(shards / "tokenizer")
    scores = {}
    with torch.no_grad():
        for batch in make_loader(shards, "val", tok, LoaderConfig(batch_size=1, image_size=32, max_text_len=24)):
            one = strip_padding({k: v for k, v in batch.items() if isinstance(v, torch.Tensor)})
            pred = int(model(one).logits.argmax(-1))
            truth = batch["labels"]
            scores[batch["keys"][0]] = float(truth[0, pred]) if truth.dim() == 2 else float(pred == int(truth[0]))
    return scores


@pytest.mark.parametrize("task", ["vqa", "nlvr2"])
def test_evaluate_matches_independent_recomputation(tmp_path: Path, task: str) -> None:
    shards = _shards(tmp_path, task)
    labels = json.loads((shards / "manifest.json").read_text())["labels"]
    model = tiny(task, trim=smarttrim.TrimConfig(), num_labels=len(labels) if task == "vqa" else None)
    randomize_trimmers(model, seed=1, std=0.3)
    model.save_pretrained(tmp_path / "model")
    result = run(EvaluateConfig(model=str(tmp_path / "model"), shards=str(shards), out=str(tmp_path / "eval"),
                                batch_size=8, threads=1))
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    assert len(rows) == len({r["key"] for r in rows}) == 21, "every val sample exactly once"
    expected = _recompute(tmp_path / "model", shards)
    assert {r["key"]: r["score"] for r in rows} == pytest.approx(expected)
    m = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert m["metric"] == pytest.approx(sum(expected.values()) / 21) == pytest.approx(result.metrics["metric"])
    assert m["metric_name"] == ("vqa_score" if task == "vqa" else "accuracy")
    assert set(m["keep"]) == {"vision_tokens", "text_tokens", "heads"} and all(0 <= v <= 1 for v in m["keep"].values())
    assert all(r["prediction"] in labels for r in rows) and m["majority_baseline"] is not None


def test_permuted_images_and_focus_are_recomputed(tmp_path: Path) -> None:
    """The sanity checks of the metric: predictions with each batch's images rolled by one (recomputed here from
    the batch), and the focus of the kept patches on the objects the text names (recomputed from the scene)."""
    shards = _shards(tmp_path, "vqa")
    labels = json.loads((shards / "manifest.json").read_text())["labels"]
    model = tiny("vqa", trim=smarttrim.TrimConfig(), num_labels=len(labels))
    randomize_trimmers(model, seed=2, std=0.3)
    model.save_pretrained(tmp_path / "model")
    result = run(EvaluateConfig(model=str(tmp_path / "model"), shards=str(shards), out=str(tmp_path / "eval"),
                                batch_size=7, threads=1))
    rows = {r["key"]: r for r in map(json.loads, (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines())}
    model = smarttrim.load_model(tmp_path / "model").eval()
    tok = load_tokenizer(shards / "tokenizer")
    changed, n, grid = 0, 0, model.config.image_size // model.config.patch_size
    focus_rows = []
    with torch.no_grad():
        for batch in make_loader(shards, "val", tok, LoaderConfig(batch_size=7, image_size=32, max_text_len=24)):
            inputs = {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}
            rolled = model({**inputs, "pixel_values": inputs["pixel_values"].roll(1, 0)}).logits.argmax(-1)
            out = model(inputs)
            for i, key in enumerate(batch["keys"]):
                assert rows[key]["permuted"]["prediction"] == labels[int(rolled[i])]
                changed += rows[key]["permuted"]["prediction"] != rows[key]["prediction"]
                n += 1
                patches = shapes.focus_patches(batch["meta"][i]["scene"], batch["meta"][i]["focus"], grid)
                kept = out.image_positions[i][(out.image_keep[i] > 0) & (out.image_positions[i] > 0)] - 1
                if patches.any() and len(kept):
                    focus_rows.append((int(patches[kept.numpy()].sum()) / len(kept), patches.mean()))
    p = result.metrics["permuted_images"]
    assert p["instances"] == n == 21 and p["changed"] == pytest.approx(changed / n)
    f = result.metrics["focus"]
    assert f["instances"] == len(focus_rows) > 0
    assert f["precision"] == pytest.approx(sum(r[0] for r in focus_rows) / len(focus_rows))
    assert f["chance"] == pytest.approx(sum(r[1] for r in focus_rows) / len(focus_rows))
    assert f["lift"] == pytest.approx(f["precision"] / f["chance"]) and 0 <= f["recall"] <= 1
    assert result.metrics["text_only_baseline"] is not None
    # per question kind: each kind's rows, recomputed from the rows and the samples' meta
    kinds = {s.key: question_kind(s.meta) for s in generate("vqa", "val", 21, image_size=16)}
    assert {k: r["kind"] for k, r in rows.items()} == kinds and None not in kinds.values()
    by_kind = result.metrics["by_kind"]
    assert set(by_kind) == set(kinds.values()) and sum(e["instances"] for e in by_kind.values()) == 21
    for kind, e in by_kind.items():
        group = [r for key, r in rows.items() if kinds[key] == kind]
        assert e["metric"] == pytest.approx(sum(r["score"] for r in group) / len(group))
        assert e["permuted_metric"] == pytest.approx(sum(r["permuted"]["score"] for r in group) / len(group))
        assert e["permuted_changed"] == pytest.approx(
            sum(r["permuted"]["prediction"] != r["prediction"] for r in group) / len(group))
    manifest = json.loads((shards / "manifest.json").read_text())["text_only_baseline"]["by_kind"]["val"]
    assert {k: e["text_only_baseline"] for k, e in by_kind.items()} == {k: v["score"] for k, v in manifest.items()}
    # the untrimmed backbone keeps every patch: precision = chance
    tiny("vqa", num_labels=len(labels)).save_pretrained(tmp_path / "backbone")
    full = run(EvaluateConfig(model=str(tmp_path / "backbone"), shards=str(shards), out=str(tmp_path / "e2"),
                              batch_size=7, threads=1, permute_images=False)).metrics
    assert full["focus"]["lift"] == pytest.approx(1.0) and full["focus"]["recall"] == 1.0
    assert "permuted_images" not in full


def test_evaluate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shards = _shards(tmp_path, "nlvr2")
    tiny("snli_ve").save_pretrained(tmp_path / "snli")
    assert main(["--model", str(tmp_path / "snli"), "--shards", str(shards), "--out", str(tmp_path / "e")]) == 1
    assert "does not match" in capsys.readouterr().err and not (tmp_path / "e").exists()
    captions = tmp_path / "caption"
    shard(ShardConfig(source="shapes", task="caption", out=str(captions), shapes_sizes=(2, 2, 2)))
    with pytest.raises(ValueError, match="no generating"):
        run(EvaluateConfig(model=str(tmp_path / "snli"), shards=str(captions), out=str(tmp_path / "e")))
    with pytest.raises(ValueError, match="applies to retrieval only"):
        run(EvaluateConfig(model=str(tmp_path / "snli"), shards=str(shards), out=str(tmp_path / "e"), rerank_k=3))
    with pytest.raises(ValueError, match="rerank_k"):
        EvaluateConfig(model="m", shards="s", out="o", rerank_k=0)


def test_the_model_reads_with_its_own_tokenizer_and_label_vocabulary(tmp_path: Path) -> None:
    from smarttrim.data.tokenizer import train_tokenizer
    from stages.common import ModelDataConfig, stage_tokenizer

    shards = _shards(tmp_path, "vqa")
    labels = json.loads((shards / "manifest.json").read_text())["labels"]
    model = tiny("vqa", num_labels=len(labels))
    smarttrim.save_pretrained(model, tmp_path / "model", extra={"labels": labels})
    train_tokenizer(["what color is the zebra ?"], tmp_path / "model" / "tokenizer", vocab_size=40)
    cfg = ModelDataConfig(model=str(tmp_path / "model"), shards=str(shards), out=str(tmp_path / "e"))
    own = set(stage_tokenizer(cfg).get_vocab())
    assert "zebra" in own and own == set(load_tokenizer(tmp_path / "model" / "tokenizer").get_vocab())
    assert set(stage_tokenizer(ModelDataConfig(model="none", shards=str(shards), out="o")).get_vocab()) == \
        set(load_tokenizer(shards / "tokenizer").get_vocab()), "a model directory without one: the shards'"
    run(EvaluateConfig(model=str(tmp_path / "model"), shards=str(shards), out=str(tmp_path / "e")))
    swapped = [labels[1], labels[0], *labels[2:]]  # same size, another order: every prediction would be renamed
    smarttrim.save_pretrained(model, tmp_path / "other", extra={"labels": swapped})
    with pytest.raises(ValueError, match=rf"label vocabularies differ: .*other \(trained with {len(labels)} labels, "
                       rf"index 0: '{swapped[0]}'\) and .*vqa \({len(labels)} labels, index 0: '{labels[0]}'\)"):
        run(EvaluateConfig(model=str(tmp_path / "other"), shards=str(shards), out=str(tmp_path / "e2")))
    assert not (tmp_path / "e2").exists()


def test_cli_help() -> None:
    out = subprocess.run([sys.executable, "-m", "stages.evaluate", "--help"], capture_output=True, text=True,
                         cwd=ROOT, check=True).stdout
    assert "--model" in out and "predictions.jsonl" in out
    assert "--rerank-k" in out and "mean_recall" in out and "rank_output" in out


# ---------------------------------------------------------------------------------------------- retrieval
RECALLS = ("tr_r1", "tr_r5", "tr_r10", "ir_r1", "ir_r5", "ir_r10", "tr_mean", "ir_mean", "rsum_mean")
N_VAL = 12


@pytest.fixture(scope="module")
def retrieval(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """Retrieval shards (val: 12 images in 3 shards) and a meter-tiny retrieval model with mixed trimming decisions
    whose ``rank_output`` is not its start (the ITM head's match row): only METER's score ranks as it does."""
    tmp = tmp_path_factory.mktemp("retrieval")
    shard(ShardConfig(source="shapes", task="retrieval", out=str(tmp / "shards"), shapes_sizes=(6, N_VAL, 3),
                      shard_size=5))
    torch.manual_seed(0)
    model = tiny("retrieval", trim=smarttrim.TrimConfig())
    randomize_trimmers(model, seed=1, std=0.3)
    with torch.no_grad():
        model.rank_output.weight.normal_(0.0, 0.5)
    model.save_pretrained(tmp / "model")
    return tmp / "shards", tmp / "model"


def _evaluate(retrieval: tuple[Path, Path], out: Path, rerank_k: int | None) -> dict:
    shards, model = retrieval
    return run(EvaluateConfig(model=str(model), shards=str(shards), out=str(out), batch_size=16, threads=1,
                              rerank_k=rerank_k)).metrics


TIE = 1e-5
"""Scores this close are a tie: batched and single-instance forwards differ in the last bits, and the built-in
captions repeat across images ("one red circle"), so equal texts score equally up to rounding."""


def _rank(scores: list[float], true: int) -> tuple[int, int]:
    """The 1-based ranks ``scores[true]`` may take when sorted descending: (best, worst) over the order of ties."""
    above = sum(s > scores[true] + TIE for s in scores)
    tied = sum(abs(s - scores[true]) <= TIE for s in scores)
    return 1 + above, above + tied


def _within(ranks: list[int], allowed: list[tuple[int, int]]) -> bool:
    return len(ranks) == len(allowed) and all(lo <= r <= hi for r, (lo, hi) in zip(ranks, allowed, strict=True))


def _brute_force(retrieval: tuple[Path, Path]) -> tuple[list[int], list[int], dict[str, float]]:
    """Text and image query ranks, and mean keep ratios, from batch-of-one forwards of every pair scored by
    ``rank_output`` (METER's ``compute_irtr_recall``): keys and captions from the generator, images from the
    training loader, each caption tokenized alone."""
    shards, model_dir = retrieval
    model = smarttrim.load_model(model_dir).eval()
    tok = load_tokenizer(shards / "tokenizer")
    samples = list(generate("retrieval", "val", N_VAL))
    loader = make_loader(shards, "val", tok, LoaderConfig(batch_size=1, image_size=32, max_text_len=24))
    pixels = {b["keys"][0]: b["pixel_values"] for b in loader}
    texts = [(i, t) for i, s in enumerate(samples) for t in s.texts]
    scores = [[0.0] * len(texts) for _ in samples]
    keep: dict[str, list[float]] = {}
    with torch.no_grad():
        for i, s in enumerate(samples):
            for t, (_, text) in enumerate(texts):
                enc = tok([text], truncation=True, max_length=24, return_tensors="pt")
                one = strip_padding({"pixel_values": pixels[s.key], "input_ids": enc["input_ids"],
                                     "attention_mask": enc["attention_mask"]})
                out = model(one)
                scores[i][t] = float(out.logits[0, 0])  # rank_output on the pair's pooled features
                for g, v in out.keep_groups.items():
                    keep.setdefault(g, []).append(float(v[0]))
    text_ranks = [_rank([row[t] for row in scores], i) for t, (i, _) in enumerate(texts)]
    image_ranks = [(min(_rank(scores[i], t)[0] for t, (j, _) in enumerate(texts) if j == i),
                    min(_rank(scores[i], t)[1] for t, (j, _) in enumerate(texts) if j == i)) for i in range(N_VAL)]
    return text_ranks, image_ranks, {g: sum(v) / len(v) for g, v in keep.items()}


def test_retrieval_matches_brute_force(retrieval: tuple[Path, Path], tmp_path: Path) -> None:
    m = _evaluate(retrieval, tmp_path / "eval", None)
    text_ranks, image_ranks, keep = _brute_force(retrieval)
    rows = [json.loads(line) for line in (tmp_path / "eval" / "predictions.jsonl").read_text().splitlines()]
    got_text = [r["rank"] for r in rows if r["query"] == "text"]
    got_image = [r["rank"] for r in rows if r["query"] == "image"]
    assert _within(got_text, text_ranks) and _within(got_image, image_ranks), (got_text, text_ranks)
    assert sum(hi - lo for lo, hi in text_ranks + image_ranks) < len(text_ranks), "ties are the exception"
    for k in (1, 5, 10):
        assert m[f"tr_r{k}"] == pytest.approx(sum(r <= k for r in got_image) / N_VAL)
        assert m[f"ir_r{k}"] == pytest.approx(sum(r <= k for r in got_text) / len(got_text))
    assert m["tr_mean"] == pytest.approx((m["tr_r1"] + m["tr_r5"] + m["tr_r10"]) / 3)
    assert m["metric"] == m["rsum_mean"] == pytest.approx((m["tr_mean"] + m["ir_mean"]) / 2)
    assert m["metric_name"] == "mean_recall" and 0 < m["ir_r10"] < 1, "a gallery where R@10 says something"
    assert m["pairs_scored"] == m["pairs_total"] == N_VAL * len(text_ranks) and m["images"] == N_VAL
    assert m["rerank_k"] is None and m["warnings"] == [] and m["score"].startswith("rank_output"), "every pair"
    assert m["keep"] == pytest.approx(keep, abs=1e-5) and m["keep"]["vision_tokens"] < 1, "real pruning"
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["rsum_mean"] == m["rsum_mean"]
    assert all(len(r["top5"]) == 5 for r in rows if r["query"] == "text")


UNALIGNED = "neither METER nor this model trains to align"
"""The warning of every re-ranked evaluation: the uni-modal features it pre-filters by were never aligned."""


def test_retrieval_rerank(retrieval: tuple[Path, Path], tmp_path: Path) -> None:
    full = _evaluate(retrieval, tmp_path / "full", None)
    n_img, n_txt = full["images"], full["texts"]
    with pytest.warns(UserWarning, match=UNALIGNED):
        everything = _evaluate(retrieval, tmp_path / "all", n_txt)
    assert {k: everything[k] for k in RECALLS} == {k: full[k] for k in RECALLS}, "k >= T: the full protocol"
    assert everything["pairs_scored"] == n_img * n_txt
    with pytest.warns(UserWarning, match=UNALIGNED):
        images = _evaluate(retrieval, tmp_path / "images", n_img)
    assert {k: images[k] for k in RECALLS if k.startswith("ir")} == {k: full[k] for k in RECALLS if k.startswith("ir")}
    shards, model_dir = retrieval
    with pytest.warns(UserWarning, match=f"rerank_k=2: .*{UNALIGNED}"):
        assert main(["--model", str(model_dir), "--shards", str(shards), "--out", str(tmp_path / "k2"), "--threads",
                     "1", "--rerank-k", "2"]) == 0
    small = json.loads((tmp_path / "k2" / "metrics.json").read_text())
    assert n_txt < small["pairs_scored"] <= 2 * (n_img + n_txt) < n_img * n_txt
    assert all(0 <= small[k] <= 1 for k in RECALLS) and small["rerank_k"] == 2
    assert len(small["warnings"]) == 1 and UNALIGNED in small["warnings"][0], "recorded with the metrics"
    # each caption's two first images are its two most similar ones by uni-modal cosine (computed here alone)
    model, gallery = smarttrim.load_model(model_dir).eval(), read_gallery(shards, "val", 32)
    tok = load_tokenizer(shards / "tokenizer")
    with torch.no_grad():
        image = F.normalize(model.image_features(gallery.images), dim=-1)
        text = F.normalize(torch.cat([model.text_features(**tok([t], return_tensors="pt")) for t in gallery.texts]),
                           dim=-1)
    nearest = (text @ image.T).topk(2, dim=1).indices
    rows = [json.loads(line) for line in (tmp_path / "k2" / "predictions.jsonl").read_text().splitlines()]
    text_rows = [r for r in rows if r["query"] == "text"]
    assert [set(r["top5"][:2]) for r in text_rows] == [{gallery.keys[i] for i in n.tolist()} for n in nearest]


def test_paper_config_scores_every_retrieval_pair() -> None:
    """The paper's setting evaluates retrieval as METER does: every image-text pair scored, no cosine pre-filter."""
    paper = yaml.safe_load((ROOT / "pipeline" / "configs" / "paper.yaml").read_text())
    assert "rerank_k" in paper["evaluate"] and paper["evaluate"]["rerank_k"] is None
    assert any(t["data"]["task"] == "retrieval" for t in paper["tasks"])


def test_recall_by_hand() -> None:
    scores = torch.tensor([[0.1, 0.9, 0.8, 0.3],     # image 0: captions 0 and 1
                           [0.7, 0.2, 0.1, 0.6],     # image 1: caption 2
                           [0.2, 0.5, 0.4, 0.65]])   # image 2: caption 3
    ranking = rank_gallery(scores, scores, torch.tensor([0, 0, 1, 2]))
    # image 0's caption 0 ranks 4th but caption 1 first: ANY caption counts
    assert ranking.image_ranks.tolist() == [1, 4, 1]
    assert ranking.text_ranks.tolist() == [3, 1, 3, 1]
    assert ranking.text_order[0].tolist() == [1, 2, 0]
    m = ranking.metrics(ks=(1, 3, 4))
    assert (m["tr_r1"], m["tr_r3"], m["tr_r4"]) == pytest.approx((2 / 3, 2 / 3, 1.0))
    assert (m["ir_r1"], m["ir_r3"], m["ir_r4"]) == pytest.approx((0.5, 1.0, 1.0))
    assert m["rsum_mean"] == pytest.approx((2 / 3 + 2 / 3 + 1 + 0.5 + 1 + 1) / 6)
    ranks, _ = best_ranks(torch.tensor([[0.5, 0.5, 0.5]]), torch.tensor([[False, False, True]]))
    assert ranks.tolist() == [3], "ties rank the lower index first"


def test_rerank_candidates_rank_first() -> None:
    sim = torch.tensor([[0.9, 0.1, 0.5], [0.2, 0.8, 0.3]])
    i2t, t2i = topk_candidates(sim, 1)
    assert i2t.tolist() == [[True, False, False], [False, True, False]]
    assert t2i.tolist() == [[True, False, True], [False, True, False]]
    assert topk_candidates(sim, 5)[0].all() and topk_candidates(sim, 5)[1].all()
    itm = torch.tensor([[5.0, -40.0, 7.0, 100.0]], dtype=torch.float64)
    combined = rerank_scores(itm, torch.tensor([[False, True, True, False]]), torch.tensor([[0.9, 0.1, -0.5, -0.2]]))
    assert combined.argsort(descending=True)[0].tolist() == [2, 1, 0, 3], "ITM among candidates, then cosine"


def test_gallery_reads_every_sample_once(retrieval: tuple[Path, Path]) -> None:
    shards, _ = retrieval
    assert len(json.loads((shards / "manifest.json").read_text())["splits"]["val"]["shards"]) == 3
    gallery = read_gallery(shards, "val", 32)
    samples = list(generate("retrieval", "val", N_VAL))
    assert gallery.keys == tuple(s.key for s in samples)
    assert gallery.texts == tuple(t for s in samples for t in s.texts)
    assert gallery.text_image.tolist() == [i for i, s in enumerate(samples) for _ in s.texts]
    assert gallery.images.shape == (N_VAL, 3, 32, 32)
    assert all(torch.equal(gallery.images[i], load_image(samples[i].images[0], 32)) for i in (0, 5, 11))


def _write_split(out: Path, shards: list[list[dict]], samples: int) -> Path:
    out.mkdir()
    for n, records in enumerate(shards):
        with wds.TarWriter(str(out / f"val-{n:06d}.tar")) as sink:
            for record in records:
                sink.write(record)
    manifest = {"task": "retrieval", "splits": {"val": {"samples": samples, "shards": [
        {"file": f"val-{n:06d}.tar"} for n in range(len(shards))]}}}
    (out / "manifest.json").write_text(json.dumps(manifest))
    return out


def test_gallery_errors(tmp_path: Path) -> None:
    png = next(generate("retrieval", "val", 1)).images[0]

    def record(key: str, texts: object) -> dict:
        return {"__key__": key, "json": json.dumps({"texts": texts}).encode(), "img0.png": png}

    bad = _write_split(tmp_path / "bad", [[record("a", ["a red circle"]), record("b", [])]], 2)
    with pytest.raises(ValueError, match=r"val-000000\.tar: sample b: cannot decode .*'texts'"):
        read_gallery(bad, "val", 32)
    twice = _write_split(tmp_path / "twice", [[record("a", ["x"])], [record("a", ["y"])]], 2)
    with pytest.raises(ValueError, match=r"val-000001\.tar: sample a: duplicate key"):
        read_gallery(twice, "val", 32)
    short = _write_split(tmp_path / "short", [[record("a", ["x"])]], 2)
    with pytest.raises(ValueError, match="lists 2 samples, its shards hold 1"):
        read_gallery(short, "val", 32)


def test_unimodal_features_are_the_co_attention_inputs() -> None:
    plain = tiny("retrieval").eval()
    trimmed = tiny("retrieval", trim=smarttrim.TrimConfig())
    trimmed.load_backbone_state_dict(plain.backbone_state_dict())
    randomize_trimmers(trimmed, seed=1, std=0.3)
    trimmed.eval()
    batch = plain.dummy_batch(3, with_labels=False)
    seen: dict[str, torch.Tensor] = {}
    hooks = [getattr(plain.backbone, f"cross_modal_{s}_transform").register_forward_hook(
        lambda _m, _i, out, s=s: seen.__setitem__(s, out[:, 0])) for s in ("text", "image")]
    with torch.no_grad():
        plain(batch)
        for hook in hooks:
            hook.remove()
        text = plain.text_features(batch["input_ids"], batch["attention_mask"])
        image = plain.image_features(batch["pixel_values"])
        assert torch.allclose(text, seen["text"], atol=1e-6) and torch.allclose(image, seen["image"], atol=1e-6)
        assert trimmed(batch).keep_groups["vision_tokens"].max() < 1, "the trimmed model does prune"
        assert torch.allclose(trimmed.image_features(batch["pixel_values"]), image, atol=1e-6), "never trimmed"
        assert torch.allclose(trimmed.text_features(batch["input_ids"], batch["attention_mask"]), text, atol=1e-6)
