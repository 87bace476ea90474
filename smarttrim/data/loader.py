"""Streaming loader: WebDataset shards (written by ``stages.shard``) -> model batches.

One pipeline for training and evaluation, correct under Ray Train / DDP:

* shards are split by rank, then by DataLoader worker: every (rank, worker) reads a disjoint set of whole
  shards, so in evaluation every sample is seen exactly once;
* training shuffles shard order with a seed shared by all ranks (the same permutation everywhere, so the
  split stays a partition) that changes with the epoch, then shuffles samples in a buffer seeded per
  (seed, epoch, rank, worker);
* training epochs are planned (``plan_epoch``): every (rank, worker) yields the same number of batches, so
  data-parallel ranks never wait on a rank that ran out, and a resumed run can skip exactly the batches it
  already trained on (``LoaderConfig.skip_batches``: raw samples are dropped after the shuffle, before
  decoding). Random choices in collation (which caption, which false texts or ITM negatives) are seeded by the
  samples' keys, not by position, so a resumed epoch sees exactly the batches of an uninterrupted one;
* images are decoded, resized to the model's input size (bicubic) and normalized with CLIP's mean and std;
  texts are tokenized per batch with a transformers fast tokenizer (padding to the longest, truncation).

Batches are dicts: ``pixel_values`` (B, 3, H, W) (NLVR2: (B, 2, 3, H, W)), ``input_ids``, ``attention_mask``
(B, T), ``labels`` (VQA: (B, num_labels) soft scores; NLVR2 / SNLI-VE: (B,) class ids) and ``keys`` (the
samples' keys, for per-instance outputs). Retrieval with ``LoaderConfig.false_texts`` = N > 0 (METER's IRTR
training): ``input_ids`` / ``attention_mask`` (B, 1 + N, T), each image's true caption then N false ones, and
``labels`` (B,) zeros (the true text's index); with N = 0 one true caption per image and no labels.
"""

from __future__ import annotations

import io
import itertools
import json
import random
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor

from smarttrim.data import shapes

OBJECTIVES: tuple[str, ...] = ("task", "pretrain")
PRETRAIN_TASKS: tuple[str, ...] = ("caption", "retrieval")
"""Shard tasks that hold image-caption pairs (what pre-training reads)."""
HARD_NEGATIVE_POOL = 3
"""ITM hard negatives: drawn among this many most similar captions of the batch's other images."""
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


@dataclass(frozen=True)
class LoaderConfig:
    """How to read a split of a shard directory."""

    batch_size: int = 32
    image_size: int = 288
    max_text_len: int = 40
    train: bool = False
    """Training: shuffled shards and samples, and the last partial batch dropped."""
    seed: int = 0
    epoch: int = 0
    shuffle_buffer: int = 1000
    num_workers: int = 0
    rank: int | None = None
    """Data-parallel rank; None = torch.distributed's when initialized, else 0."""
    world_size: int | None = None
    batches_per_worker: int | None = None
    """Training: each DataLoader worker (or the main process with 0 workers) yields exactly this many batches
    (``plan_epoch`` computes it so all ranks and workers agree); None = as many as its shards give."""
    skip_batches: int = 0
    """Training resume: skip this rank's first N batches of the epoch (in the DataLoader's round-robin order
    over workers); the skipped samples are not decoded."""
    objective: str = "task"
    """``task``: the shards' task batches; ``pretrain``: METER's MLM + ITM batches from image-caption shards
    (``caption`` / ``retrieval``), see ``Collate``."""
    mlm_probability: float = 0.15
    """``pretrain``: share of a caption's (non-special) tokens masked for MLM (at least one per caption)."""
    false_texts: int = 0
    """Retrieval ``task`` batches: false texts per image (METER's ``draw_false_text``; its IRTR fine-tuning
    draws 15), so each image comes with 1 + N texts for the rank loss (``Collate``); 0 = one true caption per
    image, no labels (what evaluation and profiling read). Other tasks ignore it."""

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective={self.objective!r}: must be one of {OBJECTIVES}")
        if not 0.0 < self.mlm_probability < 1.0:
            raise ValueError(f"mlm_probability={self.mlm_probability!r}: must be in (0, 1)")
        for name in ("batch_size", "image_size", "max_text_len", "shuffle_buffer"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 1")
        for name in ("num_workers", "skip_batches", "false_texts"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}={getattr(self, name)!r}: must be >= 0")
        if self.batches_per_worker is not None and self.batches_per_worker < 0:
            raise ValueError(f"batches_per_worker={self.batches_per_worker!r}: must be >= 0 or None")
        if self.skip_batches and self.batches_per_worker is None:
            raise ValueError("skip_batches needs batches_per_worker (plan the epoch with plan_epoch)")


def _is_url(location: str | Path) -> bool:
    return "://" in str(location) or str(location).startswith("pipe:")


def join(location: str | Path, name: str) -> str:
    """``name`` inside a shard location: a local directory or a URL WebDataset opens (file://, http(s)://...)."""
    return f"{str(location).rstrip('/')}/{name}" if _is_url(location) else str(Path(location) / name)


def read_manifest(shards: str | Path) -> dict[str, Any]:
    """The ``manifest.json`` of a shard location (a directory, or a URL read with WebDataset's ``gopen``)."""
    path = join(shards, "manifest.json")
    if _is_url(shards):
        try:
            with wds.gopen(path) as stream:
                return json.loads(stream.read())
        except Exception as err:  # gopen raises scheme-specific errors
            raise FileNotFoundError(f"{path}: cannot read ({err})") from err
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no such file (not a shard directory written by stages.shard)")
    return json.loads(Path(path).read_text())


def _dist_info(cfg: LoaderConfig) -> tuple[int, int]:
    if cfg.rank is not None and cfg.world_size is not None:
        return cfg.rank, cfg.world_size
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _worker_info(cfg: LoaderConfig) -> tuple[int, int]:
    """(worker, num_workers) of this DataLoader worker as the epoch's plan numbers it.

    A resumed epoch that skips k batches renumbers its workers by k: the DataLoader always starts its
    round-robin at worker 0, and the uninterrupted epoch's (k+1)-th batch came from worker k mod W."""
    info = torch.utils.data.get_worker_info()
    worker, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
    return (worker + cfg.skip_batches) % num_workers, num_workers


def split_shards(urls: list[str], rank: int, world_size: int, worker: int, num_workers: int) -> list[str]:
    """The shards of one (rank, worker): a partition of ``urls`` over world_size x num_workers readers."""
    return urls[rank::world_size][worker::num_workers]


def epoch_order(items: list[Any], cfg: LoaderConfig) -> list[Any]:
    """Shards in the order of ``cfg.epoch``: shuffled by (seed, epoch) when training, the same permutation on
    every rank and worker (so the split stays a partition)."""
    items = list(items)
    if cfg.train:
        random.Random(f"{cfg.seed}:{cfg.epoch}:shards").shuffle(items)
    return items


class _ShardList(torch.utils.data.IterableDataset):
    """Yields ``{"url": ...}`` for this (rank, worker)'s shards, in an epoch-seeded order when training."""

    def __init__(self, urls: list[str], cfg: LoaderConfig) -> None:
        super().__init__()
        self.urls, self.cfg = urls, cfg

    def __iter__(self) -> Iterator[dict[str, str]]:
        rank, world_size = _dist_info(self.cfg)
        worker, num_workers = _worker_info(self.cfg)
        for url in split_shards(epoch_order(self.urls, self.cfg), rank, world_size, worker, num_workers):
            yield {"url": url}


@dataclass(frozen=True)
class EpochPlan:
    """How many batches one training epoch has, the same on every rank (see ``plan_epoch``)."""

    batches_per_worker: int
    """Batches each DataLoader worker yields (the minimum any (rank, worker) can fill)."""
    batches_per_rank: int
    """``batches_per_worker`` x max(1, num_workers)."""
    samples_dropped: int
    """Samples of the split left out this epoch (partial batches, and the excess of fuller workers)."""


def plan_epoch(manifest: dict[str, Any], split: str, cfg: LoaderConfig, world_size: int) -> EpochPlan:
    """The batch counts of epoch ``cfg.epoch`` for ``world_size`` ranks, from the manifest's per-shard sample
    counts: every (rank, worker) yields as many full batches as the emptiest one can, so no rank waits on
    another at the end of an epoch and a worker's k-th batch is the DataLoader's (k x workers + w)-th."""
    shards = manifest["splits"][split]["shards"]
    counts = {s["file"]: int(s["samples"]) for s in shards}
    order = epoch_order([s["file"] for s in shards], cfg)
    workers = max(1, cfg.num_workers)
    per_reader = [sum(counts[f] for f in split_shards(order, r, world_size, w, workers))
                  for r in range(world_size) for w in range(workers)]
    per_worker = min(per_reader) // cfg.batch_size
    if per_worker == 0:
        raise ValueError(f"split {split!r}: a reader ({world_size} ranks x {workers} workers) gets only "
                         f"{min(per_reader)} samples, fewer than batch_size={cfg.batch_size}; re-shard with a "
                         "smaller shard size or lower the batch size")
    total = sum(counts.values())
    return EpochPlan(per_worker, per_worker * workers, total - per_worker * workers * world_size * cfg.batch_size)


def _worker_skip(cfg: LoaderConfig) -> int:
    """Batches this worker skips so that the DataLoader (round-robin over workers) skips ``cfg.skip_batches``."""
    worker, num_workers = _worker_info(cfg)
    return len(range(worker, cfg.skip_batches, num_workers))


def _skip(cfg: LoaderConfig) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Drop the raw samples of the batches this worker skips (before decoding)."""
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        yield from itertools.islice(src, _worker_skip(cfg) * cfg.batch_size, None)
    return stage


def _limit(cfg: LoaderConfig) -> Callable[[Iterator[dict]], Iterator[dict]]:
    """Stop after this worker's planned batches (``batches_per_worker`` minus the skipped ones)."""
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        if cfg.batches_per_worker is None:
            yield from src
            return
        yield from itertools.islice(src, max(0, cfg.batches_per_worker - _worker_skip(cfg)))
    return stage


def _sample_rng(cfg: LoaderConfig) -> random.Random:
    rank, _ = _dist_info(cfg)
    worker, _ = _worker_info(cfg)
    return random.Random(f"{cfg.seed}:{cfg.epoch}:{rank}:{worker}:samples")


def _shuffle(cfg: LoaderConfig) -> Callable[[Iterator[dict]], Iterator[dict]]:
    def stage(src: Iterator[dict]) -> Iterator[dict]:
        if not cfg.train:
            yield from src
            return
        yield from wds.shuffle(cfg.shuffle_buffer, min(100, cfg.shuffle_buffer), rng=_sample_rng(cfg))(src)
    return stage


def load_image(data: bytes, size: int) -> Tensor:
    """Encoded image -> (3, size, size) float tensor, bicubic resize, CLIP normalization."""
    with Image.open(io.BytesIO(data)) as img:
        img = img.convert("RGB").resize((size, size), Image.BICUBIC)
        arr = np.asarray(img, dtype=np.float32) / 255.0  # (H, W, 3)
    arr = (arr - np.asarray(CLIP_MEAN, dtype=np.float32)) / np.asarray(CLIP_STD, dtype=np.float32)
    return torch.from_numpy(arr).permute(2, 0, 1).contiguous()


def _decoder(task: str, image_size: int, shard_dir: str) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def decode(raw: dict[str, Any]) -> dict[str, Any]:
        key = raw["__key__"]
        try:
            info = json.loads(raw["json"])
            images = [raw[k] for k in sorted(k for k in raw if k.startswith("img"))]
            pixels = torch.stack([load_image(b, image_size) for b in images])  # (n_images, 3, H, W)
        except Exception as err:  # a corrupt shard member: name the shard and the sample
            raise ValueError(f"{raw.get('__url__', shard_dir)}: sample {key}: cannot decode ({err})") from err
        return {"key": key, "pixels": pixels if task == "nlvr2" else pixels[0], "info": info}
    return decode


class Collate:
    """Stack images, tokenize texts, build labels for a task (picklable for DataLoader workers).

    Random choices are seeded by ``seed`` and the samples' keys, never by position: the same samples give
    the same batch whichever worker collates them and however many batches came before (exact resume)."""

    def __init__(self, task: str, tokenizer: Any, num_labels: int, max_text_len: int, train: bool,
                 seed: str, objective: str = "task", mlm_probability: float = 0.15, false_texts: int = 0) -> None:
        self.task, self.tokenizer, self.num_labels = task, tokenizer, num_labels
        self.max_text_len, self.train, self.seed = max_text_len, train, seed
        self.objective, self.mlm_probability, self.false_texts = objective, mlm_probability, false_texts

    def _rng(self, *parts: str) -> random.Random:
        return random.Random(":".join((self.seed, *parts)))

    def _encode(self, texts: list[str]) -> tuple[Tensor, Tensor]:
        enc = self.tokenizer(texts, padding="longest", truncation=True, max_length=self.max_text_len,
                             return_tensors="pt")
        return enc["input_ids"], enc["attention_mask"]

    def _pretrain(self, samples: list[dict[str, Any]], batch: dict[str, Any]) -> dict[str, Any]:
        """METER's pre-training batch: ITM pairs (half with a hard negative caption) and MLM-masked true captions.

        True caption: a random one of the image's (training; the first when evaluating). ITM negative: among the
        captions of the batch's other images that are not also a caption of this image, one of the
        ``HARD_NEGATIVE_POOL`` sharing the most words with the true caption (Jaccard). MLM: each non-special
        token masked with ``mlm_probability`` (at least one per caption); a masked token becomes <mask> 80% of
        the time, a random token 10%, itself 10%; ``mlm_labels`` hold the original ids there, ``IGNORE`` (-100)
        elsewhere. Every draw is seeded by the samples' keys. Built-in ``shapes`` scenes (``meta["scene"]``) also
        give ``object_labels``, (B, len(shapes.OBJECT_LABELS)) multi-hot: what each image shows."""
        captions = [list(s["info"]["texts"]) for s in samples]
        true = [c[self._rng(s["key"], "caption").randrange(len(c))] if self.train else c[0]
                for s, c in zip(samples, captions, strict=True)]
        words = [[set(t.lower().split()) for t in c] for c in captions]
        itm_texts, itm_labels = [], []
        for i, s in enumerate(samples):
            rng = self._rng(s["key"], "itm")
            own, mine = {t.lower() for t in captions[i]}, set(true[i].lower().split())
            pool = [(_jaccard(mine, w), j, k) for j, ws in enumerate(words) if j != i for k, w in enumerate(ws)
                    if captions[j][k].lower() not in own]  # (similarity, image, caption)
            if rng.random() < 0.5 or not pool:
                itm_texts.append(true[i])
                itm_labels.append(1)
            else:
                pool.sort(key=lambda x: (-x[0], x[1], x[2]))
                _, j, k = pool[rng.randrange(min(HARD_NEGATIVE_POOL, len(pool)))]
                itm_texts.append(captions[j][k])
                itm_labels.append(0)
        batch["input_ids"], batch["attention_mask"] = self._encode(itm_texts)
        batch["labels"] = torch.tensor(itm_labels)
        ids, mask = self._encode(true)
        labels = torch.full_like(ids, -100)
        special = set(self.tokenizer.all_special_ids)
        low, vocab = max(special) + 1, len(self.tokenizer)
        masked = ids.clone()
        for row, s in enumerate(samples):
            rng = self._rng(s["key"], "mlm")
            positions = [p for p in range(int(mask[row].sum())) if int(ids[row, p]) not in special]
            chosen = [p for p in positions if rng.random() < self.mlm_probability]
            if not chosen and positions:
                chosen = [positions[rng.randrange(len(positions))]]
            for p in chosen:
                labels[row, p] = ids[row, p]
                u = rng.random()
                if u < 0.8:
                    masked[row, p] = self.tokenizer.mask_token_id
                elif u < 0.9:
                    masked[row, p] = rng.randrange(low, vocab)
        batch["mlm_input_ids"], batch["mlm_attention_mask"], batch["mlm_labels"] = masked, mask, labels
        scenes = [s["info"].get("meta", {}).get("scene") for s in samples]
        if all(scene is not None for scene in scenes):  # the built-in world: what each image shows
            hot = torch.zeros(len(samples), len(shapes.OBJECT_LABELS))
            for row, scene in enumerate(scenes):
                hot[row, shapes.object_labels(scene)] = 1.0
            batch["object_labels"] = hot
        return batch

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        if self.objective == "pretrain":
            batch = {"pixel_values": torch.stack([s["pixels"] for s in samples]), "keys": [s["key"] for s in samples]}
            return self._pretrain(samples, batch)
        texts = [s["info"]["texts"][self._rng(s["key"], "text").randrange(len(s["info"]["texts"]))
                                    if self.train else 0] for s in samples]
        batch: dict[str, Any] = {"pixel_values": torch.stack([s["pixels"] for s in samples]),
                                 "keys": [s["key"] for s in samples],
                                 "meta": [s["info"].get("meta", {}) for s in samples]}
        if self.task == "vqa" and any(s["info"].get("answers") for s in samples):  # none: hidden (test) answers
            labels = torch.zeros(len(samples), self.num_labels)
            for row, s in enumerate(samples):
                for label, score in s["info"].get("scores", {}).items():
                    labels[row, int(label)] = score
            batch["labels"] = labels
        elif self.task in ("nlvr2", "snli_ve") and all("label_id" in s["info"] for s in samples):
            batch["labels"] = torch.tensor([s["info"]["label_id"] for s in samples])
        group = 1
        if self.task == "retrieval" and self.false_texts:  # METER's IRTR: the true text, then N false ones
            texts = [t for s, true in zip(samples, texts, strict=True) for t in (true, *self._false_texts(s, samples))]
            group = 1 + self.false_texts
            batch["labels"] = torch.zeros(len(samples), dtype=torch.long)
        ids, mask = self._encode(texts)
        if group > 1:
            ids, mask = ids.view(len(samples), group, -1), mask.view(len(samples), group, -1)  # (B, 1 + N, T)
        batch["input_ids"], batch["attention_mask"] = ids, mask
        return batch

    def _false_texts(self, sample: dict[str, Any], samples: list[dict[str, Any]]) -> list[str]:
        """``false_texts`` captions for ``sample``'s image, drawn from the captions of the batch's other images that
        are not also one of its own (the built-in captions repeat across images). METER draws them from the whole
        training set; a shuffled batch is a random sample of it, and drawing from it keeps every choice a function
        of the batch's samples (exact resume). Without replacement when the batch has enough, else with."""
        own = {t.lower() for t in sample["info"]["texts"]}
        pool = list(dict.fromkeys(t for other in samples if other is not sample for t in other["info"]["texts"]
                                  if t.lower() not in own))
        if not pool:
            raise ValueError(f"retrieval sample {sample['key']}: no false text among the captions of the batch's "
                             f"{len(samples) - 1} other images (false texts are drawn from the batch: batch_size must "
                             "be >= 2)")
        rng = self._rng(sample["key"], "false_texts")
        drawn = rng.sample(pool, min(len(pool), self.false_texts))
        return drawn + rng.choices(pool, k=self.false_texts - len(drawn))


def _jaccard(a: set[str], b: set[str]) -> float:
    return len(a & b) / max(1, len(a | b))


def shard_tokenizer(shards: str | Path, override: str | Path | None = None) -> Any:
    """The tokenizer to read ``shards`` with: ``override`` if given, else the one the manifest names
    (saved beside the shards, or a local path recorded at sharding time)."""
    from smarttrim.data.tokenizer import load_tokenizer

    if override is not None:
        return load_tokenizer(override)
    name = read_manifest(shards).get("tokenizer")
    if not name:
        raise ValueError(f"{join(shards, 'manifest.json')}: names no tokenizer; pass one explicitly")
    if _is_url(shards) and not Path(name).is_absolute():
        raise ValueError(f"{shards}: a tokenizer beside URL shards cannot be loaded; pass a local one")
    return load_tokenizer(Path(join(shards, name)) if not Path(name).is_absolute() else Path(name))


def shard_urls(shards: str | Path, split: str, manifest: dict[str, Any] | None = None) -> list[str]:
    """The shard files of one split (``manifest``: the already-read manifest of ``shards``)."""
    manifest = read_manifest(shards) if manifest is None else manifest
    if split not in manifest["splits"]:
        raise ValueError(f"{join(shards, 'manifest.json')}: no split {split!r} (has {sorted(manifest['splits'])})")
    return [join(shards, s["file"]) for s in manifest["splits"][split]["shards"]]


def make_loader(shards: str | Path, split: str, tokenizer: Any, cfg: LoaderConfig) -> torch.utils.data.DataLoader:
    """A DataLoader of model batches over one split of a shard directory."""
    manifest = read_manifest(shards)
    task = manifest["task"]
    urls = shard_urls(shards, split, manifest)
    rank, world_size = _dist_info(cfg)
    readers = world_size * max(1, cfg.num_workers)
    if cfg.train and len(urls) < readers:
        raise ValueError(f"{shards}: split {split!r} has {len(urls)} shards for {world_size} ranks x "
                         f"{max(1, cfg.num_workers)} workers; re-shard with a smaller --shard-size")
    if cfg.objective == "pretrain" and task not in PRETRAIN_TASKS:
        raise ValueError(f"{join(shards, 'manifest.json')}: task {task!r} holds no image-caption pairs to pre-train "
                         f"on (one of {PRETRAIN_TASKS})")
    collate = Collate(task, tokenizer, max(1, len(manifest["labels"])), cfg.max_text_len, cfg.train,
                      seed=f"{cfg.seed}:{cfg.epoch}:{rank}", objective=cfg.objective,
                      mlm_probability=cfg.mlm_probability, false_texts=cfg.false_texts)
    pipeline = wds.DataPipeline(
        _ShardList(urls, cfg),
        wds.tarfile_to_samples(),
        _shuffle(cfg),
        _skip(cfg),
        wds.map(_decoder(task, cfg.image_size, str(shards))),
        wds.batched(cfg.batch_size, collation_fn=collate, partial=not cfg.train),
        _limit(cfg),
    )
    # a private generator: starting an epoch must not draw from the global torch RNG (dropout, Gumbel
    # noise), or a resumed run, which starts its epoch mid-way, would draw different noise afterwards
    generator = torch.Generator().manual_seed(hash((cfg.seed, cfg.epoch, rank)) % 2**63)
    return torch.utils.data.DataLoader(pipeline, batch_size=None, num_workers=cfg.num_workers,
                                       persistent_workers=False, generator=generator)
