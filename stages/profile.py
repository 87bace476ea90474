"""Profile stage: per-instance FLOPs (the paper's protocol) and latency of an exported model.

    python -m stages.profile --model runs/x/model --shards data/shapes-vqa --split val --out runs/x/profile

* FLOPs: torchprofile MACs of every instance of an evaluation subset, one unpadded instance at a time, on
  the inference (pruning) path: mean, median, min/max, a histogram (the paper's Figure 7) and the ratio to
  the untrimmed backbone (the same weights without trimmers) on the same instances.
* Latency: single-instance median and p90 over the same subset after warm-up, and batched throughput;
  fixed CPU threads, CUDA synchronized when on GPU. Every figure is recorded with its device, threads and
  batch size.

Writes ``profile.json`` and ``flops_hist.png`` into ``--out`` (atomically: a temp dir, then a swap).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from smarttrim.data.loader import LoaderConfig, make_loader, shard_tokenizer
from smarttrim.flops import count_flops, strip_padding
from smarttrim.io import load_model
from smarttrim.model import SmartTrimModel
from stages.common import (
    ModelDataConfig,
    StageOutputs,
    add_model_data_args,
    resolve_device,
    stage_parser,
    to_device,
    write_outputs,
)


@dataclass(frozen=True)
class ProfileConfig(ModelDataConfig):
    instances: int = 100
    """Size of the evaluation subset (the split's first instances, each counted once)."""
    batch_size: int = 32
    """Batch size of the throughput measurement."""
    warmup: int = 3

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("instances", "batch_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup!r}: must be >= 0")


def backbone_of(model: SmartTrimModel) -> SmartTrimModel:
    """The untrimmed backbone with the same weights (the FLOPs reference)."""
    backbone = SmartTrimModel(model.config, None)
    backbone.load_backbone_state_dict(model.backbone_state_dict())
    return backbone.eval()


def _instances(cfg: ProfileConfig, model: SmartTrimModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The subset as unpadded batches of one, and as batches of ``batch_size`` (for throughput)."""
    tokenizer = shard_tokenizer(cfg.shards, cfg.tokenizer)
    loader_cfg = LoaderConfig(batch_size=cfg.batch_size, image_size=model.config.image_size,
                              max_text_len=model.config.max_text_len)
    batches, singles = [], []
    for batch in make_loader(cfg.shards, cfg.split, tokenizer, loader_cfg):
        batches.append(batch)
        for i in range(len(batch["keys"])):
            one = {k: v[i: i + 1] for k, v in batch.items() if isinstance(v, torch.Tensor)}
            singles.append({**strip_padding(one), "keys": batch["keys"][i: i + 1]})
        if len(singles) >= cfg.instances:
            break
    return singles[: cfg.instances], batches


def _timed(fn: Any, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


def _histogram_png(path: Path, macs: list[int], backbone: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist([m / 1e9 for m in macs], bins=min(30, max(5, len(set(macs)))), color="#3b7dd8")
    ax.axvline(backbone / 1e9, color="#d83b3b", linestyle="--", label="backbone (mean)")
    ax.set_xlabel("GFLOPs (MACs) per instance")
    ax.set_ylabel("instances")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(cfg: ProfileConfig) -> StageOutputs:
    """Profile ``cfg.model`` on ``cfg.instances`` instances of ``cfg.split``; writes JSON + PNG to ``cfg.out``."""
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    model = load_model(cfg.model).eval()
    singles, batches = _instances(cfg, model)
    if not singles:
        raise ValueError(f"{cfg.shards}: split {cfg.split!r} has no instances to profile")
    backbone = backbone_of(model)
    macs = [count_flops(model, one) for one in singles]
    backbone_macs = [count_flops(backbone, one) for one in singles]

    model.to(device)
    with torch.inference_mode():
        for one in singles[: cfg.warmup]:
            model(to_device(one, device))
        latency = [_timed(lambda one=one: model(to_device(one, device)), device) for one in singles]
        for batch in batches[:1] * cfg.warmup:
            model(to_device(batch, device))
        batched = [(len(b["keys"]), _timed(lambda b=b: model(to_device(b, device)), device)) for b in batches]
    n_batched = sum(n for n, _ in batched)
    metrics = {
        "model": str(cfg.model), "shards": str(cfg.shards), "split": cfg.split, "instances": len(singles),
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": cfg.threads, "trim": None if model.trim_config is None else model.trim_config.to_dict(),
        "flops": {
            "unit": "MACs (torchprofile), batch of one, unpadded", "mean": statistics.fmean(macs),
            "median": statistics.median(macs), "min": min(macs), "max": max(macs),
            "std": statistics.pstdev(macs), "backbone_mean": statistics.fmean(backbone_macs),
            "ratio_to_backbone": statistics.fmean(macs) / statistics.fmean(backbone_macs),
            "per_instance": dict(zip([one["keys"][0] for one in singles], macs, strict=True)),
        },
        "latency_ms_bs1": {"median": statistics.median(latency),
                           "p90": sorted(latency)[int(0.9 * (len(latency) - 1))], "batch_size": 1},
        "throughput": {"instances_per_s": n_batched / (sum(t for _, t in batched) / 1000),
                       "batch_size": cfg.batch_size, "instances": n_batched},
        "config": asdict(cfg),
    }
    title = f"{model.config.name} / {cfg.split}: {len(macs)} instances"
    write_outputs(Path(cfg.out), {
        "profile.json": lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"),
        "flops_hist.png": lambda p: _histogram_png(p, macs, metrics["flops"]["backbone_mean"], title),
    })
    return StageOutputs(Path(cfg.out), metrics)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.profile", __doc__ or "")
    add_model_data_args(parser)
    parser.add_argument("--instances", type=int, default=100, help="evaluation subset size")
    parser.add_argument("--batch-size", type=int, default=32, help="batch size of the throughput run")
    parser.add_argument("--warmup", type=int, default=3)
    args = parser.parse_args(argv)
    try:
        result = run(ProfileConfig(**vars(args)))
    except (ValueError, FileNotFoundError) as err:
        print(f"profile: error: {err}", file=sys.stderr)
        return 1
    f, lat = result.metrics["flops"], result.metrics["latency_ms_bs1"]
    print(f"{result.out}: {f['mean'] / 1e9:.4f} GMACs mean ({f['ratio_to_backbone']:.2f}x backbone), "
          f"latency {lat['median']:.1f} ms median, {result.metrics['throughput']['instances_per_s']:.1f}/s batched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
