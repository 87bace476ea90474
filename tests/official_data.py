"""Small data sets in the official layouts, for end-to-end tests: the file names, folders and record fields as the
datasets' authors release them (VQA v2, NLVR2, SNLI-VE, Flickr30K with Karpathy's splits), with images drawn here.

Each writer returns what a test needs to recompute the report's numbers from the files (labels per split). The
images are small JPEG / PNG drawings (one coloured shape), so a statement or answer can be tied to them, but the
tests check the pipeline's bookkeeping, not what a tiny model learns in a few steps.
"""

from __future__ import annotations

import io
import json
import random
from pathlib import Path

from conftest import bench_module
from PIL import Image, ImageDraw

COLORS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (40, 80, 230), "yellow": (235, 210, 40)}


def _drawing(color: str, rng: random.Random, fmt: str = "JPEG") -> bytes:
    img = Image.new("RGB", (48, 48), (rng.randrange(200, 256),) * 3)
    x, y, r = rng.randrange(8, 40), rng.randrange(8, 40), rng.randrange(5, 9)
    ImageDraw.Draw(img).ellipse((x - r, y - r, x + r, y + r), fill=COLORS[color])
    buf = io.BytesIO()
    img.save(buf, format=fmt)
    return buf.getvalue()


def _lines(path: Path, records: list[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def write_vqa_v2(root: Path, train: int, val: int) -> dict[str, list[str]]:
    """``v2_OpenEnded_mscoco_<split>_questions.json`` / ``v2_mscoco_<split>_annotations.json`` and
    ``<split>/COCO_<split>_<image_id:012d>.jpg`` for train2014 and val2014 (``bench/one_object.py``'s writer: two
    questions per image); returns the multiple-choice answer of every question per split, in file order."""
    oo = bench_module("one_object")
    oo.write_split(root, "train2014", train, seed=0)
    oo.write_split(root, "val2014", val, seed=0)
    def answers(split: str) -> list[str]:
        notes = json.loads((root / f"v2_mscoco_{split}_annotations.json").read_text())["annotations"]
        return [a["multiple_choice_answer"] for a in notes]

    return {split: answers(split) for split in ("train2014", "val2014")}


def write_nlvr2(root: Path, sizes: dict[str, int]) -> dict[str, list[str]]:
    """``<split>.json`` (JSON lines: identifier ``<split>-<set>-<pair>-<sentence>``, sentence, label "True" /
    "False", directory for train) and the image pairs ``images/<split>/[<directory>/]<split>-<set>-<pair>-img0.png``
    (train nested in numbered directories, dev / test1 flat, as released); two sentences per pair."""
    labels: dict[str, list[str]] = {}
    for split, pairs in sizes.items():
        rng = random.Random(split)
        records = []
        for p in range(pairs):
            left, right = rng.choice(list(COLORS)), rng.choice(list(COLORS))
            pair = f"{split}-{p // 4}-{p % 4}"
            folder = root / "images" / split / (str(p % 3) if split == "train" else "")
            folder.mkdir(parents=True, exist_ok=True)
            (folder / f"{pair}-img0.png").write_bytes(_drawing(left, rng, "PNG"))
            (folder / f"{pair}-img1.png").write_bytes(_drawing(right, rng, "PNG"))
            for k, color in enumerate((left, rng.choice(list(COLORS)))):
                record = {"identifier": f"{pair}-{k}", "sentence": f"The left image shows a {color} circle.",
                          "label": str(color == left), "left_url": "http://example.com/l.jpg",
                          "right_url": "http://example.com/r.jpg", "synset": "circle", "query": "circle 1"}
                if split == "train":
                    record["directory"] = p % 3
                records.append(record)
        _lines(root / f"{split}.json", records)
        labels[split] = [r["label"] for r in records]
    return labels


def write_snli_ve(root: Path, sizes: dict[str, int]) -> dict[str, list[str]]:
    """``snli_ve_<split>.jsonl`` (Flickr30K_ID, sentence1, sentence2, gold_label, pairID, captionID) and the images
    ``flickr30k_images/<Flickr30K_ID>.jpg``; three hypotheses per image, one per label."""
    labels: dict[str, list[str]] = {}
    (root / "flickr30k_images").mkdir(parents=True, exist_ok=True)
    for split, images in sizes.items():
        rng = random.Random(split)
        records = []
        for i in range(images):
            image_id = str(1000 * (1 + list(sizes).index(split)) + i)
            color = rng.choice(list(COLORS))
            (root / "flickr30k_images" / f"{image_id}.jpg").write_bytes(_drawing(color, rng))
            other = rng.choice([c for c in COLORS if c != color])
            for label, text, tag in (("entailment", f"There is a {color} circle.", "e"),
                                     ("contradiction", f"There is a {other} circle.", "c"),
                                     ("neutral", "The circle was drawn by a child.", "n")):
                records.append({"Flickr30K_ID": image_id, "sentence1": f"A {color} circle on a plain background.",
                                "sentence2": text, "gold_label": label, "pairID": f"{image_id}.jpg#0r1{tag}",
                                "captionID": f"{image_id}.jpg#0"})
        _lines(root / f"snli_ve_{split}.jsonl", records)
        labels[split] = [r["gold_label"] for r in records]
    return labels


def write_flickr30k(root: Path, sizes: dict[str, int], captions: int = 2) -> dict[str, list[list[str]]]:
    """``dataset_flickr30k.json`` (Karpathy's: images with filename, imgid, split, sentences (tokens, raw, imgid,
    sentid), sentids) and ``flickr30k-images/<filename>``; returns each split's captions per image."""
    images, out, imgid = [], {}, 0
    (root / "flickr30k-images").mkdir(parents=True, exist_ok=True)
    for split, n in sizes.items():
        rng = random.Random(split)
        out[split] = []
        for _ in range(n):
            color = rng.choice(list(COLORS))
            filename = f"{100000 + imgid}.jpg"
            (root / "flickr30k-images" / filename).write_bytes(_drawing(color, rng))
            raws = [f"a {color} circle number {imgid} , view {k} ." for k in range(captions)]
            sentences = [{"tokens": r.split(), "raw": r, "imgid": imgid, "sentid": imgid * 10 + k}
                         for k, r in enumerate(raws)]
            images.append({"filename": filename, "imgid": imgid, "split": split, "sentences": sentences,
                           "sentids": [s["sentid"] for s in sentences]})
            out[split].append(raws)
            imgid += 1
    (root / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": images}))
    return out
