"""Is loading ever the bottleneck? Shard-writing and shard-reading samples/s on built-in ``shapes`` data,
against the training step of ``meter-tiny`` on the same machine. Prints one JSON object.

    python bench/data_throughput.py --samples 2000 --workers 0 2
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

import torch

import smarttrim
from smarttrim.data.loader import LoaderConfig, make_loader, read_manifest
from smarttrim.data.tokenizer import load_tokenizer
from stages.shard import ShardConfig, run


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samples", type=int, default=2000, help="training samples to shard and read")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2], help="DataLoader worker counts to time")
    parser.add_argument("--train-steps", type=int, default=10, help="meter-tiny steps timed for comparison")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_num_threads(1)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "shapes-vqa"
        start = time.perf_counter()
        run(ShardConfig(source="shapes", task="vqa", out=str(out), shapes_sizes=(args.samples, 10, 10),
                        shard_size=250))
        write_s = time.perf_counter() - start
        manifest = read_manifest(out)
        tokenizer = load_tokenizer(out / manifest["tokenizer"])
        reading = {}
        for workers in args.workers:
            cfg = LoaderConfig(batch_size=args.batch_size, image_size=32, max_text_len=24, train=True,
                               num_workers=workers)
            start, n = time.perf_counter(), 0
            for batch in make_loader(out, "train", tokenizer, cfg):
                n += batch["pixel_values"].shape[0]
            reading[f"workers_{workers}"] = round(n / (time.perf_counter() - start), 1)
        model = smarttrim.build_model("meter-tiny", task="vqa", num_labels=len(manifest["labels"]),
                                      trim=smarttrim.TrimConfig())
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        batches = list(make_loader(out, "train", tokenizer, LoaderConfig(batch_size=args.batch_size,
                                                                         image_size=32, max_text_len=24)))
        start = time.perf_counter()
        for step in range(args.train_steps):
            loss = model(batches[step % len(batches)]).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
        train_rate = args.train_steps * args.batch_size / (time.perf_counter() - start)
    print(json.dumps({
        "samples": args.samples, "write_samples_per_s": round(args.samples / write_s, 1),
        "read_samples_per_s": reading, "train_samples_per_s_meter_tiny_smarttrim": round(train_rate, 1),
        "read_over_train": {k: round(v / train_rate, 1) for k, v in reading.items()},
        "cpu_count": os.cpu_count(), "torch_threads": torch.get_num_threads(),
    }, indent=2))


if __name__ == "__main__":
    main()
