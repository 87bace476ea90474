"""Evaluate stage: task metrics of an exported model on the inference path (real pruning).

    python -m stages.evaluate --model runs/x/model --shards data/shapes-vqa --split val --out runs/x/eval
    python -m stages.evaluate --model runs/r/model --shards data/shapes-retrieval --out runs/r/eval --rerank-k 16

The model runs in eval mode on the pruning path (deterministic trimming decisions, tokens and heads really
removed), in batches; every sample of the split is read exactly once. Writes ``metrics.json`` (the task's
``metric``, mean keep ratio per trimmer group, config, device) and ``predictions.jsonl``.

VQA, NLVR2, SNLI-VE: one row per instance in ``predictions.jsonl`` (key, predicted label, its score, keep
ratio per trimmer group; VQA v2: its question_id). VQA v2 splits also get the official results file,
``vqa_OpenEnded_mscoco_<split>_smarttrim_results.json`` (``[{"question_id": ..., "answer": ...}]``, what the
evaluation server and the official ``vqaEval`` read); a split whose answers are hidden (``test-dev2015``,
``test2015``) gets predictions only (``metric`` null, ``labelled`` false). Metrics: VQA score (soft accuracy of
the argmax answer against the shards' METER/ViLT soft scores, computed from officially normalized answers),
NLVR2 and SNLI-VE accuracy, next to the shards' majority-answer and text-only baselines (the best answer per
question text, from the shard manifest). Two checks of what the number means:

* ``permuted_images``: every batch is evaluated again with its images rolled by one (each text gets another
  instance's image): the metric then (a model that reads its image falls to about the text-only baseline)
  and ``changed``, the share of predictions that change (about 0 for a model living on answer priors).
  ``--no-permute-images`` skips it.
* ``focus`` (built-in ``shapes`` vqa / snli_ve, whose scenes and referred objects are known): of the patches
  the last visual token trimmer kept, the share that lies on the objects the text refers to (``precision``)
  against the share of all patches that does (``chance``), their ratio (``lift``), and the share of those
  objects' patches kept (``recall``); per instance in ``predictions.jsonl`` too. The untrimmed backbone
  keeps every patch: lift 1.
* ``by_kind`` (where the source names question kinds: VQA v2's answer types, the built-in data's question
  types, ``records.question_kind``): the metric per kind next to that kind's text-only baseline, with permuted
  images too, so a model that reads its image for colours but answers "is there ..." from the prior shows.

Retrieval (METER's ``compute_irtr_recall``): the split is one gallery of I images and all T of their true
captions. A pair's score is the model's retrieval score, METER's ``rank_output`` on the pair's pooled
features (what its rank loss trains), from one forward of the pair. By default all I x T pairs are scored, as
METER does. --rerank-k K is an option, not METER's protocol: all pairs are first ranked by the cosine
similarity of uni-modal features (text [CLS] after cross_modal_text_transform, image [CLS] after
cross_modal_image_transform of the untrimmed visual encoder: the inputs of the co-attention layers) and only
each query's K most similar candidates (K images per caption, K captions per image) get a model score, as
ALBEF/BLIP re-rank with features their contrastive loss aligns; the other candidates rank below all re-ranked
ones, in cosine order. Neither METER nor this model trains those features to align, so a true match outside
the top K is lost: the run warns and records it (``warnings``). K >= T gives the full protocol's ranking
exactly (K >= I: its text->image ranking). Ties rank the lower gallery index first.
Metrics: image->text R@1/5/10 (tr_r1, tr_r5, tr_r10: an image query is a hit at K when ANY of its captions
is in its top K), text->image R@1/5/10 (ir_r1, ir_r5, ir_r10: the caption's image is in its top K),
tr_mean, ir_mean and rsum_mean (the mean of the six recalls, in [0, 1]; also ``metric``, named
"mean_recall"), pairs_scored, and the mean keep ratio per trimmer group over the scored pairs.
predictions.jsonl: one row per caption query (query "text": key of its image, caption index, text, rank of
the true image, top-5 image keys) and per image query (query "image": key, best rank of any of its
captions). Caption shards are refused: no generating backbone exists yet.
"""

from __future__ import annotations

import json
import sys
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smarttrim.data import shapes
from smarttrim.data.records import question_kind
from stages.common import (
    ModelDataConfig,
    StageOutputs,
    add_model_data_args,
    check_labels,
    instance_scores,
    resolve_device,
    stage_parser,
    stage_tokenizer,
    to_device,
    write_outputs,
)
from stages.progress import Progress

if TYPE_CHECKING:  # torch and the model load when a stage runs, not with the module: --help is instant
    import torch
    from torch import Tensor

    from smarttrim.data.gallery import Gallery
    from smarttrim.model import SmartTrimModel

METRICS = {"vqa": "vqa_score", "nlvr2": "accuracy", "snli_ve": "accuracy", "retrieval": "mean_recall"}
RECALL_KS: tuple[int, ...] = (1, 5, 10)
TOP_KEYS = 5
"""Image keys listed per caption query in ``predictions.jsonl``."""


@dataclass(frozen=True)
class EvaluateConfig(ModelDataConfig):
    batch_size: int = 64
    """Instances (retrieval: image-text pairs) per forward."""
    rerank_k: int | None = None
    """Retrieval: score only each query's top-k candidates by uni-modal cosine similarity (features no objective
    aligns: a warning says so); None = every pair (METER's protocol)."""
    permute_images: bool = True
    """VQA / NLVR2 / SNLI-VE: evaluate every batch again with its images permuted (``permuted_images``)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r}: must be >= 1")
        if self.rerank_k is not None and self.rerank_k < 1:
            raise ValueError(f"rerank_k={self.rerank_k!r}: must be >= 1 or None")


def run(cfg: EvaluateConfig, label: str | None = None) -> StageOutputs:
    """Evaluate ``cfg.model`` on every sample of ``cfg.split``; writes predictions and metrics to ``cfg.out``.
    Progress lines name the model by ``label`` (default: the output directory's name)."""
    import torch

    from smarttrim.data.loader import read_manifest
    from smarttrim.io import load_model

    manifest = read_manifest(cfg.shards)
    task = manifest["task"]
    _check_task(cfg, task)
    model = load_model(cfg.model).eval()
    if model.config.task != task:
        raise ValueError(f"{cfg.model}: model task {model.config.task!r} does not match the shards' {task!r}")
    check_labels(cfg, manifest, model.config.num_labels)
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    model.to(device)
    tokenizer = stage_tokenizer(cfg)
    prefix = f"[evaluate {label or Path(cfg.out).name}] {cfg.split}:"
    with torch.inference_mode():
        evaluate = _evaluate_retrieval if task == "retrieval" else _evaluate_classes
        rows, measured = evaluate(model, cfg, manifest, tokenizer, device, prefix)
    files = {"predictions.jsonl": lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows))}
    if rows and all("question_id" in r for r in rows):  # VQA v2: the official results file too
        measured["results_file"] = vqa_results_name(cfg.split)
        official = [{"question_id": r["question_id"], "answer": r["prediction"]} for r in rows]
        files[measured["results_file"]] = lambda p: p.write_text(json.dumps(official) + "\n")
    metrics = {"task": task, "split": cfg.split, "metric_name": METRICS[task], **measured,
               "device": str(device), "config": asdict(cfg)}
    write_outputs(Path(cfg.out), {
        **files,
        "metrics.json": lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"),
    })
    return StageOutputs(Path(cfg.out), metrics)


def vqa_results_name(split: str) -> str:
    """The official VQA v2 results file name (``vqa_<task type>_<data type>_<subtype>_<method>_results.json``, as the
    evaluation server and the official ``vqaEval`` expect): a list of ``{"question_id", "answer"}``."""
    return f"vqa_OpenEnded_mscoco_{split}_smarttrim_results.json"


def _check_task(cfg: EvaluateConfig, task: str) -> None:
    if task == "caption":
        raise ValueError(f"{cfg.shards}: task 'caption' cannot be evaluated: no generating (captioning) "
                         "backbone exists yet")
    if task not in METRICS:
        raise ValueError(f"{cfg.shards}: task {task!r} is not evaluated ({', '.join(METRICS)} are)")
    if cfg.rerank_k is not None and task != "retrieval":
        raise ValueError(f"rerank_k={cfg.rerank_k!r}: applies to retrieval only, the shards' task is {task!r}")


def _mean_keep(keep: dict[str, Tensor]) -> dict[str, float]:
    return {g: float(v.float().mean()) for g, v in sorted(keep.items())}


# ---------------------------------------------------------------------------------------------- classes
def _evaluate_classes(model: SmartTrimModel, cfg: EvaluateConfig, manifest: dict[str, Any], tokenizer: Any,
                      device: torch.device, prefix: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """VQA score / accuracy of the argmax label per instance; the same with permuted images; focus of the trimming."""
    import torch

    from smarttrim.data.loader import LoaderConfig, make_loader

    task, labels = manifest["task"], manifest["labels"]
    if model.config.num_labels != len(labels):
        raise ValueError(f"{cfg.model}: {model.config.num_labels} labels, the shards have {len(labels)}")
    loader = make_loader(cfg.shards, cfg.split, tokenizer, LoaderConfig(
        batch_size=cfg.batch_size, image_size=model.config.image_size, max_text_len=model.config.max_text_len))
    focus = FocusMeter(model.config.image_size // model.config.patch_size) if _has_focus(manifest) else None
    progress = Progress(prefix, manifest["splits"].get(cfg.split, {}).get("samples"), "instances")
    rows: list[dict[str, Any]] = []
    keep: dict[str, list[Tensor]] = {}
    labelled: bool | None = None
    for batch in loader:
        if labelled is None:
            labelled = "labels" in batch
        elif labelled != ("labels" in batch):
            raise ValueError(f"{cfg.shards}: split {cfg.split!r} labels some instances and not others")
        inputs = to_device(batch, device)
        out = model(inputs)
        pred = out.logits.argmax(-1).cpu()
        scores = instance_scores(task, out.logits.cpu(), batch["labels"]) if labelled else None
        permuted = permuted_predictions(model, inputs) if labelled and cfg.permute_images and len(pred) > 1 \
            else None
        permuted_scores = None if permuted is None else instance_scores(task, permuted, batch["labels"])
        for g, v in out.keep_groups.items():
            keep.setdefault(g, []).append(v.cpu())
        for i, key in enumerate(batch["keys"]):
            row: dict[str, Any] = {"key": key, "prediction": labels[int(pred[i])],
                                   "keep": {g: float(v[i]) for g, v in out.keep_groups.items()}}
            if scores is not None:
                row["score"] = float(scores[i])
            question_id = batch["meta"][i].get("question_id")
            if task == "vqa" and isinstance(question_id, int):
                row["question_id"] = question_id
            if permuted is not None:
                row["permuted"] = {"prediction": labels[int(permuted[i].argmax())],
                                   "score": float(permuted_scores[i])}
            if focus is not None:
                row["focus"] = focus.add(batch["meta"][i], out.image_positions[i].cpu(), out.image_keep[i].cpu())
            kind = question_kind(batch["meta"][i])
            if kind is not None:
                row["kind"] = kind
            rows.append(row)
        progress.update(len(rows))
    if not rows:
        raise ValueError(f"{cfg.shards}: split {cfg.split!r} is empty")
    progress.finish()
    if not labelled:  # hidden answers (VQA v2 test-dev2015 / test2015): predictions only, for the official server
        return rows, {"metric": None, "labelled": False, "instances": len(rows),
                      "keep": _mean_keep({g: torch.cat(v) for g, v in keep.items()})}
    measured: dict[str, Any] = {
        "metric": sum(r["score"] for r in rows) / len(rows), "labelled": True, "instances": len(rows),
        "keep": _mean_keep({g: torch.cat(v) for g, v in keep.items()}),
        "majority_baseline": manifest.get("majority_baseline", {}).get("score", {}).get(cfg.split),
        "text_only_baseline": manifest.get("text_only_baseline", {}).get("score", {}).get(cfg.split),
    }
    permuted = permuted_summary(rows)
    if permuted is not None:
        measured["permuted_images"] = {
            "metric": permuted["permuted_metric"], "changed": permuted["permuted_changed"],
            "instances": permuted["instances"],
            "method": f"each batch of {cfg.batch_size} evaluated again with its images rolled by one (every "
                      "instance gets another instance's image, the texts stay)"}
    if focus is not None:
        measured["focus"] = focus.summary()
    by_kind = metrics_by_kind(rows, manifest.get("text_only_baseline", {}).get("by_kind", {}).get(cfg.split, {}))
    if by_kind:
        measured["by_kind"] = by_kind
    return rows, measured


def metrics_by_kind(rows: list[dict[str, Any]], text_only: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per question kind (the rows' ``kind``, ``records.question_kind``): instances, the metric, the text-only
    baseline of that kind (from the shard manifest; None when it has none) and, when measured, the metric with
    permuted images and the share of changed predictions: which kinds of question the model answers from the
    image, and which from the question's prior. Empty when no row has a kind."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        if "kind" in r:
            groups.setdefault(r["kind"], []).append(r)
    out = {}
    for kind, group in sorted(groups.items()):
        permuted = permuted_summary(group)
        out[kind] = {"instances": len(group), "metric": sum(r["score"] for r in group) / len(group),
                     "text_only_baseline": (text_only.get(kind) or {}).get("score"),
                     **({k: permuted[k] for k in ("permuted_metric", "permuted_changed")} if permuted else {})}
    return out


def permuted_summary(rows: list[dict[str, Any]]) -> dict[str, float] | None:
    """Over the rows evaluated with permuted images: their count, the metric then and the share of predictions
    that changed; None when no row was."""
    permuted = [r for r in rows if "permuted" in r]
    if not permuted:
        return None
    return {"instances": len(permuted),
            "permuted_metric": sum(r["permuted"]["score"] for r in permuted) / len(permuted),
            "permuted_changed": sum(r["permuted"]["prediction"] != r["prediction"] for r in permuted) / len(permuted)}


def permuted_predictions(model: SmartTrimModel, inputs: dict[str, Any]) -> Tensor:
    """(B, labels) logits of the batch with its images rolled by one: each text paired with another instance's
    image (NLVR2: another image pair). A model that reads the image changes its answers; one living on the
    text's answer prior does not."""
    return model({**inputs, "pixel_values": inputs["pixel_values"].roll(1, 0)}).logits.float().cpu()


def _has_focus(manifest: dict[str, Any]) -> bool:
    """Focus is measured where each instance has one image whose scene and referred objects are known."""
    return manifest.get("source") == "shapes" and manifest["task"] in ("vqa", "snli_ve")


class FocusMeter:
    """Does the text guide the trimming? Per instance: the patches the last visual token trimmer kept (the image
    stream's surviving tokens) against the patches of the objects the text refers to (``meta["focus"]``,
    ``shapes.focus_patches``). Instances whose text refers to no visible object are left out."""

    def __init__(self, grid: int) -> None:
        self.grid = grid
        self.rows: list[tuple[int, int, int]] = []  # (patches kept, kept on focus objects, focus patches)

    def add(self, meta: dict[str, Any], positions: Tensor, keep: Tensor) -> dict[str, int] | None:
        focus = shapes.focus_patches(meta["scene"], meta.get("focus", []), self.grid)
        if not focus.any():
            return None
        kept = positions[(keep > 0) & (positions > 0)] - 1  # patch indices (the [I_CLS] prefix left out)
        on = int(focus[kept.numpy()].sum())
        self.rows.append((len(kept), on, int(focus.sum())))
        return {"kept": len(kept), "on_focus": on, "focus_patches": int(focus.sum())}

    def summary(self) -> dict[str, Any]:
        """``precision``: mean share of the kept patches that lie on focus objects; ``chance``: mean share of all
        patches that do (what keeping patches at random gives); ``lift`` = precision / chance; ``recall``: mean
        share of the focus objects' patches kept; means over instances with at least one kept patch."""
        rows = [r for r in self.rows if r[0] > 0]
        patches = self.grid * self.grid
        if not rows:
            return {"instances": 0, "instances_nothing_kept": len(self.rows)}
        precision = sum(on / kept for kept, on, _ in rows) / len(rows)
        chance = sum(f / patches for _, _, f in rows) / len(rows)
        return {"precision": precision, "chance": chance, "lift": precision / chance,
                "recall": sum(on / f for _, on, f in rows) / len(rows),
                "kept_patches": sum(k for k, _, _ in rows) / len(rows), "patches": patches,
                "instances": len(rows), "instances_nothing_kept": len(self.rows) - len(rows),
                "coverage_rule": f"a patch is on an object when >= {shapes.FOCUS_COVERAGE:.0%} of it lies in the "
                                 "object's bounding circle"}


# ---------------------------------------------------------------------------------------------- retrieval
SCORE = "rank_output (METER's IRTR score of the pair)"
"""What ranks a retrieval gallery (recorded in the metrics)."""
RERANK_WARNING = ("rerank_k={k}: candidates pre-filtered by the cosine of uni-modal [CLS] features "
                  "(cross_modal_text_transform / cross_modal_image_transform outputs), which neither METER nor this "
                  "model trains to align (no contrastive objective): a true match outside a query's top {k} ranks "
                  "below every candidate; METER scores all pairs (rerank_k=None)")


def rank_score(logits: Tensor) -> Tensor:
    """(P,) retrieval scores of pairs from the model's (P, 1) logits on one text per image: ``rank_output``."""
    return logits[:, 0]


def best_ranks(scores: Tensor, relevant: Tensor) -> tuple[Tensor, Tensor]:
    """Per query (row), the 1-based rank of its best-ranked relevant candidate, and the candidates in rank order.

    scores: (Q, C), higher = better; relevant: (Q, C) bool, at least one per row. Ties rank the lower
    candidate index first (a stable sort). Returns ((Q,) long ranks, (Q, C) candidate indices).
    """
    import torch

    if not bool(relevant.any(1).all()):
        raise ValueError("best_ranks: a query has no relevant candidate")
    order = torch.sort(scores, dim=1, descending=True, stable=True).indices
    return relevant.gather(1, order).to(torch.uint8).argmax(1) + 1, order


def recall_at(ranks: Tensor, ks: tuple[int, ...] = RECALL_KS) -> dict[int, float]:
    """Fraction of queries whose rank is <= k, for each k."""
    return {k: float((ranks <= k).double().mean()) for k in ks}


@dataclass(frozen=True)
class Ranking:
    """Both directions of a retrieval evaluation over a gallery of I images and T captions."""

    text_ranks: Tensor
    """(T,) rank of each caption's image among all images (text -> image)."""
    text_order: Tensor
    """(T, I) images in rank order per caption query."""
    image_ranks: Tensor
    """(I,) best rank of any of the image's captions among all captions (image -> text)."""

    def metrics(self, ks: tuple[int, ...] = RECALL_KS) -> dict[str, float]:
        """``tr_r<k>`` (image -> text), ``ir_r<k>`` (text -> image), their means and ``rsum_mean``."""
        tr, ir = recall_at(self.image_ranks, ks), recall_at(self.text_ranks, ks)
        out = {**{f"tr_r{k}": v for k, v in tr.items()}, **{f"ir_r{k}": v for k, v in ir.items()}}
        out["tr_mean"], out["ir_mean"] = sum(tr.values()) / len(ks), sum(ir.values()) / len(ks)
        out["rsum_mean"] = (sum(tr.values()) + sum(ir.values())) / (2 * len(ks))
        return out


def rank_gallery(i2t_scores: Tensor, t2i_scores: Tensor, text_image: Tensor) -> Ranking:
    """Rank a gallery from (I, T) pair scores: ``i2t_scores`` rank captions per image (rows), ``t2i_scores``
    images per caption (columns); ``text_image`` (T,) is each caption's image (the only relevant one)."""
    import torch

    relevant = text_image[None, :] == torch.arange(i2t_scores.shape[0])[:, None]  # (I, T)
    text_ranks, text_order = best_ranks(t2i_scores.T, relevant.T)
    image_ranks, _ = best_ranks(i2t_scores, relevant)
    return Ranking(text_ranks, text_order, image_ranks)


def topk_candidates(sim: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """(I, T) bool masks of re-ranked pairs: each image's k most similar captions (i2t) and each caption's k
    most similar images (t2i), by the similarity ``sim`` (I, T)."""
    import torch

    i2t, t2i = torch.zeros_like(sim, dtype=torch.bool), torch.zeros_like(sim, dtype=torch.bool)
    i2t.scatter_(1, sim.topk(min(k, sim.shape[1]), dim=1).indices, True)
    t2i.scatter_(0, sim.topk(min(k, sim.shape[0]), dim=0).indices, True)
    return i2t, t2i


def rerank_scores(scores: Tensor, candidates: Tensor, sim: Tensor) -> Tensor:
    """Scores that rank the ``candidates`` by the model's ``scores`` above every other pair, those by cosine ``sim``
    (in [-1, 1]): non-candidates get ``min(scores over candidates) - 3 + sim``."""
    import torch

    floor = scores[candidates].min() - 3.0
    return torch.where(candidates, scores, floor + sim.to(scores.dtype))


def _tokenize(tokenizer: Any, texts: tuple[str, ...], max_len: int) -> dict[str, Tensor]:
    enc = tokenizer(list(texts), padding="longest", truncation=True, max_length=max_len, return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _chunks(n: int, size: int) -> list[Tensor]:
    import torch

    return [torch.arange(start, min(start + size, n)) for start in range(0, n, size)]


def _texts(tokens: dict[str, Tensor], index: Tensor) -> dict[str, Tensor]:
    """Rows ``index`` of the tokenized captions, padded to the longest of them (right padding)."""
    mask = tokens["attention_mask"][index]
    width = int(mask.sum(1).max())
    return {"input_ids": tokens["input_ids"][index, :width], "attention_mask": mask[:, :width]}


def score_pairs(model: SmartTrimModel, gallery: Gallery, tokens: dict[str, Tensor], pairs: Tensor,
                batch_size: int, device: torch.device,
                progress: Progress | None = None) -> tuple[Tensor, dict[str, Tensor]]:
    """Retrieval scores (P,) of (image, caption) index pairs (P, 2), in batches on the model's current path, and
    the (P,) keep ratio per trimmer group of each pair's forward (``progress``: updated with the pairs scored)."""
    import torch

    scores, keep = [], {}
    for start in range(0, len(pairs), batch_size):
        image, text = pairs[start:start + batch_size].T
        out = model(to_device({"pixel_values": gallery.images[image], **_texts(tokens, text)}, device))
        scores.append(rank_score(out.logits).double().cpu())
        for g, v in out.keep_groups.items():
            keep.setdefault(g, []).append(v.cpu())
        if progress is not None:
            progress.update(min(start + batch_size, len(pairs)))
    return torch.cat(scores), {g: torch.cat(v) for g, v in keep.items()}


def unimodal_similarity(model: SmartTrimModel, gallery: Gallery, tokens: dict[str, Tensor], batch_size: int,
                        device: torch.device) -> Tensor:
    """(I, T) cosine similarity of the uni-modal image and caption features (``SmartTrimModel.*_features``)."""
    import torch
    import torch.nn.functional as F

    image = torch.cat([model.image_features(gallery.images[c].to(device))
                       for c in _chunks(len(gallery.keys), batch_size)])
    text = torch.cat([model.text_features(**to_device(_texts(tokens, c), device))
                      for c in _chunks(len(gallery.texts), batch_size)])
    return (F.normalize(image.double(), dim=-1) @ F.normalize(text.double(), dim=-1).T).cpu()


def retrieval_scores(model: SmartTrimModel, gallery: Gallery, tokens: dict[str, Tensor], rerank_k: int | None,
                     batch_size: int, device: torch.device,
                     prefix: str | None = None) -> tuple[Tensor, Tensor, int, dict[str, Tensor]]:
    """(I, T) i2t and t2i ranking scores, the number of pairs the model scored and their keep ratios per group
    (``prefix``: of progress lines over the pairs scored; None: no progress lines)."""
    import torch

    shape = (len(gallery.keys), len(gallery.texts))
    if rerank_k is None:
        i2t = t2i = torch.ones(shape, dtype=torch.bool)
        sim = torch.zeros(shape, dtype=torch.float64)
    else:
        sim = unimodal_similarity(model, gallery, tokens, batch_size, device)
        i2t, t2i = topk_candidates(sim, rerank_k)
    pairs = (i2t | t2i).nonzero()  # (P, 2) image, caption
    progress = None if prefix is None else Progress(prefix, len(pairs), "pairs")
    scores, keep = score_pairs(model, gallery, tokens, pairs, batch_size, device, progress)
    if progress is not None:
        progress.finish()
    model_scores = torch.full(shape, float("nan"), dtype=torch.float64)
    model_scores[pairs[:, 0], pairs[:, 1]] = scores
    return rerank_scores(model_scores, i2t, sim), rerank_scores(model_scores, t2i, sim), len(pairs), keep


def _retrieval_rows(gallery: Gallery, ranking: Ranking) -> list[dict[str, Any]]:
    rows = [{"query": "text", "key": gallery.keys[int(gallery.text_image[t])], "caption": t, "text": text,
             "rank": int(ranking.text_ranks[t]),
             "top5": [gallery.keys[int(i)] for i in ranking.text_order[t, :TOP_KEYS]]}
            for t, text in enumerate(gallery.texts)]
    return rows + [{"query": "image", "key": key, "rank": int(ranking.image_ranks[i])}
                   for i, key in enumerate(gallery.keys)]


def _evaluate_retrieval(model: SmartTrimModel, cfg: EvaluateConfig, manifest: dict[str, Any], tokenizer: Any,
                        device: torch.device, prefix: str) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """R@1/5/10 both ways over the split's gallery, the model's scores of every pair on the pruning path (with
    ``rerank_k``: of each query's cosine candidates, with a warning, also in the metrics' ``warnings``)."""
    from smarttrim.data.gallery import read_gallery

    notes = []
    if cfg.rerank_k is not None:
        notes.append(RERANK_WARNING.format(k=cfg.rerank_k))
        warnings.warn(notes[-1], UserWarning, stacklevel=2)
    gallery = read_gallery(cfg.shards, cfg.split, model.config.image_size, manifest)
    tokens = _tokenize(tokenizer, gallery.texts, model.config.max_text_len)
    i2t, t2i, scored, keep = retrieval_scores(model, gallery, tokens, cfg.rerank_k, cfg.batch_size, device, prefix)
    ranking = rank_gallery(i2t, t2i, gallery.text_image)
    recalls = ranking.metrics()
    return _retrieval_rows(gallery, ranking), {
        "metric": recalls["rsum_mean"], **recalls, "images": len(gallery.keys), "texts": len(gallery.texts),
        "rerank_k": cfg.rerank_k, "score": SCORE, "pairs_scored": scored,
        "pairs_total": len(gallery.keys) * len(gallery.texts), "keep": _mean_keep(keep), "warnings": notes,
    }


# ---------------------------------------------------------------------------------------------- CLI
def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.evaluate", __doc__ or "")
    add_model_data_args(parser)
    parser.add_argument("--batch-size", type=int, default=64, help="instances (retrieval: pairs) per forward")
    parser.add_argument("--rerank-k", type=int, default=None,
                        help="retrieval: score only each query's top K candidates by uni-modal cosine similarity "
                             "(features nothing trains to align: warns; default: every image-text pair, as METER)")
    parser.add_argument("--no-permute-images", dest="permute_images", action="store_false",
                        help="skip the second pass with permuted images")
    args = parser.parse_args(argv)
    try:
        result = run(EvaluateConfig(**vars(args)))
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    m = result.metrics
    if m["task"] == "retrieval":
        print(f"{result.out}: mean_recall {m['metric']:.4f} (image->text R@1 {m['tr_r1']:.4f}, text->image R@1 "
              f"{m['ir_r1']:.4f}) on {m['images']} images, {m['texts']} captions, {m['pairs_scored']} pairs scored")
    else:
        line = f"{result.out}: {m['metric_name']} {m['metric']:.4f} on {m['instances']} {m['split']} instances"
        for name in ("majority_baseline", "text_only_baseline"):
            if m.get(name) is not None:
                line += f"; {name.replace('_', ' ')} {m[name]:.4f}"
        if "permuted_images" in m:
            p = m["permuted_images"]
            line += f"; images permuted: {p['metric']:.4f}, {p['changed']:.0%} of the predictions change"
        if m.get("focus", {}).get("instances"):
            f = m["focus"]
            line += (f"; kept patches on the objects the text names: {f['precision']:.0%} (chance {f['chance']:.0%}, "
                     f"lift {f['lift']:.2f}), {f['recall']:.0%} of those objects' patches kept")
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
