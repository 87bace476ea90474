"""Is adaptive trimming as fast as its FLOPs? SmartTrim with real cross-modal trimmers whose decisions differ per
instance, against the untrimmed backbone and a static pruning reference at equal FLOPs, timed side by side in one
process (interleaved, same inputs, same threads) at several batch sizes. Prints one JSON object.

    python bench/adaptive_inference.py --preset meter-base --threads 2
    python bench/adaptive_inference.py --model runs/quickstart/finetune/shapes-vqa-smarttrim-2x-<key>/model

Models (every one shares the backbone's weights):

* ``backbone``: no trimmers.
* ``keep_all``: SmartTrim's trimmers under stable init (every decision "keep"): the trimmers' own overhead.
* ``smarttrim-<r>x``: cross-modal token trimmers at every placement of the preset's default ``TrimConfig`` and head
  trimmers on every co-attention MSA / MCA, with random weights (not stable init: scores depend on the input, so
  instances keep different tokens and heads) whose output biases are calibrated on the inputs so that each token
  trimmer keeps a fraction rho of the tokens that reach it and each head trimmer rho_h = sqrt(rho) of its heads;
  rho is searched so that the mean per-instance FLOPs reduction is r. With ``--model``: the model's own trained
  trimmers (one SmartTrim entry, its own target).
* ``static-<r>x``: a fixed top-k of visual tokens at the same placements (the same score networks, every instance
  keeping the same count, TRIPS / EViT-style static pruning), no head or text trimming, k searched to the
  SmartTrim entry's mean FLOPs.

Inputs: the built-in shapes world's VQA questions rendered at the model's image size (``--shards DIR`` reads
another shard directory). FLOPs: ``smarttrim.flops.analytic_macs`` per instance at batch size 1 (matmul MACs).
Speedups are the backbone's time over the model's, summed over the same inputs (batch size 1: mean latency, the
profile stage's convention; batches: throughput); each batch size's entry carries the FLOPs reduction on exactly
the inputs it timed, and efficiency = speedup / that reduction. The process's allocator keeps freed memory
(``stages.common.keep_freed_memory``) and every model makes untimed passes over the inputs until a pass pays no
page faults (``stages.profile.warm_up``), so that no model pays first touches of fresh activations while timed;
``page_faults_timed`` counts those that remain.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import platform
import statistics
import sys
import tempfile
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import smarttrim  # noqa: E402
from smarttrim.flops import analytic_macs, strip_padding  # noqa: E402
from smarttrim.model import SmartTrimModel  # noqa: E402
from smarttrim.trimmers import HeadTrimmer, TokenTrimmer  # noqa: E402
from stages.common import faults_since, keep_freed_memory, minor_faults, to_device  # noqa: E402
from stages.profile import interleaved_times, timed, warm_up  # noqa: E402

Batch = dict[str, torch.Tensor]


# ----------------------------------------------------------------------------------------------- inputs
def shapes_inputs(image_size: int, max_text_len: int, n: int, shards: str | None, split: str) -> list[Batch]:
    """``n`` instances as unpadded batches of one (the built-in world's VQA val split unless ``shards``)."""
    from smarttrim.data.loader import LoaderConfig, make_loader, shard_tokenizer
    from stages.shard import ShardConfig
    from stages.shard import run as shard

    with contextlib.ExitStack() as stack:
        if shards is None:
            tmp = stack.enter_context(tempfile.TemporaryDirectory())
            shards = str(Path(tmp) / "shards")
            with contextlib.redirect_stdout(sys.stderr):  # stdout is the JSON
                shard(ShardConfig(source="shapes", task="vqa", out=shards, shapes_sizes=(16, n, 1),
                                  shapes_image_size=image_size, shard_size=max(n, 16)))
            split = "val"
        loader = make_loader(shards, split, shard_tokenizer(shards, None),
                             LoaderConfig(batch_size=16, image_size=image_size, max_text_len=max_text_len))
        singles: list[Batch] = []
        for batch in loader:
            for i in range(batch["input_ids"].shape[0]):
                one = {k: batch[k][i: i + 1] for k in ("pixel_values", "input_ids", "attention_mask")}
                singles.append(strip_padding(one))
            if len(singles) >= n:
                break
    if len(singles) < n:
        raise ValueError(f"{shards}: split {split!r} has {len(singles)} instances, --instances asks for {n}")
    return singles[:n]


def collate(singles: list[Batch], pad_id: int) -> Batch:
    """Batches of one -> one batch, texts right-padded to the longest."""
    width = max(s["input_ids"].shape[1] for s in singles)
    ids = torch.full((len(singles), width), pad_id, dtype=torch.long)
    mask = torch.zeros(len(singles), width, dtype=torch.long)
    for b, s in enumerate(singles):
        n = s["input_ids"].shape[1]
        ids[b, :n], mask[b, :n] = s["input_ids"][0], s["attention_mask"][0]
    return {"pixel_values": torch.cat([s["pixel_values"] for s in singles]), "input_ids": ids, "attention_mask": mask}


# ----------------------------------------------------------------------------------------------- models
def macs(model: SmartTrimModel, singles: list[Batch]) -> list[int]:
    """Per-instance matmul MACs of the inference path."""
    with torch.inference_mode():
        return [analytic_macs(model, model(one), one["input_ids"].shape[1]) for one in singles]


@contextlib.contextmanager
def unfused(model: SmartTrimModel) -> Iterator[None]:
    """Every trimmer called as a module (so forward hooks see its scores), not through ``FusedGuides``."""
    assert model.trimmers is not None
    model.trimmers.fused_guides = lambda layer: None  # type: ignore[method-assign]
    try:
        yield
    finally:
        del model.trimmers.fused_guides
        model.trimmers.__dict__.pop("_fused", None)  # rebuilt from the calibrated weights


def calibrate(model: SmartTrimModel, singles: list[Batch], rho: float, rho_heads: float, rounds: int = 2) -> None:
    """Shift every trimmer's output bias so that, on ``singles``, each token trimmer keeps a fraction ``rho`` of the
    trimmable tokens reaching it and each head trimmer ``rho_heads`` of its heads. Trimmers act in sequence (a
    shift changes what later ones see), so the shifts are re-estimated ``rounds`` times."""
    assert model.trimmers is not None
    trimmers = [m for m in model.trimmers.modules() if isinstance(m, TokenTrimmer | HeadTrimmer)]
    for _ in range(rounds):
        scores: dict[int, list[torch.Tensor]] = {id(m): [] for m in trimmers}

        def record(module: torch.nn.Module, args: Any, out: torch.Tensor,
                   scores: dict[int, list[torch.Tensor]] = scores) -> None:
            scores[id(module)].append(out[0, 1:] if isinstance(module, TokenTrimmer) else out[0])  # no prefix

        hooks = [m.register_forward_hook(record) for m in trimmers]
        try:
            with unfused(model), torch.inference_mode():
                for one in singles:
                    model(one)
        finally:
            for h in hooks:
                h.remove()
        with torch.no_grad():
            for m in trimmers:
                seen = torch.cat(scores[id(m)]) if scores[id(m)] else None
                if seen is None or seen.numel() == 0:
                    continue
                keep = rho if isinstance(m, TokenTrimmer) else rho_heads
                threshold = torch.quantile(seen.float(), 1.0 - keep)  # keep the scores above it
                m.output_layer.bias -= threshold


class TopKTrimmer(torch.nn.Module):
    """Static pruning: the same score network, but every instance keeps ``round(rho * N)`` of the N trimmable tokens
    reaching it, the top-scoring ones (scores +inf / -inf: ``decide`` thresholds them at 0)."""

    def __init__(self, inner: TokenTrimmer, rho: float) -> None:
        super().__init__()
        self.inner, self.rho = inner, rho

    def forward(self, x: torch.Tensor, c_self: torch.Tensor, c_other: torch.Tensor,
                query: torch.Tensor | None = None) -> torch.Tensor:
        scores = self.inner(x, c_self, c_other, query)  # (B, N)
        k = max(1, round(self.rho * (x.shape[1] - 1)))
        top = scores[:, 1:].topk(k, dim=1).indices + 1
        out = torch.full_like(scores, -torch.inf)
        out[:, 0] = torch.inf
        return out.scatter(1, top, torch.inf)


def smarttrim_model(backbone: SmartTrimModel, seed: int, trim: smarttrim.TrimConfig) -> SmartTrimModel:
    """SmartTrim with ``trim``'s trimmers, random (not stable-init) trimmer weights, the backbone's weights."""
    torch.manual_seed(seed)
    model = SmartTrimModel(backbone.config, trim)
    model.load_backbone_state_dict(backbone.backbone_state_dict())
    return model.eval()


def search(fn: Callable[[float], float], target: float, lo: float, hi: float, steps: int,
           tolerance: float = 0.02) -> float:
    """x in [lo, hi] with fn(x) ~ target, fn increasing in x: regula falsi on log fn (cost-like curves are near
    linear there), stopping within ``tolerance`` (relative) or after ``steps`` evaluations."""
    f_lo, f_hi = math.log(fn(lo)), math.log(fn(hi))
    goal, x = math.log(target), lo
    for _ in range(steps):
        x = lo + (goal - f_lo) * (hi - lo) / (f_hi - f_lo) if f_hi != f_lo else (lo + hi) / 2
        x = min(max(x, lo + 0.02 * (hi - lo)), hi - 0.02 * (hi - lo))  # stay inside the bracket
        f = math.log(fn(x))
        if abs(f - goal) < tolerance:
            return x
        if f < goal:
            lo, f_lo = x, f
        else:
            hi, f_hi = x, f
    return x


def adaptive(backbone: SmartTrimModel, singles: list[Batch], target: float, base_macs: float,
             steps: int) -> tuple[SmartTrimModel, float]:
    """SmartTrim calibrated to a mean FLOPs reduction ``target``; returns it and its rho."""
    trim = smarttrim.TrimConfig(stable_init=False, token_target_vision=0.5, token_target_text=0.5, head_target=0.5)
    model = smarttrim_model(backbone, 0, trim)
    start = {k: v.clone() for k, v in model.trimmers.state_dict().items()}

    def reduction(rho: float) -> float:
        model.trimmers.load_state_dict(start)
        calibrate(model, singles, rho, math.sqrt(rho))
        return base_macs / statistics.fmean(macs(model, singles))

    # cost 1 / reduction grows with rho; the last evaluation leaves the model calibrated at the returned rho
    rho = search(lambda r: 1.0 / reduction(r), 1.0 / target, 0.05, 1.0, steps)
    if not math.isclose(1.0 / reduction(rho), 1.0 / target, rel_tol=0.5):
        raise RuntimeError(f"calibration to {target}x failed (rho {rho})")
    return model, rho


def static(backbone: SmartTrimModel, singles: list[Batch], trim: smarttrim.TrimConfig, goal_macs: float,
           steps: int) -> tuple[SmartTrimModel, float]:
    """The static top-k reference: the adaptive model's visual token placements, a fixed keep fraction per layer
    searched to ``goal_macs`` per instance; no head and no text trimming."""
    vision_only = dataclasses.replace(trim, stable_init=False, token_target_text=1.0, head_target=1.0)
    model = smarttrim_model(backbone, 1, vision_only)
    tables = [model.trimmers.vision_tokens, model.trimmers.image_tokens]
    wrapped = [(t, k, TopKTrimmer(t[k], 1.0)) for t in tables for k in list(t.keys())]
    for table, key, topk in wrapped:
        table[key] = topk

    def cost(rho: float) -> float:
        for _, _, topk in wrapped:
            topk.rho = rho
        return statistics.fmean(macs(model, singles))

    rho = search(cost, goal_macs, 0.02, 1.0, steps)
    cost(rho)
    return model, rho


# ----------------------------------------------------------------------------------------------- timing
def interleaved(models: dict[str, SmartTrimModel], inputs: list[Batch], repeats: int, device: torch.device,
                autocast: bool) -> tuple[dict[str, list[float]], int | None]:
    """Every model on every input, back to back per input (the order reversed on odd inputs), ``repeats`` passes:
    the profile stage's warm-up, timer and interleaving, the warm-up over every input (one warm-up input was not
    enough: the first timed pass then paid ~10^5 page faults at meter-base, batch size 8, and ~10^6 at 64).
    Returns the times and the page faults inside the timed passes (None where not counted)."""
    fns = list(models.values())
    ctx = torch.autocast(device.type, dtype=torch.bfloat16) if autocast else contextlib.nullcontext()
    with torch.inference_mode(), ctx:
        warm_up(fns, inputs)
        start = minor_faults()
        times = interleaved_times(fns, inputs, repeats, partial(timed, device=device))
        faults = faults_since(start)
    return dict(zip(models, times, strict=True)), faults


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="meter-base")
    parser.add_argument("--image-size", type=int, default=None, help="default: the preset's (meter-base: 288)")
    parser.add_argument("--model", default=None, help="a trained SmartTrim model directory (its own trimmers)")
    parser.add_argument("--targets", default="2,3", help="FLOPs reductions of the calibrated SmartTrim models")
    parser.add_argument("--batch-sizes", default="1,8,32,64")
    parser.add_argument("--instances", type=int, default=64, help="inputs (batch size 1: the first 16 of them)")
    parser.add_argument("--single-instances", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (GPU)")
    parser.add_argument("--search-steps", type=int, default=8)
    parser.add_argument("--shards", default=None)
    parser.add_argument("--split", default="val")
    parser.add_argument("--no-static", action="store_true", help="skip the static top-k reference")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    allocator = keep_freed_memory()
    torch.manual_seed(0)
    device = torch.device(args.device)

    if args.model:
        trained = smarttrim.load_model(args.model).eval()
        backbone = SmartTrimModel(trained.config, None)
        backbone.load_backbone_state_dict(trained.backbone_state_dict())
        backbone.eval()
    else:
        overrides = {"image_size": args.image_size} if args.image_size else {}
        backbone = smarttrim.build_model(args.preset, task="vqa", num_labels=100, dropout=0.0, **overrides).eval()
    cfg = backbone.config
    singles = shapes_inputs(cfg.image_size, cfg.max_text_len, args.instances, args.shards, args.split)
    calib = singles[: args.single_instances]
    per_instance: dict[str, list[int]] = {"backbone": macs(backbone, singles)}  # MACs of every model on every input
    base = statistics.fmean(per_instance["backbone"])

    models: dict[str, SmartTrimModel] = {"backbone": backbone}
    info: dict[str, dict[str, Any]] = {"backbone": {"mmacs": base / 1e6}}
    keep_all = smarttrim_model(backbone, 0, smarttrim.TrimConfig())  # stable init: every decision keeps
    models["keep_all"], info["keep_all"] = keep_all, {}
    adaptives: list[tuple[str, SmartTrimModel]] = []
    if args.model:
        adaptives.append(("smarttrim-trained", trained))
        info["smarttrim-trained"] = {}
    else:
        for target in (float(t) for t in args.targets.split(",")):
            model, rho = adaptive(backbone, calib, target, statistics.fmean(macs(backbone, calib)),
                                  args.search_steps)
            name = f"smarttrim-{target:g}x"
            adaptives.append((name, model))
            info[name] = {"rho_tokens": round(rho, 4), "rho_heads": round(math.sqrt(rho), 4)}
    for name, model in adaptives:
        models[name] = model
        per = per_instance[name] = macs(model, singles)
        info[name].update({"mmacs": statistics.fmean(per) / 1e6, "flops_reduction": base / statistics.fmean(per),
                           "mmacs_min": min(per) / 1e6, "mmacs_max": max(per) / 1e6})
        if not args.no_static:
            ref, rho = static(backbone, calib, model.trim_config, statistics.fmean(per), args.search_steps)
            sname = name.replace("smarttrim", "static")
            models[sname] = ref
            sper = per_instance[sname] = macs(ref, singles)
            info[sname] = {"rho_tokens": round(rho, 4), "mmacs": statistics.fmean(sper) / 1e6,
                           "flops_reduction": base / statistics.fmean(sper),
                           # visual tokens alone may not reach a high target (text and the untrimmed parts remain)
                           "flops_matched": abs(statistics.fmean(sper) / statistics.fmean(per) - 1) < 0.05}
    per_instance["keep_all"] = macs(keep_all, singles)
    info["keep_all"].update({"mmacs": statistics.fmean(per_instance["keep_all"]) / 1e6})
    info["keep_all"]["flops_reduction"] = base / (info["keep_all"]["mmacs"] * 1e6)

    for m in models.values():
        m.to(device)
    results: dict[str, Any] = {name: dict(v) for name, v in info.items()}
    page_faults: dict[str, int | None] = {}  # inside each batch size's timed passes
    for bs in (int(b) for b in args.batch_sizes.split(",")):
        if bs == 1:
            covered = list(range(min(args.single_instances, len(singles))))
            inputs = [to_device(singles[i], device) for i in covered]
        else:  # whole batches of the inputs; one batch of the inputs repeated when there are fewer than bs
            starts = range(0, len(singles) - bs + 1, bs)
            groups = [list(range(i, i + bs)) for i in starts] or [[j % len(singles) for j in range(bs)]]
            covered = [j for g in groups for j in g]
            inputs = [to_device(collate([singles[j] for j in g], cfg.pad_token_id), device) for g in groups]
        times, faults = interleaved(models, inputs, args.repeats, device, args.bf16)
        page_faults[f"bs{bs}"] = faults
        base_here = statistics.fmean(per_instance["backbone"][j] for j in covered)
        for name in models:
            # mean time over the same inputs as the mean FLOPs (the profile stage's convention)
            speedup = sum(times["backbone"]) / sum(times[name])
            if bs == 1:
                entry = {"latency_ms": round(statistics.fmean(times[name]), 3),
                         "latency_median_ms": round(statistics.median(times[name]), 3),
                         "latency_speedup": round(speedup, 3)}
            else:
                entry = {"throughput_per_s": round(len(times[name]) * bs / (sum(times[name]) / 1000), 2),
                         "throughput_speedup": round(speedup, 3)}
            if name != "backbone":  # FLOPs and efficiency on exactly the inputs timed here
                reduction = base_here / statistics.fmean(per_instance[name][j] for j in covered)
                entry.update({"flops_reduction": round(reduction, 3), "efficiency": round(speedup / reduction, 3)})
            results[name][f"bs{bs}"] = entry
    out = {"preset": cfg.name, "image_size": cfg.image_size, "device": args.device, "threads": args.threads,
           "bf16": args.bf16, "instances": len(singles), "allocator_keeps_freed_memory": allocator,
           "page_faults_timed": page_faults,
           "torch": torch.__version__,
           "cpu": platform.processor() or platform.machine(), "model": args.model, "results": results}
    print(json.dumps(out, indent=2))
    return out


if __name__ == "__main__":
    main()
