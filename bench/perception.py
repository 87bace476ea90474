"""Does a model's visual encoder see shapes and colours? A linear probe on its frozen features. Prints JSON.

    .venv/bin/python bench/perception.py --model pretrained/meter-small-shapes [--images 1500]

Draws one-object images (``bench/one_object.draw``: one shape of four in one colour of six, at a random place and
size), encodes them with the model's visual encoder (no trimming; the tokens after its final norm), and fits a
linear classifier of the shape and of the colour (features standardized, Adam, full batch) on two thirds of them;
reports accuracy on the rest, for the mean of the patch tokens and for the [CLS] token. The same probe on a
randomly initialized model of the same architecture is the baseline: what the architecture gives untrained
(random convolutions already separate colours; shapes need learned features). A pre-trained start whose shape
accuracy is not above its baseline cannot be fine-tuned into a model that answers shape questions.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

from one_object import COLORS, SHAPES, draw  # noqa: E402

import smarttrim  # noqa: E402
from smarttrim.data.loader import load_image  # noqa: E402
from smarttrim.model import SmartTrimModel  # noqa: E402


def images(n: int, image_size: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(n, 3, S, S) pixel values, (n,) shape labels, (n,) colour labels."""
    rng = random.Random(seed)
    xs, shapes, colors = [], [], []
    for _ in range(n):
        shape, color = rng.choice(SHAPES), rng.choice(list(COLORS))
        xs.append(load_image(draw(shape, color, rng), image_size))
        shapes.append(SHAPES.index(shape))
        colors.append(list(COLORS).index(color))
    return torch.stack(xs), torch.tensor(shapes), torch.tensor(colors)


@torch.no_grad()
def features(model: SmartTrimModel, pixels: torch.Tensor, batch_size: int = 100) -> dict[str, torch.Tensor]:
    """Frozen visual features: ``mean`` of the patch tokens and ``cls``."""
    vit = model.eval().backbone.vision
    tokens = torch.cat([vit.forward_features(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])
    return {"mean": tokens[:, 1:].mean(1), "cls": tokens[:, 0]}


def linear_probe(x: torch.Tensor, y: torch.Tensor, classes: int, steps: int = 300, seed: int = 0) -> float:
    """Held-out accuracy of a linear classifier fit on the first 2/3 of (x, y)."""
    torch.manual_seed(seed)
    cut = 2 * len(x) // 3
    mu, sd = x[:cut].mean(0), x[:cut].std(0) + 1e-5
    train, test = (x[:cut] - mu) / sd, (x[cut:] - mu) / sd
    with torch.enable_grad():
        probe = torch.nn.Linear(x.shape[1], classes)
        opt = torch.optim.Adam(probe.parameters(), lr=1e-2)
        for _ in range(steps):
            loss = F.cross_entropy(probe(train), y[:cut])
            opt.zero_grad()
            loss.backward()
            opt.step()
    with torch.no_grad():
        return float((probe(test).argmax(-1) == y[cut:]).float().mean())


def probe_model(model: SmartTrimModel, n: int = 1500, seed: int = 0) -> dict[str, dict[str, float]]:
    """{"shape": {"mean": acc, "cls": acc}, "color": {...}} of ``model``'s visual encoder."""
    pixels, shapes, colors = images(n, model.config.image_size, seed)
    feats = features(model, pixels)
    return {name: {kind: round(linear_probe(f, labels, classes), 3) for kind, f in feats.items()}
            for name, labels, classes in (("shape", shapes, len(SHAPES)), ("color", colors, len(COLORS)))}


def run(model_dir: str, n: int = 1500, seed: int = 0, threads: int = 1) -> dict[str, Any]:
    torch.set_num_threads(threads)
    model = smarttrim.load_model(model_dir)
    torch.manual_seed(seed)
    untrained = SmartTrimModel(model.config, None)
    return {"model": model_dir, "images": n, "held_out": n - 2 * n // 3,
            "chance": {"shape": 1 / len(SHAPES), "color": 1 / len(COLORS)},
            "probe": probe_model(model, n, seed), "random_init": probe_model(untrained, n, seed)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="a model directory (save_pretrained / a pre-training export)")
    parser.add_argument("--images", type=int, default=1500)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    print(json.dumps(run(args.model, args.images, args.seed, args.threads), indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
