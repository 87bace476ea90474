"""What every stage shares: device choice, atomic output directories, the CLI skeleton."""

from __future__ import annotations

import argparse
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import yaml

from smarttrim.atomic import replace_dir, temp_dir_beside

if TYPE_CHECKING:  # torch loads when a stage runs, not with the configs and CLIs
    import torch


@dataclass(frozen=True)
class ModelDataConfig:
    """The fields of a stage that runs an exported model on a shard split (see ``add_model_data_args``)."""

    model: str
    """An exported model directory (``save_pretrained``)."""
    shards: str
    """A shard location written by ``stages.shard``."""
    out: str
    split: str = "val"
    threads: int = 2
    device: str = "cpu"
    """``cpu``, ``cuda`` or ``auto`` (cuda when available)."""
    tokenizer: str | None = None
    """The tokenizer to read the shards' texts with; None = the model's own (``<model>/tokenizer``, saved by every
    fine-tuning: texts must be tokenized as in training), else the shards' (a model directory without one)."""

    def __post_init__(self) -> None:
        if self.threads < 1:
            raise ValueError(f"threads={self.threads!r}: must be >= 1")
        resolve_device(self.device)


@dataclass(frozen=True)
class StageOutputs:
    """A measuring stage's result: its output directory and the metrics written there."""

    out: Path
    metrics: dict[str, Any]


def keep_freed_memory() -> bool:
    """Let this process's C allocator keep the memory it frees (glibc: no ``mmap`` per large block, no trimming)
    instead of returning it to the system, so that timing loops do not pay page faults on every fresh activation
    (on a 2-core CPU, 15% of a meter-base forward at batch size 8: elementwise ops on new buffers). For timing
    (the profile stage, ``bench/``): memory freed stays reserved by the process. Returns whether it took effect
    (False off glibc; then jemalloc or tcmalloc through ``LD_PRELOAD`` do the same)."""
    import ctypes
    import ctypes.util

    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
        mallopt = getattr(libc, "mallopt", None)
    except OSError:
        return False
    if mallopt is None:
        return False
    m_trim_threshold, m_mmap_max = -1, -4  # malloc.h
    # trim threshold -1: never trim (1 GiB still left meter-base at batch size 64 paying 8 x 10^5 faults a pass)
    return bool(mallopt(m_mmap_max, 0)) and bool(mallopt(m_trim_threshold, -1))


def minor_faults() -> int | None:
    """This process's minor page faults so far (``getrusage``), or None where not available: a timing loop whose
    count grows paid first touches of fresh memory inside the timed region (warm-up did not reach its memory
    high-water mark, or the allocator returns memory)."""
    try:
        import resource
    except ImportError:  # not Unix
        return None
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def faults_since(start: int | None) -> int | None:
    """Minor page faults since ``start`` (a ``minor_faults()`` reading), None where not counted."""
    now = minor_faults()
    return None if start is None or now is None else now - start


def resolve_device(name: str) -> torch.device:
    """``cpu``, ``cuda``, or ``auto`` (cuda when available)."""
    import torch

    if name not in ("cpu", "cuda", "auto"):
        raise ValueError(f"device={name!r}: must be cpu, cuda or auto")
    return torch.device("cuda" if name == "cuda" or (name == "auto" and torch.cuda.is_available()) else "cpu")


def to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """A model batch with its tensors on ``device`` (keys and other values as they are)."""
    import torch

    return {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def instance_scores(task: str, logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(B,) score of each instance's argmax prediction: its VQA soft score (``labels`` (B, A) are the METER/ViLT
    soft scores), else whether it is the label (NLVR2, SNLI-VE; retrieval groups: whether the true text scores
    highest among the image's 1 + N texts)."""
    pred = logits.argmax(-1)
    if task == "vqa":
        return labels.gather(1, pred[:, None])[:, 0].float()
    return (pred == labels).float()


def stage_tokenizer(cfg: ModelDataConfig) -> Any:
    """The tokenizer a measuring stage reads ``cfg.shards`` with (see ``ModelDataConfig.tokenizer``)."""
    from smarttrim.data.loader import shard_tokenizer

    own = Path(cfg.model) / "tokenizer"
    return shard_tokenizer(cfg.shards, cfg.tokenizer or (own if own.is_dir() else None))


def check_labels(cfg: ModelDataConfig, manifest: dict[str, Any], num_labels: int) -> None:
    """Refuse shards whose label vocabulary (index -> answer/label) is not the one the model was trained with: its
    ``config.json`` records the training shards' ``labels`` (models exported before that: the count is checked)."""
    from smarttrim.io import read_config

    want = read_config(cfg.model)[2].get("labels")
    have = list(manifest.get("labels") or [])
    where = f"{cfg.model} (trained with {{}}) and {cfg.shards} ({{}})"
    if want is None:
        if have and len(have) != num_labels:
            raise ValueError("label vocabularies differ: " + where.format(f"{num_labels} labels", f"{len(have)}"))
        return
    if list(want) != have:
        first = next((i for i, (a, b) in enumerate(zip(want, have, strict=False)) if a != b), min(len(want), len(have)))
        detail = (f"{len(want)} labels, index {first}: {want[first] if first < len(want) else 'none'!r}",
                  f"{len(have)} labels, index {first}: {have[first] if first < len(have) else 'none'!r}")
        raise ValueError("label vocabularies differ: " + where.format(*detail) +
                         "; evaluate on shards made with the model's label vocabulary")


def write_outputs(out: Path, files: dict[str, Callable[[Path], object]]) -> None:
    """Write ``files`` (name -> writer of that path) into a temp dir, then swap it to ``out`` atomically."""
    tmp = temp_dir_beside(out)
    try:
        for name, write in files.items():
            write(tmp / name)
        replace_dir(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def stage_parser(prog: str, doc: str) -> argparse.ArgumentParser:
    """A parser whose description is the module docstring's first paragraph and epilog the rest."""
    first, _, rest = doc.partition("\n\n")
    return argparse.ArgumentParser(prog=prog, description=first, epilog=rest,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_model_data_args(parser: argparse.ArgumentParser) -> None:
    """The flags of a stage that runs an exported model on a shard split (names match the configs' fields)."""
    parser.add_argument("--model", required=True, help="exported model directory")
    parser.add_argument("--shards", required=True, help="shard directory or URL (stages.shard output)")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--split", default="val")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"))
    parser.add_argument("--tokenizer", help="tokenizer directory (default: the model's own, else the shards')")


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2's floats: ``1e-4`` and ``5E3`` are numbers (YAML 1.1, which PyYAML
    implements, needs a dot, ``1.0e-4``, and reads ``1e-4`` as the string ``"1e-4"``)."""


_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:float",
    re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                   |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                   |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                   |[-+]?\.(?:inf|Inf|INF)
                   |\.(?:nan|NaN|NAN))$""", re.X),
    list("-+0123456789."))


def load_yaml(text: str) -> Any:
    """Parse YAML as every config of the project is read: safe, with YAML 1.2 floats (``lr: 1e-4`` is a float)."""
    return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 (a SafeLoader subclass)


def apply_overrides(data: dict[str, Any], items: list[str], strict: bool = True) -> dict[str, Any]:
    """Apply ``key=value`` items to a nested config dict: dotted keys (``train.lr=1e-4``; list items by index,
    ``tasks.0.name=x``), values parsed as YAML (``load_yaml``: numbers, booleans, lists, mappings; else strings).

    strict: every key must already exist (an unknown one is an error naming the known ones); otherwise new
    keys are added and the config's own loader decides (the pipeline's names the dotted path). A path through a
    list needs an index inside it; a path through a value that is not a section is an error naming both."""
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r}: expected key=value")
        node: Any = data
        *parents, leaf = key.split(".")
        for depth, part in enumerate([*parents, leaf]):
            where = ".".join(parents[:depth]) or "the config"
            if isinstance(node, list):
                if not part.lstrip("-").isdigit() or not -len(node) <= int(part) < len(node):
                    raise ValueError(f"override {item!r}: {where} is a list of {len(node)} item(s); {part!r} is "
                                     f"not an index in it (0..{len(node) - 1})")
            elif not isinstance(node, dict):
                raise ValueError(f"override {item!r}: {where} is a value ({node!r}), not a section")
            if depth == len(parents):
                break  # node holds the leaf
            if isinstance(node, list):
                node = node[int(part)]
            elif isinstance(node.get(part), dict | list) or (not strict and part not in node):
                node = node.setdefault(part, {})
            elif part not in node:
                raise ValueError(f"override {item!r}: unknown section {part!r} (known: {sorted(node)})")
            else:
                node = node[part]  # a value: the next round names it
        if strict and isinstance(node, dict) and leaf not in node:
            raise ValueError(f"override {item!r}: unknown field {leaf!r} (known: {sorted(node)})")
        value = load_yaml(raw)
        if isinstance(node, list):
            node[int(leaf)] = value
        else:
            node[leaf] = value
    return data
