"""Load external pretrained weights into a ``SmartTrimModel``.

* ``load_clip_vision``: a local Hugging Face ``CLIPVisionModel`` / ``CLIPModel`` directory ->
  ``backbone.vision``.
* ``load_roberta``: a local Hugging Face ``RobertaModel`` (or ``RobertaForMaskedLM``...) directory ->
  ``backbone.text``.
* ``convert_meter_checkpoint`` / ``load_meter_checkpoint``: an official METER ``.ckpt`` -> the whole model.

Every loader is strict: a key that is neither mapped nor deliberately dropped, a missing weight or a shape
mismatch is a ``ValueError`` naming the file and the keys; a missing file or directory is a
``FileNotFoundError``. What was dropped or adapted (position-embedding resampling, NLVR2 token types, a
randomly initialized task head) is returned in a ``LoadReport``.

Three METER facts matter here (see ``meter/modules/clip_model.py``, ``heads.py`` and ``meter_module.py``
upstream): METER's CLIP ViT builds one residual block fewer than the CLIP checkpoint it starts from (11 of
ViT-B/16's 12); METER's ``adapt_position_encoding`` resizes position embeddings with plain bicubic
interpolation (reproduced here through timm's ``resample_abs_pos_embed`` with ``antialias=False``); and its
heads are ``nn.Sequential`` classifiers (``vqa_classifier``, ``nlvr2_classifier`` on the two image-text pairs'
features side by side, ``snli_classifier``) except for retrieval: the ITM head ``itm_score`` wraps a bare
``fc = nn.Linear(2h, 2)``, and IRTR fine-tuning adds ``rank_output``, whose weight is the (1, 2h) "match" row of
``itm_score.fc`` (declared ``nn.Linear(h, 1)``, then its ``weight.data`` replaced by that row).
"""

from __future__ import annotations

import dataclasses
import json
import math
import pickle
import re
import warnings
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from os import PathLike
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file
from timm.layers import resample_abs_pos_embed
from torch import Tensor
from transformers import AutoConfig

from smarttrim.config import ModelConfig
from smarttrim.io import WEIGHTS, complete_rank_output, load_state_dict_checked, read_config
from smarttrim.model import SmartTrimModel

__all__ = ["ARCHITECTURE_FIELDS", "LoadReport", "MeterConversion", "convert_meter_checkpoint", "load_clip_vision",
           "load_meter_checkpoint", "load_pretrained", "load_roberta", "pretrained_config"]

HF_WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
VISION = "backbone.vision."
TEXT = "backbone.text."
METER_HEADS: dict[str, tuple[tuple[str, str], ...]] = {
    "vqa": (("vqa_classifier.", "head."),),
    "nlvr2": (("nlvr2_classifier.", "head."),),
    "snli_ve": (("snli_classifier.", "head."),),
    "retrieval": (("itm_score.fc.", "head.0."), ("rank_output.", "rank_output.")),
}
"""Per task, (METER module prefix, our prefix) of its head: the classifiers share our ``head``'s ``nn.Sequential``
indices; retrieval's ITM ``fc`` is our one-layer ``head``'s layer 0 and ``rank_output`` keeps its name."""
METER_OWN = ("cross_modal_", "token_type_embeddings.")
"""METER modules that keep their name under ``backbone.``."""
METER_EXTRA = ("vqa_classifier.", "nlvr2_classifier.", "snli_classifier.", "itm_score.", "mlm_score.",
               "mpp_score.", "rank_output.")
"""Heads of other tasks and pre-training objectives: dropped (the task's own head is taken first)."""

Rules = tuple[tuple[str, str], ...]
# (regex on the key without its prefix, replacement; "" = drop the key). Keys matching no rule are kept
# under their original name, so they surface as "unexpected keys" in the load error.
_HF_CLIP_RULES: Rules = (
    (r"embeddings\.class_embedding", "cls_token"),
    (r"embeddings\.patch_embedding\.weight", "patch_embed.proj.weight"),
    (r"embeddings\.position_embedding\.weight", "pos_embed"),
    (r"embeddings\.position_ids", ""),
    (r"pre_layrnorm\.(weight|bias)", r"norm_pre.\1"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
    (r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", r"blocks.\1.attn.qkv.\3#\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc[12])\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
)
_OPENAI_CLIP_RULES: Rules = (
    (r"conv1\.weight", "patch_embed.proj.weight"),
    (r"class_embedding", "cls_token"),
    (r"positional_embedding", "pos_embed"),
    (r"ln_pre\.(weight|bias)", r"norm_pre.\1"),
    (r"ln_post\.(weight|bias)", r"norm.\1"),
    (r"proj", ""),
    (r"transformer\.resblocks\.(\d+)\.attn\.in_proj_(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"transformer\.resblocks\.(\d+)\.attn\.out_proj\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"transformer\.resblocks\.(\d+)\.ln_([12])\.(weight|bias)", r"blocks.\1.norm\2.\3"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_fc\.(weight|bias)", r"blocks.\1.mlp.fc1.\2"),
    (r"transformer\.resblocks\.(\d+)\.mlp\.c_proj\.(weight|bias)", r"blocks.\1.mlp.fc2.\2"),
)


@dataclass
class LoadReport:
    """What a loader did besides copying tensors one to one."""

    source: str
    """The file or directory read."""
    loaded: int = 0
    """Number of model tensors overwritten."""
    dropped: list[str] = field(default_factory=list)
    """Checkpoint keys deliberately ignored (other heads, pre-training heads, unused projections...)."""
    notes: list[str] = field(default_factory=list)
    """Adaptations made (position-embedding resampling, token-type expansion, layer truncation...)."""
    head_loaded: bool | None = None
    """METER checkpoints: whether the task head came from the checkpoint (False: kept as initialized)."""


@dataclass
class MeterConversion:
    """``convert_meter_checkpoint``'s result: our state dict plus what the conversion did."""

    state_dict: dict[str, Tensor]
    """Our parameter names -> tensors (trimmers never included; ``head.*`` absent without a task head)."""
    sources: dict[str, str]
    """Our key -> the METER key it came from (for error messages)."""
    dropped: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def has_head(self) -> bool:
        return any(k.startswith("head.") for k in self.state_dict)


# ---------------------------------------------------------------------- public loaders
def load_clip_vision(model: SmartTrimModel, path: str | PathLike[str],
                     truncate_layers: bool = False) -> LoadReport:
    """Load a local Hugging Face ``CLIPVisionModel`` or ``CLIPModel`` directory into the visual encoder.

    Text tower and projection keys of a ``CLIPModel`` are ignored. The position embeddings are resampled
    when the checkpoint's patch grid differs from ``model.config.image_size`` (e.g. 224 -> 288, as METER).
    ``truncate_layers``: accept a checkpoint deeper than ``config.vision_layers`` and load its first blocks
    (METER keeps 11 of CLIP ViT-B/16's 12 blocks); otherwise the depths must agree.
    """
    root = _hf_dir(path)
    hf = _hf_config(root)
    vcfg = getattr(hf, "vision_config", hf)
    if getattr(vcfg, "model_type", None) != "clip_vision_model":
        raise ValueError(f"{root}: config model_type {getattr(hf, 'model_type', None)!r} is not a CLIP model "
                         "(expected a CLIPVisionModel or CLIPModel directory)")
    cfg, vit = model.config, model.backbone.vision
    if cfg.patch_stem != "linear":
        raise ValueError(f"{root}: CLIP embeds patches with one linear projection; the model has "
                         f"patch_stem={cfg.patch_stem!r} (use patch_stem='linear' to load CLIP weights)")
    depth = vcfg.num_hidden_layers
    deeper = depth > cfg.vision_layers
    truncate = truncate_layers and deeper
    fields: list[tuple[str, Any, str, Any]] = [
        ("hidden_size", vcfg.hidden_size, "vision_width", cfg.vision_width),
        ("num_attention_heads", vcfg.num_attention_heads, "vision_heads", cfg.vision_heads),
        ("patch_size", vcfg.patch_size, "patch_size", cfg.patch_size),
        ("hidden_act", vcfg.hidden_act, "vision_act", cfg.vision_act),
        ("intermediate_size", vcfg.intermediate_size, "vision_width * vision_mlp_ratio",
         vit.blocks[0].mlp.fc1.out_features),
        ("num_channels", vcfg.num_channels, "input channels", vit.patch_embed.proj.in_channels),
        ("layer_norm_eps", vcfg.layer_norm_eps, "vision LayerNorm eps", vit.norm.eps),
    ]
    if not truncate:
        fields.append(("num_hidden_layers", depth, "vision_layers", cfg.vision_layers))
    hint = " (truncate_layers=True loads the first layers of a deeper checkpoint)" if deeper else ""
    _check_fields(str(root), fields, hint)

    raw = _hf_weights(root)
    prefix = "vision_model." if any(k.startswith("vision_model.") for k in raw) else ""
    other = ("text_model.", "visual_projection.", "text_projection.", "logit_scale")
    state, sources, dropped = _rename(raw, prefix, _HF_CLIP_RULES, VISION, drop_other=bool(prefix),
                                      drop=() if prefix else other)
    report = LoadReport(str(root), dropped=dropped)
    _fuse_qkv(state, sources)
    if truncate:
        extra = [k for k in state if (_block_index(k) or 0) >= cfg.vision_layers]
        report.dropped += [sources.pop(k) for k in extra]
        for k in extra:
            del state[k]
        report.notes.append(f"kept the first {cfg.vision_layers} of the checkpoint's {depth} vision layers")
    _finish_vision(state, sources, cfg, str(root), report.notes)
    _load(model, state, sources, str(root), allow_missing=_all_but(model, VISION))
    report.loaded = len(state)
    return report


def load_roberta(model: SmartTrimModel, path: str | PathLike[str]) -> LoadReport:
    """Load a local Hugging Face RoBERTa directory into ``model.backbone.text``.

    Accepts a bare ``RobertaModel`` checkpoint or one whose keys carry a ``roberta.`` prefix
    (``RobertaForMaskedLM``...: keys outside the prefix, e.g. ``lm_head.*``, are ignored). ``pooler.*`` and
    the ``embeddings.position_ids`` buffer are ignored.
    """
    root = _hf_dir(path)
    hf = _hf_config(root)
    if getattr(hf, "model_type", None) != "roberta":
        raise ValueError(f"{root}: config model_type {getattr(hf, 'model_type', None)!r} is not 'roberta'")
    cfg, ours = model.config, model.backbone.text.config
    _check_fields(str(root), [
        ("vocab_size", hf.vocab_size, "vocab_size", cfg.vocab_size),
        ("hidden_size", hf.hidden_size, "text_hidden", cfg.text_hidden),
        ("num_hidden_layers", hf.num_hidden_layers, "text_layers", cfg.text_layers),
        ("num_attention_heads", hf.num_attention_heads, "text_heads", cfg.text_heads),
        ("intermediate_size", hf.intermediate_size, "text_intermediate", cfg.text_intermediate),
        ("max_position_embeddings", hf.max_position_embeddings, "text_max_positions", cfg.text_max_positions),
        ("pad_token_id", hf.pad_token_id, "pad_token_id", cfg.pad_token_id),
        ("type_vocab_size", hf.type_vocab_size, "text type_vocab_size", ours.type_vocab_size),
        ("hidden_act", hf.hidden_act, "text hidden_act", ours.hidden_act),
        ("layer_norm_eps", hf.layer_norm_eps, "text layer_norm_eps", ours.layer_norm_eps),
    ])
    raw = _hf_weights(root)
    prefix = "roberta." if any(k.startswith("roberta.") for k in raw) else ""
    rules: Rules = ((r"pooler\..*", ""), (r"embeddings\.position_ids", ""), (r"(.*)", r"\1"))
    state, sources, dropped = _rename(raw, prefix, rules, TEXT, drop_other=bool(prefix),
                                      drop=() if prefix else ("lm_head.",))
    _load(model, state, sources, str(root), allow_missing=_all_but(model, TEXT))
    return LoadReport(str(root), loaded=len(state), dropped=dropped)


def convert_meter_checkpoint(state_dict: Mapping[str, Tensor], config: ModelConfig,
                             source: str = "METER state dict") -> MeterConversion:
    """Map an official METER (CLIP + RoBERTa) state dict to our parameter names for ``config``.

    * ``vit_model.visual.*`` (or ``vit_model.*``), OpenAI CLIP layout -> ``backbone.vision.*`` (timm);
      METER's leftover CLIP text keys (``vit_model.token_embedding`` ...) and ``proj`` are dropped.
    * ``text_transformer.*`` -> ``backbone.text.*`` (``pooler.*`` / ``position_ids`` dropped).
    * ``cross_modal_*``, ``token_type_embeddings`` -> ``backbone.*``.
    * the head of ``config.task`` (``METER_HEADS``): ``vqa_classifier`` / ``nlvr2_classifier`` /
      ``snli_classifier`` -> ``head.*``; retrieval: ``itm_score.fc`` -> ``head.0.*`` and ``rank_output`` ->
      ``rank_output.*`` (a checkpoint with the ITM head but no ``rank_output``, i.e. pre-training, gets it
      from the ITM head's match row, as METER initializes IRTR fine-tuning). Other task and pre-training heads
      are dropped.
    * position embeddings are resampled to ``config.image_size``; for NLVR2 a 2-row token-type table
      gets a third row copied from row 1 (METER's NLVR2 initialization).

    Unrecognized keys are kept under their own name (a strict load then reports them). ``source`` names
    the checkpoint in error messages.
    """
    if config.patch_stem != "linear":
        raise ValueError(f"{source}: METER's CLIP ViT embeds patches linearly; the model has "
                         f"patch_stem={config.patch_stem!r}")
    vit = "vit_model.visual." if any(k.startswith("vit_model.visual.") for k in state_dict) else "vit_model."
    rules: Rules = ((r"vit_model\..*", ""), (r"text_transformer\.(pooler\..*|embeddings\.position_ids)", ""),
                    (r"text_transformer\.(.*)", TEXT + r"\1"),
                    *((re.escape(theirs) + r"(.*)", ours + r"\1") for theirs, ours in METER_HEADS[config.task]),
                    *((re.escape(p) + r"(.*)", "backbone." + p + r"\1") for p in METER_OWN),
                    *((re.escape(p) + r".*", "") for p in METER_EXTRA))
    vision = {k: v for k, v in state_dict.items() if k.startswith(vit)}
    state, sources, dropped = _rename({k: v for k, v in state_dict.items() if k not in vision}, "", rules, "")
    v_state, v_sources, v_dropped = _rename(vision, vit, _OPENAI_CLIP_RULES, VISION)
    state.update(v_state)
    sources.update(v_sources)
    out = MeterConversion(state, sources, v_dropped + dropped)

    depth = 1 + max((i for k in state if (i := _block_index(k)) is not None), default=-1)
    if depth and depth != config.vision_layers:
        raise ValueError(f"{source}: the checkpoint has {depth} vision blocks but config.vision_layers="
                         f"{config.vision_layers} (METER's CLIP ViT has one block fewer than the CLIP it "
                         "was built from, e.g. 11 for ViT-B/16)")
    _finish_vision(state, sources, config, source, out.notes)
    types = "backbone.token_type_embeddings.weight"
    if config.task == "nlvr2" and types in state and state[types].shape[0] == 2:
        state[types] = torch.cat([state[types], state[types][1:2]])
        out.notes.append("token_type_embeddings: 2 -> 3 rows (row 2 = row 1, as METER does for NLVR2)")
    if complete_rank_output(config, state):
        sources["rank_output.weight"], sources["rank_output.bias"] = (
            sources["head.0.weight"] + "[1:]", sources["head.0.bias"] + "[1:]")
        out.notes.append("rank_output: from itm_score.fc's match row (no rank_output in the checkpoint: METER's "
                         "initialization of IRTR fine-tuning)")
    return out


def load_meter_checkpoint(model: SmartTrimModel, path: str | PathLike[str]) -> LoadReport:
    """Load an official METER ``.ckpt`` (a dict with ``state_dict``, or a bare state dict) into ``model``.

    Trimmer parameters are never in METER checkpoints and keep their initialization. A checkpoint without
    the head of ``model.config.task`` (pre-training) leaves the head as initialized: the report says so
    (``head_loaded=False``) and a ``UserWarning`` is issued. Anything else missing, unexpected or of the
    wrong shape is a ``ValueError`` naming ``path`` and the keys.
    """
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        ckpt = torch.load(file, map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, EOFError, OSError, ValueError) as err:
        raise ValueError(f"{file}: cannot read as a torch checkpoint with weights_only=True ({err}); "
                         "re-save its 'state_dict' alone if it holds custom objects") from err
    state = ckpt.get("state_dict", ckpt) if isinstance(ckpt, dict) else None
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{file}: not a METER checkpoint (expected a dict with a 'state_dict' of tensors, "
                         "or a bare state dict)")
    conv = convert_meter_checkpoint(state, model.config, source=str(file))
    report = LoadReport(str(file), loaded=len(conv.state_dict), dropped=conv.dropped, notes=conv.notes,
                        head_loaded=conv.has_head)
    allow = ("trimmers.",) if conv.has_head else ("trimmers.", "head.", "rank_output.")
    _load(model, conv.state_dict, conv.sources, str(file), allow_missing=allow)
    if not conv.has_head:
        heads = " / ".join(theirs + "*" for theirs, _ in METER_HEADS[model.config.task])
        msg = (f"{file}: no {heads} head for task {model.config.task!r} "
               "(a pre-training checkpoint?): the task head keeps its random initialization")
        report.notes.append(msg)
        warnings.warn(msg, UserWarning, stacklevel=2)
    return report


ARCHITECTURE_FIELDS = ("patch_size", "patch_stem", "vision_width", "vision_layers", "vision_heads", "vision_mlp_ratio",
                      "vision_act", "vocab_size", "text_hidden", "text_layers", "text_heads", "text_intermediate",
                      "text_max_positions", "pad_token_id", "bos_token_id", "eos_token_id", "hidden_size",
                      "cross_layers", "cross_heads", "cross_intermediate", "layer_norm_eps")
"""What a model started from another model directory must share with it (the rest: image size, task, labels,
dropout, text length may differ)."""


def pretrained_config(path: str | PathLike[str], task: str, num_labels: int,
                      **overrides: Any) -> ModelConfig:
    """The ``ModelConfig`` of a model that starts from the model directory ``path``: its architecture, this task
    and label count, and ``overrides`` (``image_size``, ``dropout``, ...) on top."""
    source, _, _ = read_config(path)
    return dataclasses.replace(source, task=task, num_labels=num_labels, **overrides)


def load_pretrained(model: SmartTrimModel, path: str | PathLike[str]) -> LoadReport:
    """Start ``model`` from a model directory of ours (``save_pretrained``; e.g. ``stages.pretrain``'s export): its
    backbone weights, as from an official METER pre-training checkpoint.

    The task head is not taken (it stays as initialized, unless both models have the same task and label count;
    retrieval: the ITM head and ``rank_output``, which a pre-training export made without one gets from the ITM
    head, as METER initializes IRTR fine-tuning) and trimmers keep their initialization. The position grid is
    resampled to ``model``'s image size (bicubic, as METER's ``adapt_position_encoding``); for NLVR2 a 2-row
    token-type table gets a third row copied from row 1. The architectures must agree (``ARCHITECTURE_FIELDS``): a
    ``ValueError`` names the differing fields.
    """
    root = Path(path)
    source_cfg, _, _ = read_config(root)
    cfg = model.config
    differ = [f"{name}: {getattr(source_cfg, name)!r} in {root}, {getattr(cfg, name)!r} in the model"
              for name in ARCHITECTURE_FIELDS if getattr(source_cfg, name) != getattr(cfg, name)]
    if differ:
        raise ValueError(f"{root}: another architecture than the model's ({'; '.join(differ)})")
    file = root / WEIGHTS
    state = _read_weights(file)
    same_head = source_cfg.task == cfg.task and source_cfg.num_labels == cfg.num_labels
    keep = ("backbone.", "head.", "rank_output.") if same_head else ("backbone.",)
    report = LoadReport(str(root), dropped=sorted(k for k in state if not k.startswith(keep)),
                        head_loaded=same_head)
    state = {k: v for k, v in state.items() if k.startswith(keep)}
    sources = {k: k for k in state}
    if same_head and complete_rank_output(cfg, state):
        report.notes.append("rank_output: from the ITM head's match row (the model directory has none)")
    _finish_vision(state, sources, cfg, str(file), report.notes)
    types = "backbone.token_type_embeddings.weight"
    rows = model.state_dict()[types].shape[0]
    if state[types].shape[0] == 2 and rows == 3:
        state[types] = torch.cat([state[types], state[types][1:2]])
        report.notes.append("token_type_embeddings: 2 -> 3 rows (row 2 = row 1, as METER does for NLVR2)")
    elif state[types].shape[0] == 3 and rows == 2:
        state[types] = state[types][:2]
        report.notes.append("token_type_embeddings: 3 -> 2 rows (the second image's type dropped)")
    allow = ("trimmers.",) if same_head else ("trimmers.", "head.", "rank_output.")
    _load(model, state, sources, str(file), allow_missing=allow)
    report.loaded = len(state)
    return report


# ---------------------------------------------------------------------- helpers
def _hf_dir(path: str | PathLike[str]) -> Path:
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such directory (expected a Hugging Face model directory)")
    if not (root / "config.json").is_file():
        raise FileNotFoundError(f"{root / 'config.json'}: no such file (not a Hugging Face model directory)")
    return root


def _hf_config(root: Path) -> Any:
    try:
        return AutoConfig.from_pretrained(str(root))
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{root / 'config.json'}: unreadable Hugging Face config ({err})") from err


def _hf_weights(root: Path) -> dict[str, Tensor]:
    """All tensors of a HF directory: ``model.safetensors`` or ``pytorch_model.bin``, or their shards."""
    for name in HF_WEIGHT_FILES:
        if (root / name).is_file():
            return _read_weights(root / name)
        index = root / f"{name}.index.json"
        if index.is_file():
            try:
                shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            except (json.JSONDecodeError, KeyError, AttributeError) as err:
                raise ValueError(f"{index}: bad shard index ({err})") from err
            state: dict[str, Tensor] = {}
            for shard in shards:
                state.update(_read_weights(root / shard))
            return state
    raise FileNotFoundError(f"{root}: no weights file (looked for {', '.join(HF_WEIGHT_FILES)} and their "
                            "sharded .index.json)")


def _read_weights(file: Path) -> dict[str, Tensor]:
    if not file.is_file():
        raise FileNotFoundError(f"{file}: no such file")
    try:
        state = load_file(file) if file.suffix == ".safetensors" else torch.load(
            file, map_location="cpu", weights_only=True)
    except (SafetensorError, pickle.UnpicklingError, RuntimeError, EOFError, OSError) as err:
        raise ValueError(f"{file}: unreadable weights file ({err})") from err
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"{file}: not a state dict of tensors")
    return state


def _check_fields(source: str, fields: Iterable[tuple[str, Any, str, Any]], hint: str = "") -> None:
    """(checkpoint config field, its value, our field, our value) -> ValueError listing every disagreement."""
    bad = []
    for theirs_name, theirs, ours_name, ours in fields:
        floats = isinstance(theirs, float) and isinstance(ours, float)
        same = math.isclose(theirs, ours, rel_tol=1e-6) if floats else theirs == ours
        if not same:
            bad.append(f"{theirs_name}={theirs!r} but the model has {ours_name}={ours!r}")
    if bad:
        raise ValueError(f"{source}: checkpoint config does not match the model: " + "; ".join(bad) + hint)


def _rename(state: Mapping[str, Tensor], prefix: str, rules: Rules, out_prefix: str, drop_other: bool = False,
            drop: tuple[str, ...] = ()) -> tuple[dict[str, Tensor], dict[str, str], list[str]]:
    """Rename ``state`` by the first matching rule (on the key minus ``prefix``) -> (state, sources, dropped).

    Keys without ``prefix`` are dropped when ``drop_other``; keys starting with one of ``drop`` are dropped;
    keys matching no rule keep their original name (the strict load reports them as unexpected).
    """
    out: dict[str, Tensor] = {}
    sources: dict[str, str] = {}
    dropped: list[str] = []
    for key, value in state.items():
        if (drop_other and not key.startswith(prefix)) or (drop and key.startswith(drop)):
            dropped.append(key)
            continue
        rest = key[len(prefix):]
        new = key
        for pattern, repl in rules:
            if re.fullmatch(pattern, rest):
                new = out_prefix + re.sub(f"^(?:{pattern})$", repl, rest) if repl else ""
                break
        if not new:
            dropped.append(key)
            continue
        out[new], sources[new] = value, key
    return out, sources, dropped


def _fuse_qkv(state: dict[str, Tensor], sources: dict[str, str]) -> None:
    """Concatenate ``<name>#q``, ``#k``, ``#v`` entries into ``<name>`` (timm's fused qkv, in q, k, v order).

    An incomplete triple is left alone: its parts then show up as unexpected keys.
    """
    parts = {k[:-2] for k in state if k[-2:] in ("#q", "#k", "#v")}
    for name in parts:
        keys = [f"{name}#{p}" for p in "qkv"]
        if all(k in state for k in keys):
            state[name] = torch.cat([state.pop(k) for k in keys])
            sources[name] = "+".join(sources.pop(k) for k in keys)


def _block_index(key: str) -> int | None:
    m = re.match(re.escape(VISION) + r"blocks\.(\d+)\.", key)
    return int(m.group(1)) if m else None


def _finish_vision(state: dict[str, Tensor], sources: dict[str, str], cfg: ModelConfig, source: str,
                   notes: list[str]) -> None:
    """Class token (D,) -> (1, 1, D); position table (1+P, D) -> (1, 1+P', D) on the model's grid."""
    cls, pos = VISION + "cls_token", VISION + "pos_embed"
    if cls in state:
        state[cls] = state[cls].reshape(1, 1, -1)
    if pos not in state:
        return
    table = state[pos] if state[pos].dim() == 3 else state[pos].unsqueeze(0)
    n = table.shape[1] - 1 if table.dim() == 3 else 0
    old = math.isqrt(max(n, 0))
    if table.shape[0] != 1 or n <= 0 or old * old != n:
        raise ValueError(f"{source}: {sources[pos]} has shape {tuple(state[pos].shape)}, not a class token "
                         "plus a square grid of patch positions")
    new = cfg.image_size // cfg.patch_size
    if old != new:
        table = resample_abs_pos_embed(table, new_size=[new, new], old_size=[old, old], num_prefix_tokens=1,
                                       interpolation="bicubic", antialias=False)
        notes.append(f"{sources[pos]}: position grid resampled {old}x{old} -> {new}x{new} (bicubic)")
    state[pos] = table


def _all_but(model: torch.nn.Module, prefix: str) -> tuple[str, ...]:
    """Every model key outside ``prefix``: a partial load allows them all to be missing."""
    return tuple(k for k in model.state_dict() if not k.startswith(prefix))


def _load(model: torch.nn.Module, state: dict[str, Tensor], sources: dict[str, str], source: str,
          allow_missing: tuple[str, ...]) -> None:
    """Strict load: shape errors name our key and the checkpoint key; then ``load_state_dict_checked``."""
    own = model.state_dict()
    shapes = [f"{k} (checkpoint key {sources.get(k, k)}): checkpoint {tuple(v.shape)} vs model "
              f"{tuple(own[k].shape)}" for k, v in state.items() if k in own and v.shape != own[k].shape]
    if shapes:
        more = f" (+{len(shapes) - 10} more)" if len(shapes) > 10 else ""
        raise ValueError(f"{source}: shape mismatches {shapes[:10]}{more}")
    load_state_dict_checked(model, state, source, allow_missing=allow_missing)
