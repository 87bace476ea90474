"""Shard stage: a data source (built-in ``shapes`` or an official format) -> WebDataset tar shards.

    python -m stages.shard --source shapes --task vqa --out data/shapes-vqa
    python -m stages.shard --source vqa_v2 --root /data/vqa --tokenizer /models/roberta-base --out data/vqa

Writes ``<split>-NNNNNN.tar`` shards and ``manifest.json`` (source, task, per-split sample and shard
counts, label vocabulary, per-shard sha256, skipped records with reasons, majority-answer baseline,
tokenizer location: ``--tokenizer``, else one trained beside the shards on the training split's texts, or the
built-in one for ``shapes``). Each sample in a shard is ``<key>.json`` (texts, label, answers, scores, meta) plus
``<key>.img0.<ext>`` (and ``.img1.<ext>`` for NLVR2): the source's encoded image bytes, stored as they are
after a full decode check.

Bad input (unreadable or truncated image, missing file, malformed JSON / JSON line, missing field, label
outside the vocabulary, empty text): ``--on-error fail`` (default) stops with an error naming the file,
record and field and leaves nothing behind; ``--on-error skip`` skips the record and lists it in the
manifest. Output is written into a temporary directory and renamed into place at the end; a rerun with the
same inputs (same fingerprint in the manifest) is a no-op. Splits are sharded in parallel processes.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import io
import json
import os
import shutil
import sys
from collections import Counter
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from PIL import Image

from smarttrim.atomic import replace_dir, temp_dir_beside
from smarttrim.data import readers, shapes
from smarttrim.data.records import (
    NLVR2_LABELS,
    SNLI_VE_LABELS,
    TASK_FLAVORS,
    BadRecord,
    DataError,
    Sample,
    question_kind,
)
from stages.common import stage_parser
from stages.progress import Progress

FORMAT = "smarttrim-shards"
FORMAT_VERSION = 1
SOURCES: dict[str, str | None] = {
    "shapes": None, "vqa_v2": "vqa", "nlvr2": "nlvr2", "snli_ve": "snli_ve", "karpathy_flickr30k": "retrieval",
    "karpathy_coco": "retrieval", "nocaps": "caption",
}
"""Source -> the task it serves (None: chosen with ``--task``; Karpathy splits also serve ``caption``)."""
CLASS_LABELS: dict[str, tuple[str, ...]] = {"nlvr2": NLVR2_LABELS, "snli_ve": SNLI_VE_LABELS}
SHAPES_TOKENIZER_TEXTS = 2000
"""Texts per shapes flavor (train split, seed 0) the built-in tokenizer is trained on."""


@dataclass(frozen=True)
class ShardConfig:
    """What to shard and how. Validated on construction (errors name the field)."""

    source: str
    out: str
    task: str | None = None
    """shapes: the task flavor; official sources: their task (Karpathy: ``retrieval`` or ``caption``)."""
    root: str | None = None
    """The official data set's root directory (official sources only)."""
    splits: tuple[str, ...] | None = None
    """Splits to shard; None = the source's default splits."""
    shard_size: int = 1000
    on_error: str = "fail"
    limit: int | None = None
    """At most this many samples per split (for quick trials)."""
    seed: int = 0
    shapes_sizes: tuple[int, int, int] | None = None
    """shapes: (train, val, test) sizes; None = the generator's defaults for the task."""
    shapes_image_size: int = 64
    vqa_min_count: int = 9
    """VQA answer vocabulary: multiple-choice answers given at least this often over the sharded splits."""
    tokenizer: str | None = None
    """A local tokenizer directory. None: shapes trains the built-in one; an official source trains one on the
    texts of ``tokenizer_split`` (``smarttrim.data.tokenizer.train_tokenizer``), saved beside the shards."""
    tokenizer_split: str | None = None
    """Official sources without ``tokenizer``: the split whose texts the tokenizer is trained on (None = the
    first split found, the training one: ``readers.splits_of`` lists train first)."""
    tokenizer_vocab: int | None = None
    """Vocabulary size of that trained tokenizer (None = 512, the small presets'; at most the model's)."""
    workers: int = 0
    """Processes for sharding splits in parallel; 0 = min(number of splits, CPU count)."""

    def __post_init__(self) -> None:
        def bad(name: str, why: str) -> ValueError:
            return ValueError(f"{name}={getattr(self, name)!r}: {why}")

        if self.source not in SOURCES:
            raise bad("source", f"must be one of {sorted(SOURCES)}")
        if self.source == "shapes" and self.task not in TASK_FLAVORS:
            raise bad("task", f"shapes needs --task, one of {TASK_FLAVORS}")
        if self.source.startswith("karpathy") and self.task not in (None, "retrieval", "caption"):
            raise bad("task", "Karpathy splits serve 'retrieval' or 'caption'")
        if self.source not in ("shapes",) and not self.source.startswith("karpathy") and self.task not in (
                None, SOURCES[self.source]):
            raise bad("task", f"source {self.source!r} serves task {SOURCES[self.source]!r}")
        if self.source != "shapes" and not self.root:
            raise bad("root", f"source {self.source!r} needs --root (the data set's directory)")
        if self.shard_size < 1:
            raise bad("shard_size", "must be >= 1")
        if self.on_error not in ("fail", "skip"):
            raise bad("on_error", "must be 'fail' or 'skip'")
        if self.limit is not None and self.limit < 1:
            raise bad("limit", "must be >= 1")
        if self.shapes_sizes is not None and (len(self.shapes_sizes) != 3 or min(self.shapes_sizes) < 1):
            raise bad("shapes_sizes", "must be three positive sizes (train, val, test)")
        if self.tokenizer_vocab is not None and self.tokenizer_vocab < 16:
            raise bad("tokenizer_vocab", "must be >= 16")

    @property
    def resolved_task(self) -> str:
        return self.task or SOURCES[self.source] or "vqa"


@dataclass(frozen=True)
class ShardOutputs:
    out: Path
    manifest: dict[str, Any]
    reused: bool
    """True when the output already existed with the same fingerprint (nothing was written)."""


# ---------------------------------------------------------------------------------------------- sources
def default_splits(cfg: ShardConfig) -> tuple[str, ...]:
    if cfg.splits:
        return cfg.splits
    if cfg.source == "shapes":
        return shapes.SHAPES_SPLITS
    return tuple(readers.splits_of(cfg.source, Path(cfg.root or ".")))


def _shapes_size(cfg: ShardConfig, split: str) -> int:
    if cfg.shapes_sizes is None:
        return shapes.DEFAULT_SIZES[cfg.resolved_task][split]
    return dict(zip(shapes.SHAPES_SPLITS, cfg.shapes_sizes, strict=True))[split]


def iter_source(cfg: ShardConfig, split: str) -> Iterator[Sample | BadRecord]:
    """The source's records for one split (at most ``cfg.limit``)."""
    if cfg.source == "shapes":
        n = _shapes_size(cfg, split)
        if cfg.limit is not None:
            n = min(n, cfg.limit)
        yield from shapes.generate(cfg.resolved_task, split, n, seed=cfg.seed, image_size=cfg.shapes_image_size)
        return
    count = 0
    for item in readers.READERS[cfg.source](Path(cfg.root or "."), split):
        yield item
        count += isinstance(item, Sample)
        if cfg.limit is not None and count >= cfg.limit:
            return


@functools.cache
def shapes_tokenizer_corpus() -> tuple[str, ...]:
    """The texts the built-in shapes tokenizer is trained on: ``SHAPES_TOKENIZER_TEXTS`` per flavor, seed 0."""
    return tuple(shapes.all_texts(seed=0, n_per_task=SHAPES_TOKENIZER_TEXTS))


def fingerprint(cfg: ShardConfig) -> str:
    """Content hash of the config (minus ``out``/``workers``) and the source's annotation files' stats.

    Image files are not hashed (too many); their annotation files are (name, size, mtime)."""
    h = hashlib.sha256()
    conf = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in ("out", "workers")}
    h.update(json.dumps({"format_version": FORMAT_VERSION, "config": conf,
                         "generator": shapes.GENERATOR_VERSION, "shapes_tokenizer": SHAPES_TOKENIZER_TEXTS},
                        sort_keys=True).encode())
    if cfg.root:
        root = Path(cfg.root)
        for file in sorted(root.glob("*.json*")) if root.is_dir() else []:
            st = file.stat()
            h.update(f"{file.name}:{st.st_size}:{st.st_mtime_ns}".encode())
    if cfg.tokenizer:
        h.update(str(Path(cfg.tokenizer).resolve()).encode())
    return h.hexdigest()


# ---------------------------------------------------------------------------------------------- encoding
def _image_bytes(source: bytes | Path, key: str) -> tuple[bytes, str]:
    """The image's encoded bytes and extension, after a full decode check (catches truncated files)."""
    name = str(source) if isinstance(source, Path) else f"<{key} image bytes>"
    try:
        data = source.read_bytes() if isinstance(source, Path) else source
    except OSError as err:
        raise DataError(name, f"cannot read image ({err.strerror or err})", record=key, field="image") from err
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt = (img.format or "").lower()
            img.load()
    except Exception as err:  # PIL raises many types for corrupt data
        raise DataError(name, f"unreadable or truncated image ({err})", record=key, field="image") from err
    ext = {"jpeg": "jpg", "png": "png"}.get(fmt)
    if ext is None:
        raise DataError(name, f"image format {fmt!r} is not JPEG or PNG", record=key, field="image")
    return data, ext


def encode(sample: Sample, task: str, labels: dict[str, int], origin: str) -> dict[str, Any]:
    """A ``Sample`` -> a WebDataset record dict; raises ``DataError`` for invalid content."""
    key = sample.key
    if not key or not all(c.isalnum() or c in "_-" for c in key):
        raise DataError(origin, "key must be letters, digits, '_' or '-'", record=key, field="key")
    if not sample.texts or any(not t.strip() for t in sample.texts):
        raise DataError(origin, "empty text", record=key, field="texts")
    want_images = 2 if task == "nlvr2" else 1
    if len(sample.images) != want_images:
        raise DataError(origin, f"{len(sample.images)} images, task {task!r} takes {want_images}", record=key,
                        field="images")
    info: dict[str, Any] = {"texts": list(sample.texts), "meta": sample.meta, "label": sample.label}
    if task in CLASS_LABELS and sample.label is not None:
        if sample.label not in labels:
            raise DataError(origin, f"label {sample.label!r} not in {sorted(labels)}", record=key, field="label")
        info["label_id"] = labels[sample.label]
    if task == "vqa":
        info["answers"] = list(sample.answers)
        info["scores"] = {str(i): s for i, s in readers.vqa_soft_scores(list(sample.answers), labels).items()}
    record: dict[str, Any] = {"__key__": key, "json": json.dumps(info).encode()}
    for i, image in enumerate(sample.images):
        data, ext = _image_bytes(image, key)
        record[f"img{i}.{ext}"] = data
    return record


# ---------------------------------------------------------------------------------------------- one split
@dataclass
class SplitResult:
    split: str
    samples: int = 0
    shards: list[dict[str, Any]] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)
    label_scores: list[dict[str, float]] = field(default_factory=list)
    """Per sample: label id (str) -> score (VQA soft scores; 1.0 for the class of NLVR2 / SNLI-VE)."""
    questions: list[str] = field(default_factory=list)
    """Per labelled sample: the text evaluation reads (its first), aligned with ``label_scores``."""
    kinds: list[str | None] = field(default_factory=list)
    """Per labelled sample: its ``records.question_kind`` (None when the source gives none), aligned too."""
    texts: list[str] = field(default_factory=list)
    """Every text of every sharded sample (a tokenizer's training corpus)."""


def shard_split(cfg: ShardConfig, split: str, tmp: Path, labels: dict[str, int],
                prefix: str | None = None) -> SplitResult:
    """Write one split's shards into ``tmp``; raises the first ``DataError`` when ``on_error='fail'``
    (``prefix``: of the progress lines, e.g. ``[shard shapes-vqa]``; None: the output directory's name)."""
    import webdataset as wds

    task = cfg.resolved_task
    result = SplitResult(split)
    total = min(_shapes_size(cfg, split), cfg.limit or sys.maxsize) if cfg.source == "shapes" else cfg.limit
    progress = Progress(f"{prefix or f'[shard {Path(cfg.out).name}]'} {split}:", total, "samples")
    keys: set[str] = set()
    pattern = str(tmp / f"{split}-%06d.tar")
    with wds.ShardWriter(pattern, maxcount=cfg.shard_size, verbose=0) as sink:
        for item in iter_source(cfg, split):
            try:
                if isinstance(item, BadRecord):
                    raise item.error
                if item.key in keys:
                    raise DataError(f"{cfg.source}/{split}", "duplicate key", record=item.key, field="key")
                record = encode(item, task, labels, f"{cfg.source}/{split}")
            except DataError as err:
                if cfg.on_error == "fail":
                    raise
                result.skipped.append({"split": split, **err.as_dict()})
                continue
            keys.add(item.key)
            sink.write(record)
            result.samples += 1
            progress.update(result.samples)
            result.texts.extend(item.texts)
            info = json.loads(record["json"])
            if task == "vqa":
                result.label_scores.append(info["scores"])
            elif "label_id" in info:
                result.label_scores.append({str(info["label_id"]): 1.0})
            else:
                continue
            result.questions.append(item.texts[0])
            result.kinds.append(question_kind(item.meta))
    for file in sorted(Path(tmp).glob(f"{split}-*.tar")):
        digest = hashlib.sha256(file.read_bytes()).hexdigest()
        result.shards.append({"file": file.name, "sha256": digest})
    progress.finish(f" ({len(result.skipped)} skipped)" if result.skipped else "")
    return result


def _count_shard_samples(result: SplitResult, shard_size: int) -> None:
    remaining = result.samples
    for shard in result.shards:
        shard["samples"] = min(shard_size, remaining)
        remaining -= shard["samples"]


# ---------------------------------------------------------------------------------------------- labels
def label_vocabulary(cfg: ShardConfig, splits: tuple[str, ...]) -> list[str]:
    """The label vocabulary of the task (its order gives the label ids).

    VQA: as METER/ViLT, the normalized ``multiple_choice_answer`` of every annotated question of the sharded
    splits, kept when seen at least ``vqa_min_count`` times (train2014 + val2014 with 9 -> METER's 3129);
    shapes: its fixed answer vocabulary. NLVR2 / SNLI-VE: the fixed classes. Retrieval / caption: none.
    """
    task = cfg.resolved_task
    if task in CLASS_LABELS:
        return list(CLASS_LABELS[task])
    if task != "vqa":
        return []
    if cfg.source == "shapes":
        return list(shapes.answer_vocabulary("vqa"))
    answers = [item.meta["multiple_choice_answer"] for split in splits for item in iter_source(cfg, split)
               if isinstance(item, Sample) and "multiple_choice_answer" in item.meta]
    return readers.answer_vocabulary(answers, cfg.vqa_min_count)


def reference_split(results: list[SplitResult]) -> SplitResult | None:
    """The split the answer-prior baselines are fitted on: the first labelled one named ``train*`` (``train``,
    ``train2014``), else the first labelled one; None when no split has labels."""
    labelled = [r for r in results if r.label_scores]
    return next((r for r in labelled if r.split.startswith("train")), labelled[0] if labelled else None)


def _best_label(score_dicts: list[dict[str, float]]) -> str:
    """The label with the highest total score (ties: the smallest id, so the result is deterministic)."""
    totals: Counter[str] = Counter()
    for scores in score_dicts:
        totals.update(scores)
    return min(totals, key=lambda k: (-totals[k], int(k)))


def majority_baseline(results: list[SplitResult]) -> dict[str, Any]:
    """Always answering the reference split's most frequent label (by total score): its score on every split."""
    ref = reference_split(results)
    if ref is None:
        return {}
    best = _best_label(ref.label_scores)
    return {"label_id": int(best), "fitted_on": ref.split,
            "score": {r.split: (sum(s.get(best, 0.0) for s in r.label_scores) / len(r.label_scores))
                      for r in results if r.label_scores}}


def normalize_question(text: str) -> str:
    """The key a text-only baseline groups questions by: lowercase, single spaces."""
    return " ".join(text.lower().split())


def text_only_baseline(results: list[SplitResult]) -> dict[str, Any]:
    """The best a model can do from the text alone, as an answer prior: for each distinct (normalized) question
    text of the reference split, its most frequent label there; a text never seen there gets the majority label.

    Scored on every split (VQA: mean soft score; NLVR2 / SNLI-VE: accuracy), with ``coverage``: the share of the
    split's questions whose text occurs in the reference split. A model that beats it uses the image. Where the
    source names question kinds (``records.question_kind``), ``by_kind`` holds the score and instance count per
    kind and split, so that each kind's metric can be read against its own prior."""
    ref = reference_split(results)
    if ref is None:
        return {}
    by_text: dict[str, list[dict[str, float]]] = {}
    for text, scores in zip(ref.questions, ref.label_scores, strict=True):
        by_text.setdefault(normalize_question(text), []).append(scores)
    answer = {text: _best_label(group) for text, group in by_text.items()}
    fallback = _best_label(ref.label_scores)
    score, coverage, by_kind = {}, {}, {}
    for r in results:
        if not r.label_scores:
            continue
        keys = [normalize_question(t) for t in r.questions]
        hits = [s.get(answer.get(k, fallback), 0.0) for k, s in zip(keys, r.label_scores, strict=True)]
        score[r.split] = sum(hits) / len(hits)
        coverage[r.split] = sum(k in answer for k in keys) / len(keys)
        groups: dict[str, list[float]] = {}
        for kind, hit in zip(r.kinds or [None] * len(hits), hits, strict=True):  # no kinds recorded: none
            if kind is not None:
                groups.setdefault(kind, []).append(hit)
        if groups:
            by_kind[r.split] = {k: {"score": sum(v) / len(v), "instances": len(v)} for k, v in sorted(groups.items())}
    out = {"fitted_on": ref.split, "distinct_texts": len(answer), "score": score, "coverage": coverage}
    return {**out, "by_kind": by_kind} if by_kind else out


# ---------------------------------------------------------------------------------------------- run
def _read_manifest(out: Path) -> dict[str, Any] | None:
    try:
        return json.loads((out / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None


def run(cfg: ShardConfig, label: str | None = None) -> ShardOutputs:
    """Shard ``cfg.source`` into ``cfg.out`` (atomic; a no-op when the output is up to date). Progress lines name
    the data by ``label`` (default: the output directory's name)."""
    prefix = f"[shard {label or Path(cfg.out).name}]"
    out = Path(cfg.out)
    fp = fingerprint(cfg)
    existing = _read_manifest(out)
    if existing is not None and existing.get("fingerprint") == fp:
        return ShardOutputs(out, existing, reused=True)
    if cfg.root and not Path(cfg.root).is_dir():
        raise FileNotFoundError(f"{cfg.root}: no such directory (--root)")
    if cfg.tokenizer and not Path(cfg.tokenizer).is_dir():
        raise FileNotFoundError(f"{cfg.tokenizer}: no such directory (--tokenizer)")
    splits = default_splits(cfg)
    if not splits:
        raise DataError(cfg.root or cfg.source, f"no splits found for source {cfg.source!r}")
    trains_tokenizer = cfg.source != "shapes" and not cfg.tokenizer
    tokenizer_split = (cfg.tokenizer_split or splits[0]) if trains_tokenizer else None
    if tokenizer_split is not None and tokenizer_split not in splits:
        raise ValueError(f"tokenizer_split={tokenizer_split!r}: not a split of {cfg.root} (has {list(splits)})")
    labels = {name: i for i, name in enumerate(label_vocabulary(cfg, splits))}
    tmp = temp_dir_beside(out)
    try:
        workers = cfg.workers or min(len(splits), os.cpu_count() or 1)
        if workers > 1:
            with ProcessPoolExecutor(workers) as pool:
                futures = [pool.submit(shard_split, cfg, s, tmp, labels, prefix) for s in splits]
                results = [f.result() for f in futures]
        else:
            results = [shard_split(cfg, s, tmp, labels, prefix) for s in splits]
        for r in results:
            _count_shard_samples(r, cfg.shard_size)
        tokenizer = cfg.tokenizer and str(Path(cfg.tokenizer).resolve())
        if cfg.source == "shapes" and not cfg.tokenizer:
            from smarttrim.data.tokenizer import train_tokenizer

            # on the texts of every flavor (one generator seed): every shapes shard set, whatever its flavor and
            # seed, gets the same tokenizer, so a model pretrained on shapes captions reads shapes questions
            train_tokenizer(shapes_tokenizer_corpus(), tmp / "tokenizer")
            tokenizer = "tokenizer"
        elif trains_tokenizer:  # an official source and no tokenizer: one trained on the training split's texts
            from smarttrim.data.tokenizer import train_tokenizer

            corpus = next(r.texts for r in results if r.split == tokenizer_split)
            if not corpus:
                raise DataError(f"{cfg.source}/{tokenizer_split}", "no texts to train a tokenizer on")
            train_tokenizer(corpus, tmp / "tokenizer", vocab_size=cfg.tokenizer_vocab or 512)
            tokenizer = "tokenizer"
        manifest = {
            "format": FORMAT, "format_version": FORMAT_VERSION, "fingerprint": fp, "source": cfg.source,
            "task": cfg.resolved_task, "config": dataclasses.asdict(cfg),
            "splits": {r.split: {"samples": r.samples, "shards": r.shards} for r in results},
            "labels": list(labels), "majority_baseline": majority_baseline(results),
            "text_only_baseline": text_only_baseline(results),
            "skipped": [s for r in results for s in r.skipped], "tokenizer": tokenizer,
        }
        text = json.dumps(manifest, indent=2) + "\n"
        manifest = json.loads(text)  # exactly what a later run reads back
        (tmp / "manifest.json").write_text(text)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ShardOutputs(out, manifest, reused=False)


def main(argv: list[str] | None = None) -> int:
    parser = stage_parser("python -m stages.shard", __doc__ or "")
    parser.add_argument("--source", required=True, choices=sorted(SOURCES))
    parser.add_argument("--task", choices=TASK_FLAVORS, help="shapes: task flavor; Karpathy: retrieval|caption")
    parser.add_argument("--root", help="official data set root directory")
    parser.add_argument("--out", required=True, help="output directory (replaced atomically)")
    parser.add_argument("--splits", nargs="+", help="splits to shard (default: the source's)")
    parser.add_argument("--shard-size", type=int, default=1000, help="samples per shard")
    parser.add_argument("--on-error", choices=("fail", "skip"), default="fail")
    parser.add_argument("--limit", type=int, help="at most N samples per split")
    parser.add_argument("--seed", type=int, default=0, help="shapes: generator seed")
    parser.add_argument("--sizes", type=int, nargs=3, metavar=("TRAIN", "VAL", "TEST"), help="shapes: split sizes")
    parser.add_argument("--image-size", type=int, default=64, help="shapes: rendered image size")
    parser.add_argument("--vqa-min-count", type=int, default=9, help="VQA: min answer count for the vocabulary")
    parser.add_argument("--tokenizer", help="local tokenizer directory (default: shapes' built-in one; official "
                        "sources: one trained on the training split's texts)")
    parser.add_argument("--tokenizer-split", help="official sources without --tokenizer: the split to train it on")
    parser.add_argument("--tokenizer-vocab", type=int, help="that tokenizer's vocabulary size (default 512)")
    parser.add_argument("--workers", type=int, default=0, help="parallel processes (0 = auto)")
    args = parser.parse_args(argv)
    try:
        cfg = ShardConfig(source=args.source, out=args.out, task=args.task, root=args.root,
                          splits=tuple(args.splits) if args.splits else None, shard_size=args.shard_size,
                          on_error=args.on_error, limit=args.limit, seed=args.seed,
                          shapes_sizes=tuple(args.sizes) if args.sizes else None,
                          shapes_image_size=args.image_size, vqa_min_count=args.vqa_min_count,
                          tokenizer=args.tokenizer, tokenizer_split=args.tokenizer_split,
                          tokenizer_vocab=args.tokenizer_vocab, workers=args.workers)
        result = run(cfg)
    except (DataError, ValueError, FileNotFoundError) as err:
        print(f"shard: error: {err}", file=sys.stderr)
        return 1
    m = result.manifest
    state = "up to date" if result.reused else "written"
    counts = ", ".join(f"{s}: {v['samples']} samples / {len(v['shards'])} shards" for s, v in m["splits"].items())
    print(f"{result.out}: {state} ({counts}; {len(m['skipped'])} skipped)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
