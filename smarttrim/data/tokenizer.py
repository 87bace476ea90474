"""Tokenizers: train one offline on a corpus (the built-in ``shapes`` texts), load one from a local directory.

The model's text encoder is RoBERTa-shaped: ids 0 / 1 / 2 are ``<s>`` (bos, [CLS]) / ``<pad>`` / ``</s>`` (eos,
[SEP]). ``train_tokenizer`` keeps those ids (and ``<unk>`` = 3, ``<mask>`` = 4), so a trained tokenizer plugs into
``meter-tiny`` (512 embeddings) with no remapping; ``load_tokenizer`` also reads a local RoBERTa tokenizer
(``vocab.json`` + ``merges.txt``, or a ``tokenizer.json``), which has the same special ids.

The trained tokenizer is a ``tokenizers`` WordPiece model with lowercasing (BERT's normalizer and pre-tokenizer:
split on whitespace and punctuation) whose vocabulary is: the special tokens, the characters of the corpus (as
word starts and as ``##`` continuations, most frequent first), then whole words, most frequent first. Why:

* the corpora it is trained on are small and closed (``shapes`` has about 90 distinct words) and the vocabulary
  tiny (512): every word stays one token, so texts stay short (within ``meter-tiny``'s 24 positions) and the text
  tokens the trimmer keeps or drops are words, easy to read; unseen words made of seen characters fall back to
  ``##`` pieces (greedy longest match, so "circles" -> "circle ##s" once "circle" is known), and only characters
  never seen become ``<unk>``; lowercasing spends no entries on case;
* byte-level BPE would first spend 256 of the 512 entries on single bytes, leaving too few merges for whole words;
* the vocabulary is counted here, deterministically (ties broken alphabetically), rather than by the library's
  WordPiece/BPE trainers: those break ties in hash-map order, so the same corpus gives different ids (and even a
  different token set) from run to run, which would break cached artifacts and saved models.

Nothing here touches a model hub: loading is ``local_files_only``.
"""

from __future__ import annotations

import shutil
from collections import Counter
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from smarttrim.atomic import replace_dir, temp_dir_beside

SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "<pad>", "</s>", "<unk>", "<mask>")
"""The special tokens of a trained tokenizer; their ids are their positions (bos 0, pad 1, eos 2, unk 3, mask 4)."""
MODEL_SPECIAL_IDS: dict[str, int] = {"bos_token_id": 0, "pad_token_id": 1, "eos_token_id": 2}
"""The ids the model presets expect (``ModelConfig.bos_token_id`` / ``pad_token_id`` / ``eos_token_id``)."""


def train_tokenizer(texts: Iterable[str], out_dir: Path | str, vocab_size: int = 512,
                    model_max_length: int | None = None) -> Path:
    """Train a lowercasing WordPiece tokenizer on ``texts`` and save it to ``out_dir``; returns ``out_dir``.

    The vocabulary has at most ``vocab_size`` entries: ``SPECIAL_TOKENS`` (ids 0-4), the corpus's characters
    (at most a third of the rest), then its most frequent words (see the module docstring). The same texts always
    give the same tokenizer. One text encodes as ``<s> ... </s>``, a pair as ``<s> A </s></s> B </s>`` (RoBERTa's
    layout). The directory is a ``transformers`` fast-tokenizer directory (``tokenizer.json``,
    ``tokenizer_config.json``), written to a temporary sibling and renamed into place (an existing ``out_dir`` is
    replaced). ``model_max_length``: stored in the config (e.g. the model's ``max_text_len``); None = unset.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    if not isinstance(vocab_size, int) or vocab_size < len(SPECIAL_TOKENS) + 2:
        raise ValueError(f"vocab_size={vocab_size!r}: must be an integer >= {len(SPECIAL_TOKENS) + 2}")
    out_dir = Path(out_dir)
    bos, pad, eos, unk, mask = SPECIAL_TOKENS
    normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, strip_accents=True,
                                            lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()  # split on whitespace and punctuation
    words: Counter[str] = Counter()
    for text in texts:
        words.update(w for w, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(text)))
    if not words:
        raise ValueError("train_tokenizer: no texts (or only blank ones) to train on")
    vocab = {t: i for i, t in enumerate(SPECIAL_TOKENS)}
    for piece in _vocabulary(words, vocab_size - len(SPECIAL_TOKENS)):
        vocab.setdefault(piece, len(vocab))
    tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=unk, continuing_subword_prefix="##",
                                     max_input_chars_per_word=100))
    tok.normalizer = normalizer
    tok.pre_tokenizer = pre_tokenizer
    ids = {t: tok.token_to_id(t) for t in SPECIAL_TOKENS}
    if ids != {t: i for i, t in enumerate(SPECIAL_TOKENS)} or tok.get_vocab_size() > vocab_size:
        raise RuntimeError(f"train_tokenizer: special ids {ids}, vocabulary {tok.get_vocab_size()} (> {vocab_size}?)")
    tok.post_processor = processors.TemplateProcessing(
        single=f"{bos} $A {eos}", pair=f"{bos} $A {eos} {eos} $B {eos}",
        special_tokens=[(bos, ids[bos]), (eos, ids[eos])])
    tok.decoder = decoders.WordPiece(prefix="##")
    extra: dict[str, Any] = {} if model_max_length is None else {"model_max_length": model_max_length}
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos, pad_token=pad, unk_token=unk,
                                   mask_token=mask, cls_token=bos, sep_token=eos, **extra)

    tmp = temp_dir_beside(out_dir)
    try:
        fast.save_pretrained(str(tmp))
        replace_dir(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out_dir


def _vocabulary(words: Counter[str], size: int) -> list[str]:
    """At most ``size`` WordPiece entries for a word count: characters first (word-initial ``c`` and continuation
    ``##c``, most frequent first, at most a third of ``size``), then whole words, most frequent first; ties in
    alphabetical order."""
    pieces: Counter[str] = Counter()
    for word, n in words.items():
        pieces[word[0]] += n
        for ch in word[1:]:
            pieces["##" + ch] += n
    by_count = lambda counter: sorted(counter, key=lambda t: (-counter[t], t))  # noqa: E731
    alphabet = by_count(pieces)[: max(1, size // 3)]
    known = set(alphabet)
    whole = [w for w in by_count(words) if w not in known]
    return (alphabet + whole)[:size]


def load_tokenizer(path: Path | str, expect_ids: dict[str, int] | None = MODEL_SPECIAL_IDS) -> Any:
    """A ``transformers`` fast tokenizer from a local directory (never a hub): a saved tokenizer
    (``tokenizer.json`` / ``tokenizer_config.json``, e.g. from ``train_tokenizer``) or a RoBERTa one
    (``vocab.json`` + ``merges.txt``).

    expect_ids: token ids the tokenizer must have, e.g. ``{"pad_token_id": 1}`` (default: the model presets'
    bos/pad/eos ids); None = no check. Errors name ``path``: ``FileNotFoundError`` when there is no tokenizer
    there, ``ValueError`` when it cannot be read or its ids differ.
    """
    from transformers import AutoTokenizer, RobertaTokenizerFast

    path = Path(path)
    if not path.is_dir():
        raise FileNotFoundError(f"{path}: no such tokenizer directory")
    has = {f for f in ("tokenizer.json", "tokenizer_config.json", "vocab.json", "merges.txt") if (path / f).is_file()}
    if not has & {"tokenizer.json", "tokenizer_config.json"} and not {"vocab.json", "merges.txt"} <= has:
        raise FileNotFoundError(f"{path}: not a tokenizer directory (needs tokenizer.json, or vocab.json and "
                                f"merges.txt); it holds {sorted(p.name for p in path.iterdir())[:20]}")
    try:
        if has & {"tokenizer.json", "tokenizer_config.json"}:
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        else:
            tok = RobertaTokenizerFast.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ValueError(f"{path}: cannot load the tokenizer: {e}") from e
    if expect_ids:
        got = {k: getattr(tok, k, None) for k in expect_ids}
        if got != dict(expect_ids):
            raise ValueError(f"{path}: tokenizer ids {got}, expected {dict(expect_ids)}")
    return tok


__all__ = ["MODEL_SPECIAL_IDS", "SPECIAL_TOKENS", "load_tokenizer", "train_tokenizer"]
