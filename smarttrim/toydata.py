"""A toy VQA task for ``meter-tiny``-sized models: the interim built-in data set.

This is a stand-in until the project's real ``shapes`` data set exists; it lets the demo and the slow
tests train a model end to end in seconds on a CPU, with no download.

Images (32 x 32, RGB) are a 4 x 4 grid of 8 x 8 cells, i.e. exactly one ``meter-tiny`` patch per cell.
Each image holds 2-4 objects in distinct cells, with distinct shapes and distinct colors, on a noisy
gray background. A shape is a pattern drawn inside its cell (filled square, ring, plus-cross, diagonal
bar, small dot, stripes). Questions come in three types:

* ``what color is the ring ?``           -> the color of the named (present) shape;
* ``what shape is the red one ?``        -> the shape of the named (present) color;
* ``is there a red cross ?``             -> ``yes`` / ``no`` (half of the ``no`` cases are near misses:
  a present shape asked with the color of another present object).

Random filler words (``please``, ``kindly``, ...) are interleaved with the question words, so text
lengths vary and some tokens carry no information: something for the text token trimmer to drop. The
answer is determined by the image and question; for the ``what ...`` questions it sits in a single cell
out of 16, so a model that reads the question could drop most image patches, which is what SmartTrim's
cross-modal token trimmer exploits.

Labels are VQA soft scores: ``ANNOTATORS`` simulated annotators each give the true answer with
probability ``1 - annotator_noise`` (otherwise a wrong answer of the same question type), and answer
``a`` scores ``vqa_score(#annotators who said a)`` (0, 0.3, 0.6, 0.9, 1.0 as in VQA v2 / METER).
Pixels are normalized with CLIP's mean and std. Word ids start at 3 (0 = bos/[CLS], 1 = pad, 2 = eos,
as in the ``meter-tiny`` preset); everything is generated with vectorized numpy from one seed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor

from smarttrim.data import loader

BOS, PAD, EOS = 0, 1, 2
IMAGE_SIZE, CELL, GRID = 32, 8, 4
NUM_CELLS = GRID * GRID

COLORS: dict[str, tuple[float, float, float]] = {
    "red": (0.95, 0.10, 0.10),
    "green": (0.10, 0.85, 0.15),
    "blue": (0.15, 0.30, 1.00),
    "yellow": (1.00, 0.95, 0.10),
    "magenta": (0.95, 0.15, 0.95),
    "cyan": (0.10, 0.95, 0.95),
}
SHAPES: tuple[str, ...] = ("square", "ring", "cross", "diagonal", "dot", "stripes")
COLOR_NAMES: tuple[str, ...] = tuple(COLORS)
ANSWERS: tuple[str, ...] = (*COLOR_NAMES, *SHAPES, "yes", "no")
"""The answer vocabulary: label index -> answer string."""
NUM_LABELS = len(ANSWERS)
QUESTION_TYPES: tuple[str, ...] = ("color", "shape", "exists")

CORE_WORDS: tuple[str, ...] = ("what", "color", "shape", "is", "the", "one", "there", "a", "?")
FILLERS: tuple[str, ...] = ("please", "kindly", "now", "hey", "tell", "me", "quickly", "so", "um", "well",
                            "okay", "exactly", "in", "this", "picture", "image")
"""Words that never change the answer (disjoint from the question words, colors and shapes)."""
SPECIAL: tuple[str, ...] = ("<s>", "<pad>", "</s>")
VOCAB: dict[str, int] = {w: i for i, w in enumerate((*SPECIAL, *CORE_WORDS, *COLOR_NAMES, *SHAPES, *FILLERS))}
"""Word -> token id (ids 0-2 are bos/[CLS], pad, eos)."""

CLIP_MEAN = np.array(loader.CLIP_MEAN, dtype=np.float32)
CLIP_STD = np.array(loader.CLIP_STD, dtype=np.float32)
ANNOTATORS = 10
MAX_FILLERS = 12
MAX_TEXT_LEN = 7 + MAX_FILLERS + 2  # longest question (7 words) + fillers + bos/eos = 21 <= 24


def _patterns() -> np.ndarray:
    """(len(SHAPES), 8, 8) boolean masks of the shapes inside one cell (1-pixel margin)."""
    p = np.zeros((len(SHAPES), CELL, CELL), dtype=bool)
    yy, xx = np.mgrid[0:CELL, 0:CELL]
    inner = (yy >= 1) & (yy <= 6) & (xx >= 1) & (xx <= 6)
    p[0] = inner  # square: filled 6x6
    p[4] = (yy >= 2) & (yy <= 5) & (xx >= 2) & (xx <= 5)  # dot: a small filled 4x4
    p[1] = inner & ~p[4]  # ring: the 1-pixel outline of the 6x6 square
    p[2] = inner & (((yy >= 3) & (yy <= 4)) | ((xx >= 3) & (xx <= 4)))  # cross: a plus sign
    p[3] = inner & (np.abs(yy - xx) <= 1)  # diagonal: a thick top-left to bottom-right bar
    p[5] = inner & (yy % 2 == 1)  # stripes: three horizontal lines
    return p


PATTERNS = _patterns()


def vqa_score(count: np.ndarray) -> np.ndarray:
    """VQA v2 soft score (as in METER's label files) of an answer given by ``count`` annotators."""
    return np.select([count >= 4, count == 3, count == 2, count == 1], [1.0, 0.9, 0.6, 0.3], 0.0)


def encode(words: list[str]) -> list[int]:
    """Token ids of a list of words, with bos/eos."""
    return [BOS, *(VOCAB[w] for w in words), EOS]


def decode(ids: Tensor | list[int]) -> str:
    """The question text of a row of token ids (special tokens dropped)."""
    inv = {i: w for w, i in VOCAB.items()}
    return " ".join(inv[int(i)] for i in ids if int(i) not in (BOS, PAD, EOS))


@dataclass(frozen=True)
class ToyVQA:
    """N toy VQA examples: the model inputs plus the ground truth needed for analysis.

    ``pixel_values`` (N, 3, 32, 32) float, ``input_ids`` / ``attention_mask`` (N, T) long (T = longest
    question in the set, padded with ``PAD``), ``labels`` (N, NUM_LABELS) soft scores, ``answer`` (N,)
    the true answer's label index, ``qtype`` (N,) index into ``QUESTION_TYPES``, ``target_cell`` (N,)
    the grid cell (0-15, row-major; patch ``target_cell + 1`` after [CLS]) that answers the question,
    or -1 when no single cell does (``is there ...`` questions).
    """

    pixel_values: Tensor
    input_ids: Tensor
    attention_mask: Tensor
    labels: Tensor
    answer: Tensor
    qtype: Tensor
    target_cell: Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def batch(self, index: Tensor | slice | None = None) -> dict[str, Tensor]:
        """The model's batch dict for some examples (all by default), text padding trimmed to the longest."""
        index = slice(None) if index is None else index
        mask = self.attention_mask[index]
        width = int(mask.sum(1).max())
        return {"pixel_values": self.pixel_values[index], "input_ids": self.input_ids[index][:, :width],
                "attention_mask": mask[:, :width], "labels": self.labels[index]}


def make_toy_vqa(n: int, seed: int = 0, annotator_noise: float = 0.1, min_objects: int = 2,
                 max_objects: int = 4, pixel_noise: float = 0.08,
                 question_types: tuple[str, ...] = QUESTION_TYPES, max_fillers: int = MAX_FILLERS,
                 num_shapes: int = len(SHAPES), num_colors: int = len(COLORS)) -> ToyVQA:
    """Generate ``n`` examples deterministically from ``seed`` (see the module docstring).

    annotator_noise: probability that one simulated annotator gives a wrong answer (soft labels).
    min_objects / max_objects: objects per image (at most ``len(SHAPES)``).
    pixel_noise: std of the Gaussian pixel noise (in [0, 1] intensity units) over the whole image.
    question_types: the question types to draw from (uniformly), a subset of ``QUESTION_TYPES``.
    max_fillers: at most this many filler words per question (uniform in 0..max_fillers).
    num_shapes / num_colors: use only the first k shapes / colors (easier variants; labels keep the full
    ``ANSWERS`` vocabulary).
    """
    if not (2 <= num_shapes <= len(SHAPES) and 2 <= num_colors <= len(COLORS)):
        raise ValueError(f"num_shapes={num_shapes}, num_colors={num_colors}: need 2..{len(SHAPES)} and "
                         f"2..{len(COLORS)}")
    if not 1 <= min_objects <= max_objects <= min(num_shapes, num_colors):
        raise ValueError(f"min_objects={min_objects}, max_objects={max_objects}: need 1 <= min <= max <= "
                         f"{min(num_shapes, num_colors)}")
    unknown = sorted(set(question_types) - set(QUESTION_TYPES))
    if not question_types or unknown:
        raise ValueError(f"question_types={question_types!r}: must be a non-empty subset of {QUESTION_TYPES}")
    if not 0 <= max_fillers <= MAX_FILLERS:
        raise ValueError(f"max_fillers={max_fillers}: must be in 0..{MAX_FILLERS} (questions fit 24 tokens)")
    if n < 1:
        raise ValueError(f"n={n}: must be >= 1")
    rng = np.random.default_rng(seed)
    ar = np.arange(n)
    k_obj = rng.integers(min_objects, max_objects + 1, n)  # objects per image
    cells = np.argsort(rng.random((n, NUM_CELLS)), 1)[:, :max_objects]  # distinct cells
    shapes = np.argsort(rng.random((n, num_shapes)), 1)[:, :max_objects]  # distinct shapes
    colors = np.argsort(rng.random((n, num_colors)), 1)[:, :max_objects]  # distinct colors
    present = np.arange(max_objects)[None] < k_obj[:, None]  # (n, max_objects)

    # ---- images (channels last while drawing): gray background, object patterns, noise, CLIP-normalize
    palette = np.array(list(COLORS.values()), dtype=np.float32)  # (C, 3)
    gray = rng.uniform(0.25, 0.5, (n, 1, 1, 1)).astype(np.float32)
    img = np.broadcast_to(gray, (n, IMAGE_SIZE, IMAGE_SIZE, 3)).copy()
    rgb = palette[colors] + rng.uniform(-0.08, 0.08, (n, max_objects, 3)).astype(np.float32)
    offset = np.arange(CELL)
    for k in range(max_objects):
        rows = ar[present[:, k]]
        ys = (cells[rows, k] // GRID * CELL)[:, None, None] + offset[None, :, None]  # (m, 8, 1)
        xs = (cells[rows, k] % GRID * CELL)[:, None, None] + offset[None, None, :]  # (m, 1, 8)
        idx = (rows[:, None, None], ys, xs)
        mask = PATTERNS[shapes[rows, k]][..., None]  # (m, 8, 8, 1)
        img[idx] = np.where(mask, rgb[rows, k][:, None, None, :], img[idx])
    img += pixel_noise * rng.standard_normal(img.shape, dtype=np.float32)
    np.clip(img, 0.0, 1.0, out=img)
    img = (img - CLIP_MEAN) / CLIP_STD
    pixel_values = torch.from_numpy(img).permute(0, 3, 1, 2).contiguous()  # (n, 3, 32, 32)

    # ---- questions: the object asked about is one of the present ones
    qtype = np.array([QUESTION_TYPES.index(q) for q in question_types])[rng.integers(0, len(question_types), n)]
    obj = (rng.random(n) * k_obj).astype(np.int64)  # index of a present object
    q_shape, q_color = shapes[ar, obj], colors[ar, obj]
    target_cell = cells[ar, obj].copy()
    answer = np.where(qtype == 0, q_color, len(COLORS) + q_shape)  # color / shape questions
    # "is there a <color> <shape> ?": yes (the object itself) or no (near miss / random absent pair)
    is_exists = qtype == 2
    says_yes = rng.random(n) < 0.5
    near = rng.random(n) < 0.5
    other = (obj + 1 + (rng.random(n) * (k_obj - 1)).astype(np.int64)) % k_obj  # another present object
    rand_shape, rand_color = rng.integers(0, num_shapes, n), rng.integers(0, num_colors, n)
    ask_color = np.where(says_yes, q_color, np.where(near, colors[ar, other], rand_color))
    ask_shape = np.where(says_yes | near, q_shape, rand_shape)
    pair_present = ((shapes == ask_shape[:, None]) & (colors == ask_color[:, None]) & present).any(1)
    answer = np.where(is_exists, np.where(pair_present, ANSWERS.index("yes"), ANSWERS.index("no")), answer)
    target_cell[is_exists] = -1

    # question words (ids), padded to 7 words with -1
    v = VOCAB
    color_ids = np.array([v[c] for c in COLOR_NAMES])
    shape_ids = np.array([v[s] for s in SHAPES])

    def rows(sel: np.ndarray, *words: str | np.ndarray) -> np.ndarray:
        """(sel.sum(), len(words)) ids: a fixed word, or a per-example id array restricted to ``sel``."""
        m = int(sel.sum())
        return np.stack([np.full(m, v[w]) if isinstance(w, str) else w[sel] for w in words], 1)

    core = np.full((n, 7), -1, dtype=np.int64)
    t0, t1 = qtype == 0, qtype == 1
    core[t0, :6] = rows(t0, "what", "color", "is", "the", shape_ids[q_shape], "?")
    core[t1, :7] = rows(t1, "what", "shape", "is", "the", color_ids[q_color], "one", "?")
    core[is_exists, :6] = rows(is_exists, "is", "there", "a", color_ids[ask_color], shape_ids[ask_shape], "?")
    n_core = (core >= 0).sum(1)

    # interleave fillers: core words keep their order (keys 0..n_core-1), fillers get random keys
    n_fill = rng.integers(0, max_fillers + 1, n)
    filler_ids = np.array([v[w] for w in FILLERS])[rng.integers(0, len(FILLERS), (n, MAX_FILLERS))]
    fillers = np.where(np.arange(MAX_FILLERS)[None] < n_fill[:, None], filler_ids, -1)
    words = np.concatenate([core, fillers], 1)
    keys = np.concatenate([np.broadcast_to(np.arange(7, dtype=np.float64), (n, 7)),
                           rng.uniform(-0.5, n_core[:, None] - 0.5, (n, MAX_FILLERS))], 1)
    keys[words < 0] = np.inf  # unused slots go last
    words = np.take_along_axis(words, np.argsort(keys, 1, kind="stable"), 1)
    length = n_core + n_fill + 2
    width = int(length.max())
    ids = np.full((n, width), PAD, dtype=np.int64)
    ids[:, 0] = BOS
    ids[:, 1:width - 1] = np.where(words[:, :width - 2] >= 0, words[:, :width - 2], PAD)
    ids[ar, length - 1] = EOS
    attention_mask = (np.arange(width)[None] < length[:, None]).astype(np.int64)

    # ---- soft labels from simulated annotators (wrong answers stay within the question type)
    group_lo = np.select([qtype == 0, qtype == 1], [0, len(COLORS)], len(COLORS) + len(SHAPES))
    group_n = np.select([qtype == 0, qtype == 1], [num_colors, num_shapes], 2)
    wrong = rng.random((n, ANNOTATORS)) < annotator_noise
    shift = 1 + (rng.random((n, ANNOTATORS)) * (group_n[:, None] - 1)).astype(np.int64)
    lo, size = group_lo[:, None], group_n[:, None]
    votes = np.where(wrong, lo + (answer[:, None] - lo + shift) % size, answer[:, None])
    counts = np.zeros((n, NUM_LABELS), dtype=np.int64)
    np.add.at(counts, (np.repeat(ar, ANNOTATORS), votes.ravel()), 1)
    labels = vqa_score(counts).astype(np.float32)

    return ToyVQA(pixel_values=pixel_values,
                  input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(attention_mask),
                  labels=torch.from_numpy(labels), answer=torch.from_numpy(answer.astype(np.int64)),
                  qtype=torch.from_numpy(qtype.astype(np.int64)),
                  target_cell=torch.from_numpy(target_cell.astype(np.int64)))


def majority_answer(labels: Tensor) -> int:
    """The label index with the highest total soft score (the 'always answer X' baseline's X)."""
    return int(labels.sum(0).argmax())


def vqa_accuracy(logits_or_pred: Tensor, labels: Tensor) -> float:
    """VQA score (soft accuracy): mean over examples of the soft score of the predicted answer."""
    pred = logits_or_pred.argmax(-1) if logits_or_pred.dim() == 2 else logits_or_pred
    return float(labels.gather(1, pred.long()[:, None]).mean())


def majority_baseline(train_labels: Tensor, eval_labels: Tensor) -> float:
    """VQA score on ``eval_labels`` of always predicting the training set's majority answer."""
    pred = torch.full((eval_labels.shape[0],), majority_answer(train_labels), dtype=torch.long)
    return vqa_accuracy(pred, eval_labels)


__all__ = ["ANSWERS", "COLOR_NAMES", "FILLERS", "NUM_LABELS", "QUESTION_TYPES", "SHAPES", "VOCAB", "ToyVQA",
           "decode", "encode", "majority_answer", "majority_baseline", "make_toy_vqa", "vqa_accuracy",
           "vqa_score"]
