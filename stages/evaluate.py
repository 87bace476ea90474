"""Evaluate stage: task metrics of an exported model on the inference path (real pruning).

    python -m stages.evaluate --model runs/x/model --shards data/shapes-vqa --split val --out runs/x/eval

Every sample of the split is evaluated exactly once, in batches, on the pruning path. Writes
``predictions.jsonl`` (per instance: key, predicted label, its score, keep ratio per trimmer group) and
``metrics.json``. Metrics: VQA score (soft accuracy of the argmax answer against the shards' METER/ViLT
soft scores, computed from officially normalized answers), NLVR2 and SNLI-VE accuracy. Retrieval (R@K with
ITM re-ranking) is not implemented yet and is refused with an error.
"""

from __future__ import annotations

import json
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from smarttrim.data.loader import LoaderConfig, make_loader, read_manifest, shard_tokenizer
from smarttrim.io import load_model
from stages.common import (
    ModelDataConfig,
    StageOutputs,
    add_model_data_args,
    resolve_device,
    stage_parser,
    write_outputs,
)

METRICS = {"vqa": "vqa_score", "nlvr2": "accuracy", "snli_ve": "accuracy"}


@dataclass(frozen=True)
class EvaluateConfig(ModelDataConfig):
    batch_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.batch_size < 1:
            raise ValueError(f"batch_size={self.batch_size!r}: must be >= 1")


def run(cfg: EvaluateConfig) -> StageOutputs:
    """Evaluate ``cfg.model`` on every sample of ``cfg.split``; writes predictions and metrics to ``cfg.out``."""
    manifest = read_manifest(cfg.shards)
    task = manifest["task"]
    if task not in METRICS:
        raise ValueError(f"{cfg.shards}: task {task!r} is not evaluated yet (vqa, nlvr2, snli_ve are)")
    model = load_model(cfg.model).eval()
    if model.config.task != task:
        raise ValueError(f"{cfg.model}: model task {model.config.task!r} does not match the shards' {task!r}")
    labels = manifest["labels"]
    if model.config.num_labels != len(labels):
        raise ValueError(f"{cfg.model}: {model.config.num_labels} labels, the shards have {len(labels)}")
    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    model.to(device)
    tokenizer = shard_tokenizer(cfg.shards, cfg.tokenizer)
    loader = make_loader(cfg.shards, cfg.split, tokenizer, LoaderConfig(
        batch_size=cfg.batch_size, image_size=model.config.image_size, max_text_len=model.config.max_text_len))
    rows: list[dict[str, Any]] = []
    with torch.inference_mode():
        for batch in loader:
            if "labels" not in batch:
                raise ValueError(f"{cfg.shards}: split {cfg.split!r} has no labels to evaluate against")
            out = model({k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()})
            pred = out.logits.argmax(-1).cpu()
            truth = batch["labels"]
            scores = truth.gather(1, pred[:, None])[:, 0] if task == "vqa" else (pred == truth).float()
            for i, key in enumerate(batch["keys"]):
                rows.append({"key": key, "prediction": labels[int(pred[i])], "score": float(scores[i]),
                             "keep": {g: float(v[i]) for g, v in out.keep_groups.items()}})
    if not rows:
        raise ValueError(f"{cfg.shards}: split {cfg.split!r} is empty")
    groups = sorted({g for r in rows for g in r["keep"]})
    metrics = {
        "task": task, "split": cfg.split, "metric_name": METRICS[task],
        "metric": sum(r["score"] for r in rows) / len(rows), "instances": len(rows),
        "keep": {g: sum(r["keep"][g] for r in rows) / len(rows) for g in groups},
        "majority_baseline": manifest.get("majority_baseline", {}).get("score", {}).get(cfg.split),
        "device": str(device), "config": asdict(cfg),
    }
    write_outputs(Path(cfg.out), {
        "predictions.jsonl": lambda p: p.write_text("".join(json.dumps(r) + "\n" for r in rows)),
        "metrics.json": lambda p: p.write_text(json.dumps(metrics, indent=2) + "\n"),
    })
    return StageOutputs(Path(cfg.out), metrics)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.evaluate", __doc__ or "")
    add_model_data_args(parser)
    parser.add_argument("--batch-size", type=int, default=64)
    args = parser.parse_args(argv)
    try:
        result = run(EvaluateConfig(**vars(args)))
    except (ValueError, FileNotFoundError) as err:
        print(f"evaluate: error: {err}", file=sys.stderr)
        return 1
    m = result.metrics
    print(f"{result.out}: {m['metric_name']} {m['metric']:.4f} on {m['instances']} {m['split']} instances")
    return 0


if __name__ == "__main__":
    sys.exit(main())
