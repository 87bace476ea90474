"""Does trimming make the inference path faster? Single-instance latency and batched throughput of the
pruning path at fixed keep ratios r, against the untrimmed backbone. Prints one JSON object.

Keep ratios are set without training: tokens by the ``random`` token trimmer at target r (each group's mean
keep ratio is r; reseeded before every call so every repeat prunes the same tokens), heads by head trimmers
whose score is a constant per head keeping the first round(r * H) heads of every attention module. Random
weights stand in for trained ones: latency does not depend on the weights' values.

    python bench/inference_path.py --preset meter-base --threads 2
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time

import torch

import smarttrim
from smarttrim.flops import count_flops, strip_padding
from smarttrim.trimmers import HeadTrimmer


def keep_first_heads(model: smarttrim.SmartTrimModel, ratio: float) -> None:
    """Every head trimmer keeps the first round(ratio * H) heads, for every input."""
    assert model.trimmers is not None
    with torch.no_grad():
        for module in model.trimmers.modules():
            if isinstance(module, HeadTrimmer):
                last = module.output_layer
                last.weight.zero_()
                last.bias.fill_(-1.0)
                last.bias[: round(ratio * last.bias.numel())] = 1.0


def time_it(fn, repeats: int) -> list[float]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="meter-tiny")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--text-len", type=int, default=12)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    backbone = smarttrim.build_model(args.preset, task="vqa", num_labels=100).eval()
    one = backbone.dummy_batch(1, seed=0)
    one = strip_padding({**one, "input_ids": one["input_ids"][:, : args.text_len],
                         "attention_mask": one["attention_mask"][:, : args.text_len]})
    batch = backbone.dummy_batch(args.batch_size, seed=1)
    results = {}
    for ratio in (None, 0.7, 0.5, 0.3):
        trim = None if ratio is None else smarttrim.TrimConfig(
            token_trimmer="random", token_target_vision=ratio, token_target_text=ratio, head_target=ratio)
        model = smarttrim.build_model(args.preset, task="vqa", num_labels=100, trim=trim).eval()
        model.load_backbone_state_dict(backbone.state_dict())
        if ratio is not None:
            keep_first_heads(model, ratio)

        def run(inputs: dict[str, torch.Tensor], m: smarttrim.SmartTrimModel = model) -> smarttrim.SmartTrimOutput:
            torch.manual_seed(0)  # the random token trimmers drop the same tokens on every repeat
            return m(inputs)

        with torch.inference_mode():
            keep = {g: round(float(v.mean()), 3) for g, v in run(batch).keep_groups.items()}
            for _ in range(3):  # warm-up
                run(one)
            single = time_it(lambda: run(one), args.repeats)
            batched = time_it(lambda: run(batch), max(3, args.repeats // 3))
        torch.manual_seed(0)
        results["backbone" if ratio is None else f"keep_{ratio}"] = {
            "keep": keep,
            "gmacs_bs1": count_flops(model, one) / 1e9,
            "latency_ms_bs1_median": round(statistics.median(single), 2),
            "latency_ms_bs1_p90": round(sorted(single)[int(0.9 * (len(single) - 1))], 2),
            "throughput_per_s": round(args.batch_size / (statistics.median(batched) / 1000), 1),
        }
    print(json.dumps({"preset": args.preset, "device": "cpu", "threads": args.threads,
                      "batch_size": args.batch_size, "text_len": args.text_len, "torch": torch.__version__,
                      "cpu": platform.processor() or platform.machine(), "results": results}, indent=2))


if __name__ == "__main__":
    main()
