"""Pre-training stage: METER's objectives (MLM + ITM with hard negatives) on image-caption shards.

    python -m stages.shard --source shapes --task caption --out data/shapes-caption --sizes 40000 1000 1000
    python -m stages.pretrain --shards data/shapes-caption --out runs/pretrain --preset meter-small \\
        --max-steps 6000 --num-workers 2 --set train.precision=bf16-mixed

The same machinery as ``stages.finetune`` (Ray Train V2 workers, DeepSpeed, exact resume, NaN stop, atomic
export) with ``objective='pretrain'``: the model is the retrieval model (METER's ITM head) plus METER's MLM
head; every step computes masked language modelling on the true captions and image-text matching on pairs of
which half have a hard negative caption (``smarttrim.pretraining``, ``smarttrim.data.loader.Collate``). Any
image-caption shards serve: the built-in ``shapes`` captions or Karpathy COCO / Flickr30K (``retrieval`` or
``caption`` shards of ``stages.shard``).

Writes ``--out`` as the fine-tune stage does (``model/``: a retrieval model loadable by
``smarttrim.load_model``, ``mlm_head.safetensors`` and the tokenizer; ``metrics.json``, ``history.jsonl``,
``curves.png``), then evaluates the export on the whole validation split (``--val-split``): ITM accuracy on
its pairs (half hard negatives) and MLM accuracy on its masked tokens, added to ``metrics.json`` under
``evaluation``. ``model/`` is what ``FinetuneConfig.pretrained`` (``--pretrained`` of ``stages.finetune``,
``model.pretrained`` of the pipeline) starts a task model from.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

from smarttrim.atomic import atomic_write
from stages import finetune
from stages.common import StageOutputs, apply_overrides, stage_parser
from stages.finetune_config import FinetuneConfig
from stages.progress import MetricsSink, quiet_ray_logs

if TYPE_CHECKING:  # torch and the model load when a stage runs, not with the module: --help is instant
    from smarttrim.pretraining import PretrainModel


def load_pretrain_model(path: str | Path) -> PretrainModel:
    """The exported ``model/`` of a pre-training (the ITM model and its MLM head) as a ``PretrainModel``."""
    from safetensors.torch import load_file

    from smarttrim.io import load_model, read_config
    from smarttrim.pretraining import MLM_HEAD_FILE, PretrainModel

    model = PretrainModel(read_config(path)[0])
    model.vlm.load_state_dict(load_model(path).state_dict())
    model.mlm_head.load_state_dict(load_file(Path(path) / MLM_HEAD_FILE))
    return model


def evaluate_pretraining(model_dir: str | Path, shards: str, split: str, batch_size: int = 64,
                         limit: int | None = None, threads: int = 2) -> dict[str, Any]:
    """ITM accuracy (pairs of the deterministic ``pretrain`` collate: half hard negatives) and MLM accuracy (its
    masked tokens) of an exported pre-training on ``split`` (its first ``limit`` samples; None = all), and the
    MLM accuracy with each batch's images rolled by one (what the text alone gives: the gap is grounding)."""
    import torch

    from smarttrim.data.loader import LoaderConfig, make_loader, shard_tokenizer
    from smarttrim.pretraining import pretrain_accuracy

    torch.set_num_threads(threads)
    model = load_pretrain_model(model_dir).eval()
    tokenizer = shard_tokenizer(shards, Path(model_dir) / "tokenizer")
    loader = make_loader(shards, split, tokenizer, LoaderConfig(
        batch_size=batch_size, image_size=model.config.image_size, max_text_len=model.config.max_text_len,
        objective="pretrain"))
    sums: dict[str, float] = {}
    seen = 0
    with torch.inference_mode():
        for batch in loader:
            for k, v in pretrain_accuracy(model(batch), batch).items():
                sums[k] = sums.get(k, 0.0) + float(v)
            if len(batch["keys"]) > 1:  # the masked words again, each caption with another instance's image
                rolled = model({**batch, "pixel_values": batch["pixel_values"].roll(1, 0)})
                for k, v in pretrain_accuracy(rolled, batch).items():
                    sums[f"rolled_{k}"] = sums.get(f"rolled_{k}", 0.0) + float(v)
            seen += len(batch["keys"])
            if limit is not None and seen >= limit:
                break
    if not seen:
        raise ValueError(f"{shards}: split {split!r} is empty")
    out = {"split": split, "samples": seen, "itm_accuracy": sums["itm_correct"] / sums["itm_pairs"],
           "itm_pairs": int(sums["itm_pairs"]), "mlm_accuracy": sums["mlm_correct"] / max(1.0, sums["mlm_tokens"]),
           "mlm_tokens": int(sums["mlm_tokens"])}
    if "rolled_mlm_tokens" in sums:  # how much of the MLM accuracy comes from the image
        out["mlm_accuracy_permuted_images"] = sums["rolled_mlm_correct"] / max(1.0, sums["rolled_mlm_tokens"])
    return out


def run(cfg: FinetuneConfig, val_split: str = "val", label: str | None = None,
        sink: MetricsSink | None = None) -> StageOutputs:
    """Pre-train as configured (``cfg.objective`` must be ``pretrain``), then evaluate the export on ``val_split``
    (``label``, ``sink``: as ``stages.finetune.run``'s)."""
    from smarttrim.data.loader import read_manifest
    from stages.train_loop import EXPORT_DIR

    if cfg.objective != "pretrain":
        raise ValueError(f"objective={cfg.objective!r}: the pre-training stage runs objective='pretrain'")
    manifest = read_manifest(cfg.shards)
    if val_split not in manifest["splits"]:
        raise ValueError(f"{cfg.shards}: no split {val_split!r} to evaluate on (has {sorted(manifest['splits'])})")
    result = finetune.run(cfg, label, sink)
    metrics = dict(result.metrics)
    if metrics.get("evaluation", {}).get("split") != val_split:
        metrics["evaluation"] = evaluate_pretraining(result.out / EXPORT_DIR, cfg.shards, val_split,
                                                     threads=cfg.threads)
        text = json.dumps(metrics, indent=2) + "\n"
        atomic_write(result.out / "metrics.json", lambda tmp: Path(tmp).write_text(text))
    return StageOutputs(result.out, metrics)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.pretrain", __doc__ or "")
    parser.add_argument("--shards", required=True, help="image-caption shards (caption or retrieval task)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--preset", default="meter-small", help="model preset")
    parser.add_argument("--image-size", type=int, help="input resolution (default: the preset's)")
    parser.add_argument("--init", help="a pre-training export to continue from")
    parser.add_argument("--max-steps", type=int, required=True)
    parser.add_argument("--batch-size", type=int, default=32, help="micro-batch per worker")
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--num-workers", type=int, default=1, help="Ray Train workers")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per worker")
    parser.add_argument("--val-split", default="val")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override any FinetuneConfig field, e.g. train.warmup=0.05 checkpoint_every=500")
    args = parser.parse_args(argv)
    quiet_ray_logs()  # before Ray is imported
    try:
        data = FinetuneConfig(shards=args.shards, out=args.out, objective="pretrain").to_dict()
        data.update(preset=args.preset, image_size=args.image_size, init=args.init, num_workers=args.num_workers,
                    threads=args.threads, val_split=args.val_split,
                    train={**data["train"], "max_steps": args.max_steps, "batch_size": args.batch_size,
                           "lr": args.lr, "lr_mult_cross_modal": 1.0, "lr_mult_head": 1.0})
        cfg = FinetuneConfig.from_dict(apply_overrides(data, args.set))
        result = run(cfg, args.val_split)
    except (ValueError, FileNotFoundError, finetune.FinetuneError) as err:
        print(f"pretrain: error: {err}", file=sys.stderr)
        return 1
    from stages.train_loop import EXPORT_DIR

    ev = result.metrics["evaluation"]
    print(f"{result.out}: {result.metrics['steps']} steps; {ev['split']}: ITM accuracy {ev['itm_accuracy']:.4f} "
          f"({ev['itm_pairs']} pairs, half hard negatives), MLM accuracy {ev['mlm_accuracy']:.4f} "
          f"({ev['mlm_tokens']} masked tokens); model in {result.out / EXPORT_DIR}")
    return 0


__all__ = ["evaluate_pretraining", "load_pretrain_model", "main", "run"]


if __name__ == "__main__":
    sys.exit(main())
