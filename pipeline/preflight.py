"""Checks of a pipeline config against the files it names, before any stage runs.

``load_config`` validates a config on its own (types, ranges, names); this module checks what only the machine can
tell: that the pre-trained start exists, that every official data root exists and holds the splits the tasks train,
evaluate and test on (as ``smarttrim.data.readers.splits_of`` finds them from the official file names), and that
every task has a tokenizer that matches its start. Every problem is reported at once, each with the config field it
comes from, so a misspelt split or a missing root costs seconds instead of a failed Ray Train worker.
"""

from __future__ import annotations

from pathlib import Path

from pipeline.config import DataConfig, PipelineConfig
from pipeline.plan import PRETRAIN_TRAIN_SPLIT
from smarttrim.data.readers import splits_of


def input_problems(cfg: PipelineConfig, tasks: bool = True) -> list[str]:
    """What in ``cfg`` does not match the files on this machine (empty: nothing). ``tasks=False``: only what the
    ``pretrain`` command reads (the ``pretrain`` section's data)."""
    problems: list[str] = []
    pretrained = cfg.model.pretrained
    if pretrained is not None and not Path(pretrained).exists():
        problems.append(f"model.pretrained: {pretrained}: no such file or directory")
    meter_file = pretrained is not None and Path(pretrained).is_file()  # an official METER .ckpt (ours: directories)
    sections: list[tuple[str, DataConfig, tuple[tuple[str, str | None], ...]]] = []
    if cfg.pretrain is not None and (pretrained is None or not tasks):
        sections.append(("pretrain", cfg.pretrain.data, (("train split", PRETRAIN_TRAIN_SPLIT),
                                                         ("val_split", cfg.pretrain.val_split))))
    if tasks:
        sections += [(f"tasks[{i}]", t.data, (("train_split", t.train_split), ("eval_split", t.eval_split),
                                              ("test_split", t.test_split))) for i, t in enumerate(cfg.tasks)]
    for where, data, splits in sections:
        if data.tokenizer is not None and not Path(data.tokenizer).is_dir():
            problems.append(f"{where}.data.tokenizer: {data.tokenizer}: no such directory")
        if meter_file and data.tokenizer is None and where != "pretrain":
            problems.append(f"{where}.data.tokenizer: required with an official METER checkpoint "
                            f"(model.pretrained: {pretrained}): its text encoder reads RoBERTa's tokens; set it to a "
                            "local roberta-base tokenizer directory (vocab.json, merges.txt)")
        if data.source == "shapes":
            continue  # built in: its splits are checked by load_config
        root = Path(str(data.root))
        if not root.is_dir():
            problems.append(f"{where}.data.root: {root}: no such directory")
            continue
        found = splits_of(data.source, root)
        for name, split in splits:
            if split is not None and split not in found:
                problems.append(f"{where}.{name}={split!r}: {root} has no {data.source} split {split!r} (its "
                                f"annotation files give {found or 'none'})")
    return problems


def check_inputs(cfg: PipelineConfig, tasks: bool = True) -> None:
    """Raise ``ValueError`` listing every problem ``input_problems`` finds."""
    problems = input_problems(cfg, tasks)
    if problems:
        raise ValueError(f"{len(problems)} problem(s) with the config's inputs:\n  " + "\n  ".join(problems))


__all__ = ["check_inputs", "input_problems"]
