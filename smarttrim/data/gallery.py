"""Retrieval galleries: one split of a retrieval shard directory, read whole, for image-text retrieval.

A gallery is what retrieval evaluation ranks: every image of the split once (``keys``, ``images``) and the
flat list of all their true captions (``texts``), each with the index of its image (``text_image``). The
shards are those ``stages.shard`` writes for task ``retrieval`` (or ``caption``: same layout): per sample a
JSON member whose ``texts`` lists ALL true captions of the image, and one ``img*`` image member.

The whole split is read in this process, shard by shard in manifest order (no rank or worker split), so
every sample is read exactly once: a key seen twice, or a sample count that differs from the manifest's, is
an error. Images are decoded and normalized as the training loader does (``load_image``).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import webdataset as wds
from torch import Tensor

from smarttrim.data.loader import join, load_image, read_manifest, shard_urls

GALLERY_TASKS: tuple[str, ...] = ("retrieval", "caption")
"""Shard tasks whose samples are one image with its true captions."""


@dataclass(frozen=True)
class Gallery:
    """Images and captions of one split; caption ``t`` is a true caption of image ``text_image[t]``."""

    keys: tuple[str, ...]
    """(I,) sample keys, in shard order."""
    images: Tensor
    """(I, 3, S, S) images, CLIP-normalized."""
    texts: tuple[str, ...]
    """(T,) every true caption of every image, image by image in ``keys`` order."""
    text_image: Tensor
    """(T,) long: the index (into ``keys``) of each caption's image."""

    def __post_init__(self) -> None:
        n = len(self.keys)
        if self.images.dim() != 4 or self.images.shape[0] != n:
            raise ValueError(f"images: shape {tuple(self.images.shape)}, expected ({n}, 3, S, S)")
        if tuple(self.text_image.shape) != (len(self.texts),):
            raise ValueError(f"text_image: shape {tuple(self.text_image.shape)}, expected ({len(self.texts)},)")
        if len(self.texts) and not (int(self.text_image.min()) >= 0 and int(self.text_image.max()) < n):
            raise ValueError(f"text_image: indices outside [0, {n})")


def _decode(raw: dict[str, Any], image_size: int) -> tuple[str, Tensor, list[str]]:
    """One raw WebDataset sample -> (key, (3, S, S) image, captions); errors name the shard and the sample."""
    key = raw.get("__key__", "?")
    try:
        info = json.loads(raw["json"])
        texts = info["texts"]
        if not isinstance(texts, list) or not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise ValueError(f"'texts' must be a non-empty list of non-empty strings, got {texts!r}")
        members = sorted(k for k in raw if k.startswith("img"))
        if len(members) != 1:
            raise ValueError(f"{len(members)} image members {members}, a retrieval sample has 1")
        image = load_image(raw[members[0]], image_size)
    except Exception as err:  # a corrupt shard member: name the shard and the sample
        raise ValueError(f"{raw.get('__url__', '?')}: sample {key}: cannot decode ({err})") from err
    return key, image, texts


def _raw_samples(urls: list[str]) -> Iterator[dict[str, Any]]:
    """The raw samples of ``urls``, shard by shard, in order."""
    yield from wds.tarfile_to_samples()(iter({"url": url} for url in urls))


def read_gallery(shards: str | Path, split: str, image_size: int,
                 manifest: dict[str, Any] | None = None) -> Gallery:
    """Read every sample of ``split`` once into a ``Gallery`` (images resized to ``image_size``).

    manifest: the already-read manifest of ``shards`` (read here when None).
    """
    manifest = read_manifest(shards) if manifest is None else manifest
    where = join(shards, "manifest.json")
    if manifest.get("task") not in GALLERY_TASKS:
        raise ValueError(f"{where}: task {manifest.get('task')!r} is not a gallery (one of {GALLERY_TASKS})")
    keys: list[str] = []
    images: list[Tensor] = []
    texts: list[str] = []
    text_image: list[int] = []
    seen: dict[str, str] = {}
    for raw in _raw_samples(shard_urls(shards, split, manifest)):
        key, image, captions = _decode(raw, image_size)
        url = raw.get("__url__", "?")
        if key in seen:
            raise ValueError(f"{url}: sample {key}: duplicate key (also in {seen[key]})")
        seen[key] = url
        text_image += [len(keys)] * len(captions)
        keys.append(key)
        images.append(image)
        texts += captions
    expected = manifest["splits"][split].get("samples")
    if expected is not None and expected != len(keys):
        raise ValueError(f"{where}: split {split!r} lists {expected} samples, its shards hold {len(keys)}")
    if not keys:
        raise ValueError(f"{where}: split {split!r} is empty")
    return Gallery(tuple(keys), torch.stack(images), tuple(texts), torch.tensor(text_image, dtype=torch.long))
