"""Profile stage: per-instance FLOPs (the paper's protocol), and latency and throughput side by side with the backbone.

    python -m stages.profile --model runs/x/model --shards data/shapes-vqa --split val --out runs/x/profile

* FLOPs: torchprofile MACs of every instance of an evaluation subset, one unpadded instance at a time, on
  the inference (pruning) path: mean, median, min/max, a histogram (the paper's Figure 7) and the ratio to
  the untrimmed backbone (the same weights without trimmers) on the same instances.
* Latency and throughput, side by side: absolute milliseconds from separate runs are not comparable on a
  shared machine, so the model and its untrimmed backbone are timed interleaved in one process, on the
  same instances, with the same threads: after warm-up of both (``warm_up``: the first ``--warmup`` instances, then
  the first batch, pass after pass until a pass pays no page faults), each instance (and each batch of
  ``--batch-size``) is run by the model and the backbone back to back, the model first on even instances
  and the backbone first on odd ones, and the whole pass is repeated ``--repeats`` times. CUDA is
  synchronized around every timed call when on GPU. Every figure is recorded with its device, threads and
  batch size.
* A model without trimmers is timed against its backbone all the same (two module objects with equal
  weights): its speedups then measure the noise floor of the method (about 1.0).

``profile.json`` keys: ``flops`` (above), ``latency_ms_bs1`` and ``backbone_latency_ms_bs1`` (mean, median,
p90 over all timed single-instance runs), ``throughput`` (the model's instances per second on the batches)
and ``backbone_throughput``, and ``speedup``: backbone / model mean latency (``latency_bs1``; the mean is what
the mean FLOPs predict), the ratio of medians (``latency_bs1_median``), model / backbone throughput, backbone
/ model mean MACs (``flops``), each speedup over the FLOPs reduction (``latency_efficiency``,
``throughput_efficiency``: 1.0 when time falls as fast as FLOPs), the ``method`` and ``page_faults_timed``
(``bs1`` / ``batched``: the process's page faults inside each timed loop; the allocator keeps freed memory,
``stages.common.keep_freed_memory``, so a large count means warm-up did not reach the memory high-water mark
and some model paid first touches of fresh memory while timed).

Writes ``profile.json`` and ``flops_hist.png`` into ``--out`` (atomically: a temp dir, then a swap).
"""

from __future__ import annotations

import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from stages.common import (
    ModelDataConfig,
    StageOutputs,
    add_model_data_args,
    faults_since,
    keep_freed_memory,
    minor_faults,
    resolve_device,
    stage_parser,
    stage_tokenizer,
    to_device,
    write_outputs,
)
from stages.progress import Progress, say

if TYPE_CHECKING:  # torch and the model load when a stage runs, not with the module: --help is instant
    import torch

    from smarttrim.model import SmartTrimModel


@dataclass(frozen=True)
class ProfileConfig(ModelDataConfig):
    instances: int = 100
    """Size of the evaluation subset (the split's first instances, each counted once)."""
    batch_size: int = 32
    """Batch size of the throughput measurement."""
    warmup: int = 3
    """Warm-up instances (and batches) of each of the model and the backbone before timing."""
    repeats: int = 3
    """Interleaved timing passes over the subset (and over the batches)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("instances", "batch_size", "repeats"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        if self.warmup < 0:
            raise ValueError(f"warmup={self.warmup!r}: must be >= 0")


def backbone_of(model: SmartTrimModel) -> SmartTrimModel:
    """The untrimmed backbone with the same weights (the FLOPs reference)."""
    from smarttrim.model import SmartTrimModel

    backbone = SmartTrimModel(model.config, None)
    backbone.load_backbone_state_dict(model.backbone_state_dict())
    return backbone.eval()


def backbone_flops(backbone: SmartTrimModel, singles: list[dict[str, Any]]) -> list[int]:
    """torchprofile MACs of the untrimmed backbone per instance. Its work depends on the input's shape alone (the
    images have one size; the text length varies), so each distinct text length is traced once."""
    from smarttrim.flops import count_flops

    by_length: dict[int, int] = {}
    out = []
    for one in singles:
        n = int(one["attention_mask"][0].sum())
        if n not in by_length:
            by_length[n] = count_flops(backbone, one)
        out.append(by_length[n])
    return out


def _instances(cfg: ProfileConfig, model: SmartTrimModel) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The subset as unpadded batches of one, and as batches of ``batch_size`` (for throughput)."""
    import torch

    from smarttrim.data.loader import LoaderConfig, make_loader
    from smarttrim.flops import strip_padding

    tokenizer = stage_tokenizer(cfg)
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


def timed(fn: Callable[[], object], device: torch.device) -> float:
    """Wall milliseconds of ``fn()``, CUDA synchronized before and after when on GPU."""
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) * 1000


T = TypeVar("T")


def interleaved_times(fns: Sequence[Callable[[T], object]], inputs: Sequence[T], repeats: int,
                      timer: Callable[[Callable[[], object]], float]) -> list[list[float]]:
    """Time (``timer(thunk)``) every function on every input, back to back per input: in ``fns`` order on even
    inputs, reversed on odd ones (so neither is favoured by caches or clock ramps), the pass ``repeats`` times.

    Returns one list per function: its ``repeats * len(inputs)`` times (``timer`` units), pass after pass."""
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for i, x in enumerate(inputs):
            order = range(len(fns)) if i % 2 == 0 else reversed(range(len(fns)))
            for f in order:
                times[f].append(timer(lambda f=f, x=x: fns[f](x)))
    return times


WARM_FAULTS = 1000
"""A warm-up pass with fewer page faults than this (4 MB of fresh pages) ends the warm-up."""


def warm_up(fns: Sequence[Callable[[T], object]], inputs: Sequence[T], max_passes: int = 3) -> int:
    """Untimed passes of every function over every input until one pays fewer than ``WARM_FAULTS`` page faults
    (the heap has reached its high-water mark: it grows over a pass or two), at most ``max_passes``; one pass where
    faults are not counted. Returns the passes run."""
    for done in range(1, max_passes + 1):
        start = minor_faults()
        for x in inputs:
            for fn in fns:
                fn(x)
        faults = faults_since(start)
        if faults is None or faults < WARM_FAULTS:
            return done
    return max_passes


def _latency_stats(times: list[float]) -> dict[str, float | int]:
    """Mean, median and p90 (ms) of single-instance times."""
    return {"median": statistics.median(times), "p90": sorted(times)[int(0.9 * (len(times) - 1))],
            "mean": statistics.fmean(times), "batch_size": 1}


def _side_by_side(cfg: ProfileConfig, models: Sequence[SmartTrimModel], singles: list[dict[str, Any]],
                  batches: list[dict[str, Any]], device: torch.device
                  ) -> tuple[list[list[float]], list[list[float]], dict[str, int | None]]:
    """Warm up every model, then time them interleaved: single-instance times, then batch times (ms), and the
    page faults paid inside each timed loop (None where not counted)."""
    import torch

    fns = [lambda x, m=m: m(to_device(x, device)) for m in models]
    timer = partial(timed, device=device)
    faults: dict[str, int | None] = {}
    with torch.inference_mode():
        warm_up(fns, singles[: cfg.warmup])
        start = minor_faults()
        single = interleaved_times(fns, singles, cfg.repeats, timer)
        faults["bs1"] = faults_since(start)
        warm_up(fns, batches[:1], max_passes=max(cfg.warmup, 1))
        start = minor_faults()
        batched = interleaved_times(fns, batches, cfg.repeats, timer)
        faults["batched"] = faults_since(start)
    return single, batched, faults


def _histogram_png(path: Path, macs: list[int], backbone: float, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=120)
    ax.hist([m / 1e6 for m in macs], bins=min(30, max(5, len(set(macs)))), color="#3b7dd8")
    ax.axvline(backbone / 1e6, color="#d83b3b", linestyle="--", label="backbone (mean)")
    ax.set_xlabel("MMACs (millions of multiply-accumulates) per instance")
    ax.set_ylabel("instances")
    ax.set_title(title)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def run(cfg: ProfileConfig, label: str | None = None) -> StageOutputs:
    """Profile ``cfg.model`` on ``cfg.instances`` instances of ``cfg.split``; writes JSON + PNG to ``cfg.out``.
    Progress lines name the model by ``label`` (default: the output directory's name)."""
    import torch

    from smarttrim.flops import count_flops
    from smarttrim.io import load_model

    device = resolve_device(cfg.device)
    torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    model = load_model(cfg.model).eval()
    singles, batches = _instances(cfg, model)
    if not singles:
        raise ValueError(f"{cfg.shards}: split {cfg.split!r} has no instances to profile")
    backbone = backbone_of(model)
    prefix = f"[profile {label or Path(cfg.out).name}] {cfg.split}:"
    progress = Progress(f"{prefix} MACs of", len(singles), "instances")
    macs = []
    for one in singles:
        macs.append(count_flops(model, one))
        progress.update(len(macs))
    backbone_macs = backbone_flops(backbone, singles)
    progress.finish(f" ({statistics.fmean(macs) / 1e6:.4g} MMACs mean, the backbone's "
                    f"{statistics.fmean(backbone_macs) / 1e6:.4g})")
    say(f"{prefix} timing {len(singles)} instances and {len(batches)} batches against the backbone, "
        f"{cfg.repeats} interleaved passes")

    model.to(device)
    backbone.to(device)
    (latency, backbone_latency), (batched, backbone_batched), faults = _side_by_side(
        cfg, [model, backbone], singles, batches, device)
    n_batched = sum(len(b["keys"]) for b in batches)
    per_s = n_batched * cfg.repeats / (sum(batched) / 1000)
    backbone_per_s = n_batched * cfg.repeats / (sum(backbone_batched) / 1000)
    lat, backbone_lat = _latency_stats(latency), _latency_stats(backbone_latency)
    flops_speedup = statistics.fmean(backbone_macs) / statistics.fmean(macs)
    latency_speedup, throughput_speedup = backbone_lat["mean"] / lat["mean"], per_s / backbone_per_s
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
        "latency_ms_bs1": lat,
        "backbone_latency_ms_bs1": backbone_lat,
        "throughput": {"instances_per_s": per_s, "batch_size": cfg.batch_size, "instances": n_batched},
        "backbone_throughput": {"instances_per_s": backbone_per_s},
        "speedup": {
            "latency_bs1": latency_speedup, "latency_bs1_median": backbone_lat["median"] / lat["median"],
            "throughput": throughput_speedup, "flops": flops_speedup,
            "latency_efficiency": latency_speedup / flops_speedup,
            "throughput_efficiency": throughput_speedup / flops_speedup,
            "method": f"interleaved in one process: same instances, same threads, alternating order, "
                      f"{cfg.repeats} passes",
            "page_faults_timed": faults,
        },
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
    parser.add_argument("--warmup", type=int, default=3, help="warm-up instances (and batches) of each model")
    parser.add_argument("--repeats", type=int, default=3, help="interleaved timing passes")
    args = parser.parse_args(argv)
    try:
        result = run(ProfileConfig(**vars(args)))
    except (ValueError, FileNotFoundError) as err:
        print(f"profile: error: {err}", file=sys.stderr)
        return 1
    f, lat, sp = result.metrics["flops"], result.metrics["latency_ms_bs1"], result.metrics["speedup"]
    print(f"{result.out}: {f['mean'] / 1e6:.4g} MMACs mean, {sp['flops']:.2f}x fewer MACs, "
          f"bs1 latency {sp['latency_bs1']:.2f}x faster ({lat['median']:.1f} ms median), batched throughput "
          f"{sp['throughput']:.2f}x ({result.metrics['throughput']['instances_per_s']:.1f}/s) "
          f"(interleaved with its backbone)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
