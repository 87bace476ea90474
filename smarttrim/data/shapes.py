"""``shapes``: the built-in offline data set, generated deterministically from a seed (no download).

Scenes hold 2-5 objects, each a color (``COLORS``) x shape (``SHAPES``) x size (``SIZES``), at random
non-overlapping positions on a varied background (a solid color, a linear gradient, or a solid color with light
pixel noise; dark or light). Images are RGB PNGs, ``image_size`` x ``image_size`` (default 64; the loader
resizes them to the model's input size). An object fits in a circle of radius 8% (small) or 13% (large) of the
image side: a large circle covers 5% of the image, a small one 2%, so a question about one or two objects can be
answered from a few patches (``meta["focus"]`` says which objects): what SmartTrim's token trimmers should learn.

Every flavor of ``TASK_FLAVORS`` has the splits ``SHAPES_SPLITS`` and yields ``Sample`` records:

* ``vqa``: one image, one question, 10 simulated annotator answers (``Sample.answers``) from the fixed answer
  vocabulary ``answer_vocabulary("vqa")``. Question types (``VQA_QUESTION_TYPES``, drawn with ``VQA_TYPE_WEIGHTS``:
  mostly ``attribute``, so that the text decides which few patches hold the answer):
  ``attribute`` ("what color is the small circle ?": color/shape/size of a uniquely described object),
  ``count`` ("how many red objects are there ?": 0-5, roughly uniform), ``exists`` ("is there a large
  triangle ?": yes/no, half of the ``no`` cases are near misses), ``relation`` ("is the red square above the
  green cross ?": yes/no) and ``relate_query`` ("what shape is left of the blue circle ?": the color or shape of
  the only object on that side). At most 3 of the 10 annotators are wrong (each with probability
  ``ANNOTATOR_NOISE``, a wrong answer of the same kind; counts off by one), so the true answer always has VQA
  score 1 and the noise shows in the soft scores of the others.
* ``nlvr2``: two images (left, right) and a statement about how many objects matching a description each holds
  ("the left image contains more red objects than the right image", "both images contain a triangle",
  "exactly one image contains a small cross", "there are exactly three circles in the two images", ...). The
  label is ``"True"``/``"False"``, exactly balanced in every block of 2 consecutive samples. The statement is
  drawn before the label and the scenes are built to make it true or false, so the text alone says nothing.
* ``snli_ve``: one image and a hypothesis; label ``entailment``/``neutral``/``contradiction``, exactly balanced
  in every block of 3 consecutive samples. Some scenes hold an *occluder*: a gray hatched box that may hide
  objects. ``neutral`` means the image cannot decide the hypothesis because of what the box may hide:
  "there is a red circle" with no red circle visible is a contradiction without a box and neutral with one;
  "there are exactly two squares" with two visible squares is an entailment without a box and neutral with one
  (a third may be hidden), and a contradiction once three are visible; "the red circle is left of the blue
  square" is decided by the positions when both are visible, neutral when one is missing and a box is present,
  and a contradiction (failed presupposition, as in SNLI) when one is missing and there is no box. Hypothesis
  families (existence, negated existence, exact count, at-least count, relation) each take all three labels.
  Every neutral scene has a box; to keep "box => neutral" a weak cue, entailment and contradiction scenes get one
  where their label allows, 4 times as often as not (about half of them), so the box alone predicts the label
  with ~0.5 accuracy (chance: 1/3).
* ``retrieval`` and ``caption``: one image and 3-5 true captions of different kinds (a list of some objects,
  the object count and background, counts per color, counts per shape, a spatial relation).

Texts are lowercase words separated by single spaces (punctuation is a separate word), at most 20 words. Spatial
words compare object centers (``left of``: smaller x; ``above``: smaller y, image rows grow downwards); the
generator only states a relation when the centers differ by at least ``RELATION_MARGIN`` along that axis and, for
``relate_query``, when no other object is within the margin of the reference along that axis.

Determinism: sample ``i`` of ``(task, split, seed)`` depends only on those four values (not on ``n``,
``start`` or the other samples; the balancing blocks also depend only on them), so the same arguments give
byte-identical PNGs and texts, splits and tasks are independent streams, and ``generate(..., start=k)`` resumes
a stream (for sharding). The scene and the texts do not depend on ``image_size``, only the pixels do.
``Sample.meta`` holds the full scene description (normalized coordinates) and a structured form of the text, so
every answer and label can be recomputed (the tests do); ``meta["focus"]`` lists the indices of the objects the
text refers to.
"""

from __future__ import annotations

import struct
import zlib
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import combinations, product
from statistics import NormalDist
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from smarttrim.data.records import NLVR2_LABELS, SNLI_VE_LABELS, TASK_FLAVORS, Sample

SHAPES_SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The splits of every flavor; each is an independent stream of the generator."""

DEFAULT_SIZES: dict[str, dict[str, int]] = {
    "vqa": {"train": 6000, "val": 600, "test": 600},
    "nlvr2": {"train": 4000, "val": 400, "test": 400},
    "snli_ve": {"train": 6000, "val": 600, "test": 600},
    "retrieval": {"train": 2000, "val": 200, "test": 200},
    "caption": {"train": 2000, "val": 200, "test": 200},
}
"""Samples per split when ``n`` / ``sizes`` is not given: a quickstart that trains in minutes on 2 CPU cores."""

COLORS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "cyan")
COLOR_RGB: dict[str, tuple[int, int, int]] = {
    "red": (225, 35, 35), "green": (40, 190, 50), "blue": (40, 80, 240),
    "yellow": (240, 215, 30), "purple": (150, 50, 205), "cyan": (30, 205, 215),
}
"""Nominal color of each object color (a rendered object differs by at most ``COLOR_JITTER`` per channel)."""
COLOR_JITTER = 12
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross")
SHAPE_PLURALS: dict[str, str] = {"circle": "circles", "square": "squares", "triangle": "triangles",
                                 "cross": "crosses"}
SIZES: tuple[str, ...] = ("small", "large")
SIZE_RADIUS: dict[str, float] = {"small": 0.08, "large": 0.13}
"""Radius of an object's bounding circle, as a fraction of the image side."""
ATTRIBUTES: tuple[str, ...] = ("size", "color", "shape")
"""Object attributes, in the order their words appear in a description ("small red circle")."""
_VALUES: dict[str, tuple[str, ...]] = {"size": SIZES, "color": COLORS, "shape": SHAPES}

MIN_OBJECTS, MAX_OBJECTS = 2, 5
"""Objects per scene (the occluder of ``snli_ve`` not counted)."""
OCCLUDER_HALF = 0.15
"""Half side of the ``snli_ve`` occluder box, as a fraction of the image side (it could hide any object)."""
RELATION_MARGIN = 0.06
"""Least center distance (fraction of the image side) along an axis for a spatial word to be used."""
ANNOTATORS = 10
ANNOTATOR_NOISE = 0.1
MAX_WRONG_ANNOTATORS = 3
NUMBER_WORDS: tuple[str, ...] = ("zero", "one", "two", "three", "four", "five", "six")
RELATIONS: dict[str, tuple[int, int]] = {"left of": (0, -1), "right of": (0, 1), "above": (1, -1), "below": (1, 1)}
"""Relation -> (axis: 0 = x, 1 = y; sign of the object's coordinate minus the reference's)."""

VQA_QUESTION_TYPES: tuple[str, ...] = ("attribute", "count", "exists", "relation", "relate_query")
VQA_TYPE_WEIGHTS: dict[str, float] = {"attribute": 0.55, "count": 0.15, "exists": 0.2, "relation": 0.05,
                                      "relate_query": 0.05}
"""How often each question type is drawn. Most questions name one object and ask for one of its attributes, so
the answer is on a few patches the text points to, and the question alone says little: the best answer per
question text scores about 0.3 (the shard stage's text-only baseline), the image decides the rest."""
GENERATOR_VERSION = 2
"""Bumped when the same arguments give other samples (2: the vqa type mix above, was 0.3/0.2/0.2/0.15/0.15; single-
object scenes among the captioned ones, ``SINGLE_OBJECT_SCENES``)."""
VQA_ANSWERS: tuple[str, ...] = (*COLORS, *SHAPES, *SIZES, *(str(i) for i in range(MAX_OBJECTS + 1)), "yes", "no")
"""The vqa answer vocabulary (label index -> answer), as normalized by the VQA evaluation (digits for counts)."""
NLVR2_TEMPLATES: tuple[str, ...] = ("more_left", "more_right", "both", "exactly_one", "neither", "same",
                                    "exact_left", "exact_right", "total")
SNLI_VE_FAMILIES: tuple[str, ...] = ("exists", "not_exists", "count_exact", "count_at_least", "relation")
_SNLI_VE_WEIGHTS = (0.15, 0.15, 0.15, 0.15, 0.4)
CAPTION_KINDS: tuple[str, ...] = ("list", "overview", "color_counts", "shape_counts", "relation")

_GAUSS = np.array([NormalDist().inv_cdf((i + 0.5) / 256) for i in range(256)], dtype=np.float32)
_TASK_IDS = {t: i for i, t in enumerate(TASK_FLAVORS)}
_SPLIT_IDS = {s: i for i, s in enumerate(SHAPES_SPLITS)}
_GAP = 0.04  # least free space between two bounding circles (fraction of the side)
_BORDER = 0.02  # least free space between a bounding circle and the image border
_DESC_FORMS: tuple[tuple[str, ...], ...] = tuple(
    f for k in (1, 2, 3) for f in combinations(ATTRIBUTES, k))  # every non-empty attribute subset, in word order
_DESC_WEIGHTS = {1: 1.0, 2: 1.5, 3: 1.0}

Props = dict[str, str]
"""A description: some attributes of an object, e.g. ``{"color": "red", "shape": "circle"}`` (empty = any)."""


# ---------------------------------------------------------------- public API

OBJECT_LABELS: tuple[str, ...] = (*(f"{c} {s}" for c in COLORS for s in SHAPES),
                                  *(f"{z} {s}" for z in SIZES for s in SHAPES))
"""What a scene shows, as labels of a visual encoder's supervised pre-training (``object_labels``): each object
gives its colour-shape and its size-shape pair, so no label is told by colour or size alone."""


def object_labels(scene: dict[str, Any]) -> list[int]:
    """Sorted indices into ``OBJECT_LABELS`` of the pairs the objects of ``scene`` (``Sample.meta["scene"]``) show.
    Objects under an ``snli_ve`` occluder are labelled too: pre-train on caption / retrieval scenes (none)."""
    found = set()
    for obj in scene["objects"]:
        found.add(OBJECT_LABELS.index(f"{obj['color']} {obj['shape']}"))
        found.add(OBJECT_LABELS.index(f"{obj['size']} {obj['shape']}"))
    return sorted(found)


def answer_vocabulary(task: str = "vqa") -> tuple[str, ...]:
    """The fixed answers of ``vqa`` (classifier index -> answer), or the labels of ``nlvr2`` / ``snli_ve``."""
    if task == "vqa":
        return VQA_ANSWERS
    if task == "nlvr2":
        return NLVR2_LABELS
    if task == "snli_ve":
        return SNLI_VE_LABELS
    raise ValueError(f"task={task!r}: has no answer vocabulary (vqa, nlvr2 and snli_ve have)")


def generate(task: str, split: str, n: int | None = None, seed: int = 0, image_size: int = 64,
             start: int = 0) -> Iterator[Sample]:
    """Samples ``start .. start + n - 1`` of the ``shapes`` flavor ``task``, split ``split`` (lazily).

    n: number of samples; None = ``DEFAULT_SIZES[task][split]``.
    seed: a non-negative integer; the same ``(task, split, seed)`` always gives the same samples, byte for byte.
    image_size: side of the square PNG images in pixels (>= 16); changes the pixels only, not scenes or texts.
    start: index of the first sample (sample ``i`` is the same whatever ``start`` and ``n`` are).

    Keys are ``shapes-<task>-<split>-<index:07d>``.
    """
    if task not in TASK_FLAVORS:
        raise ValueError(f"task={task!r}: must be one of {TASK_FLAVORS}")
    if split not in SHAPES_SPLITS:
        raise ValueError(f"split={split!r}: must be one of {SHAPES_SPLITS}")
    n = DEFAULT_SIZES[task][split] if n is None else n
    for name, value, low in (("n", n, 0), ("seed", seed, 0), ("start", start, 0), ("image_size", image_size, 16)):
        if not isinstance(value, int | np.integer) or isinstance(value, bool) or value < low:
            raise ValueError(f"{name}={value!r}: must be an integer >= {low}")
    return _stream(task, split, int(n), int(seed), int(image_size), int(start))  # arguments checked eagerly


def _stream(task: str, split: str, n: int, seed: int, image_size: int, start: int) -> Iterator[Sample]:
    """The samples; ``image_size=0``: texts and labels only (``Sample.images`` empty)."""
    make = _MAKERS[task]
    blocks: dict[int, list[str]] = {}
    for index in range(start, start + n):
        yield make(_Context(task, split, seed, index, image_size, blocks))


def generate_splits(task: str, sizes: dict[str, int] | None = None, seed: int = 0,
                    image_size: int = 64) -> dict[str, Iterator[Sample]]:
    """One lazy ``generate`` stream per split; ``sizes`` overrides ``DEFAULT_SIZES[task]`` per split (a split
    missing from ``sizes`` keeps its default; unknown split names are errors)."""
    if task not in TASK_FLAVORS:
        raise ValueError(f"task={task!r}: must be one of {TASK_FLAVORS}")
    sizes = dict(sizes or {})
    unknown = sorted(set(sizes) - set(SHAPES_SPLITS))
    if unknown:
        raise ValueError(f"sizes: unknown splits {unknown}; the splits are {SHAPES_SPLITS}")
    counts = {**DEFAULT_SIZES[task], **sizes}
    return {s: generate(task, s, counts[s], seed=seed, image_size=image_size) for s in SHAPES_SPLITS}


def vqa_score(prediction: str, answers: Sequence[str]) -> float:
    """The official VQA accuracy of one prediction against the annotators' answers: the mean over the leave-one-
    out subsets of ``min(1, matches / 3)`` (0.3, 0.6, 0.9, 1.0 for 1, 2, 3, 4+ of 10 matching annotators)."""
    if not answers:
        raise ValueError("vqa_score: no annotator answers")
    matches = sum(a == prediction for a in answers)
    total = len(answers)
    leave_out_match = matches * min(1.0, (matches - 1) / 3) if matches else 0.0
    return (leave_out_match + (total - matches) * min(1.0, matches / 3)) / total


@dataclass(frozen=True)
class MajorityBaseline:
    """Always predicting ``prediction`` (the reference samples' most frequent answer/label) scores ``score`` on
    the ``n`` evaluated samples (vqa: mean VQA score; nlvr2 / snli_ve: accuracy)."""

    prediction: str
    score: float
    n: int


def majority_baseline(samples: Iterable[Sample], eval_samples: Iterable[Sample] | None = None) -> MajorityBaseline:
    """The majority-answer baseline: the answer with the highest total VQA score over ``samples`` (vqa) or the
    most frequent label (nlvr2, snli_ve; ties broken by first occurrence), scored on ``eval_samples`` (default:
    ``samples`` themselves). Retrieval/caption samples have neither and raise ``ValueError``."""
    samples = list(samples)
    evals = samples if eval_samples is None else list(eval_samples)
    if not samples or not evals:
        raise ValueError("majority_baseline: needs at least one reference and one evaluation sample")
    if all(s.answers for s in samples):
        totals: Counter[str] = Counter()
        for s in samples:
            for a in set(s.answers):
                totals[a] += vqa_score(a, s.answers)
        best = max(totals, key=totals.__getitem__)  # the first one seen among equals
        if not all(s.answers for s in evals):
            raise ValueError("majority_baseline: evaluation samples without vqa answers")
        return MajorityBaseline(best, float(np.mean([vqa_score(best, s.answers) for s in evals])), len(evals))
    if all(s.label is not None for s in samples):
        best = Counter(s.label for s in samples).most_common(1)[0][0]
        assert best is not None
        if any(s.label is None for s in evals):
            raise ValueError("majority_baseline: evaluation samples without labels")
        return MajorityBaseline(best, float(np.mean([s.label == best for s in evals])), len(evals))
    raise ValueError("majority_baseline: samples have neither vqa answers nor labels (retrieval/caption?)")


FOCUS_COVERAGE = 0.25
"""A patch lies on an object when at least this share of its area is inside the object's bounding circle."""


def object_patches(obj: dict[str, Any], grid: int, coverage: float = FOCUS_COVERAGE) -> np.ndarray:
    """(grid * grid,) bool, raster order: the patches of a ``grid`` x ``grid`` patch grid that ``obj`` (a scene
    object: normalized center ``x``, ``y`` and radius ``r``) covers by at least ``coverage`` of their area
    (measured on an 8 x 8 sub-grid of points per patch, against the object's bounding circle)."""
    sub = (np.arange(8) + 0.5) / 8  # sample points inside a patch, as fractions of its side
    cells = (np.arange(grid)[:, None] + sub[None, :]) / grid  # (grid, 8) coordinates per row / column
    ys = cells[:, None, :, None]  # (rows, 1, 8, 1)
    xs = cells[None, :, None, :]  # (1, cols, 1, 8)
    hit = (xs - obj["x"]) ** 2 + (ys - obj["y"]) ** 2 <= obj["r"] ** 2  # (rows, cols, 8, 8)
    return (hit.mean((2, 3)) >= coverage).reshape(-1)


def focus_patches(scene: dict[str, Any], focus: Sequence[int], grid: int) -> np.ndarray:
    """(grid * grid,) bool: the patches the text refers to, those of the scene's objects ``focus``
    (``Sample.meta["focus"]``, indices into ``scene["objects"]``; see ``object_patches``)."""
    out = np.zeros(grid * grid, dtype=bool)
    for i in focus:
        out |= object_patches(scene["objects"][i], grid)
    return out


def all_texts(seed: int = 0, n_per_task: int = 500, tasks: Sequence[str] = TASK_FLAVORS) -> Iterator[str]:
    """Texts of the ``train`` splits of some flavors (first ``n_per_task`` samples each, the same texts as
    ``generate`` gives): a tokenizer corpus. No image is rendered."""
    for task in tasks:
        generate(task, "train", n_per_task, seed=seed)  # checks the arguments
        for sample in _stream(task, "train", n_per_task, seed, 0, 0):
            yield from sample.texts


# ---------------------------------------------------------------- scenes

@dataclass
class _Context:
    task: str
    split: str
    seed: int
    index: int
    image_size: int
    blocks: dict[int, list[str]]

    def __post_init__(self) -> None:
        # the sample's one random stream: scene and texts first, then (only) the pixels, so scenes and texts do not
        # depend on image_size
        self.rng = np.random.default_rng([self.seed, _TASK_IDS[self.task], _SPLIT_IDS[self.split], self.index])

    @property
    def key(self) -> str:
        return f"shapes-{self.task}-{self.split}-{self.index:07d}"

    def balanced_label(self, labels: Sequence[str]) -> str:
        """The label of this sample: a random permutation of ``labels`` per block of ``len(labels)`` samples."""
        block = self.index // len(labels)
        if block not in self.blocks:
            self.blocks.clear()
            rng = np.random.default_rng([self.seed, _TASK_IDS[self.task], _SPLIT_IDS[self.split], block, 2**32])
            self.blocks[block] = [labels[i] for i in rng.permutation(len(labels))]
        return self.blocks[block][self.index % len(labels)]


def _pick(rng: np.random.Generator, options: Sequence[Any], weights: Sequence[float] | None = None) -> Any:
    if weights is None:
        return options[int(rng.random() * len(options))]
    p = np.asarray(weights, dtype=np.float64)
    return options[int(rng.choice(len(options), p=p / p.sum()))]


def _random_object(rng: np.random.Generator, props: Props | None = None) -> Props:
    """A full attribute set: ``props`` plus random values for the other attributes."""
    props = props or {}
    return {a: props[a] if a in props else _pick(rng, _VALUES[a]) for a in ATTRIBUTES}


def _matches(obj: Props, props: Props) -> bool:
    return all(obj[a] == v for a, v in props.items())


def _near_miss(rng: np.random.Generator, props: Props) -> Props:
    """An object that matches ``props`` except for one of its attributes (so it does not match)."""
    attr = _pick(rng, [a for a in ATTRIBUTES if a in props])
    other = _pick(rng, [v for v in _VALUES[attr] if v != props[attr]])
    return _random_object(rng, {**props, attr: other})


def _random_props(rng: np.random.Generator, exclude: Sequence[str] = ()) -> Props:
    """A random description (one to three attributes, none of ``exclude``)."""
    forms = [f for f in _DESC_FORMS if not set(f) & set(exclude)]
    form = _pick(rng, forms, [_DESC_WEIGHTS[len(f)] for f in forms])
    return {a: _pick(rng, _VALUES[a]) for a in form}


def _describe_object(rng: np.random.Generator, obj: Props, exclude: Sequence[str] = (),
                     avoid: Sequence[Props] = ()) -> Props:
    """A description of ``obj`` (a subset of its attributes, none of ``exclude``) matching no object of
    ``avoid``; falls back to the fullest allowed description."""
    forms = [f for f in _DESC_FORMS if not set(f) & set(exclude)]
    for i in rng.permutation(len(forms)):
        props = {a: obj[a] for a in forms[i]}
        if not any(_matches(o, props) for o in avoid):
            return props
    return {a: obj[a] for a in max(forms, key=len)}


def _fill(rng: np.random.Generator, n: int, forbid: Sequence[Props]) -> list[Props]:
    """``n`` random objects matching none of ``forbid`` (which must leave some object possible)."""
    out = []
    for _ in range(n):
        for _ in range(10):
            obj = _random_object(rng)
            if not any(_matches(obj, f) for f in forbid):
                out.append(obj)
                break
        else:  # the forbidden descriptions cover most objects: draw from the allowed ones
            allowed = _allowed(forbid)
            if not allowed:
                raise ValueError(f"no object matches none of {forbid}")
            out.append(_pick(rng, allowed))
    return out


def _allowed(forbid: Sequence[Props]) -> list[Props]:
    """Every attribute combination that matches none of ``forbid``."""
    return [o for o in _COMBOS if not any(_matches(o, f) for f in forbid)]


_COMBOS: tuple[Props, ...] = tuple(dict(zip(ATTRIBUTES, v, strict=True)) for v in product(SIZES, COLORS, SHAPES))


def _place(rng: np.random.Generator, radii: Sequence[float]) -> list[tuple[float, float]]:
    """Centers (x, y in [0, 1], rounded to 3 decimals) of non-overlapping bounding circles of ``radii`` inside the
    image (at least ``_GAP`` apart); starts over in the rare case that no room is left for an object."""
    order = sorted(range(len(radii)), key=lambda i: -radii[i])  # large ones first
    while True:
        pos: list[tuple[float, float]] = [(0.0, 0.0)] * len(radii)
        placed: list[tuple[float, float, float]] = []
        for i in order:
            r = radii[i]
            lo, span = r + _BORDER, 1.0 - 2 * (r + _BORDER)
            spot = None
            for _ in range(4):
                for x, y in np.round(rng.random((16, 2)) * span + lo, 3).tolist():
                    if all((x - px) ** 2 + (y - py) ** 2 >= (r + pr + _GAP) ** 2 for px, py, pr in placed):
                        spot = (x, y)
                        break
                if spot is not None:
                    break
            if spot is None:
                break  # no room left: start again
            pos[i] = spot
            placed.append((*spot, r))
        if len(placed) == len(radii):
            return pos


def _background(rng: np.random.Generator) -> dict[str, Any]:
    """A random background: kind (solid, gradient, noise), tone (dark, light) and its parameters."""
    kind = _pick(rng, ("solid", "gradient", "noise"))
    tone = _pick(rng, ("dark", "light"))
    low, high = (0.08, 0.35) if tone == "dark" else (0.62, 0.88)

    def color() -> list[int]:
        gray = rng.uniform(low, high)
        return [int(round(255 * min(1.0, max(0.0, gray + t)))) for t in rng.uniform(-0.06, 0.06, 3)]

    bg: dict[str, Any] = {"kind": kind, "tone": tone, "color": color()}
    if kind == "gradient":
        bg["color2"] = color()
        bg["angle"] = round(float(rng.uniform(0, 360)), 1)
    elif kind == "noise":
        bg["noise"] = round(float(rng.uniform(0.03, 0.06)), 3)
    return bg


def _scene(rng: np.random.Generator, planted: Sequence[Props], forbid: Sequence[Props] = (),
           occluder: bool = False, n_objects: int | None = None) -> dict[str, Any]:
    """A scene holding the ``planted`` objects plus random others that match none of ``forbid`` (all in random
    order, ``n_objects`` in all, default random), at random positions; and an occluder box if asked."""
    lo = max(MIN_OBJECTS, len(planted))
    n = int(rng.integers(lo, MAX_OBJECTS + 1)) if n_objects is None else n_objects
    objs = [dict(o) for o in planted] + _fill(rng, n - len(planted), forbid)
    objs = [objs[i] for i in rng.permutation(len(objs))]
    radii = [SIZE_RADIUS[o["size"]] for o in objs] + ([OCCLUDER_HALF * 2**0.5] if occluder else [])
    pos = _place(rng, radii)
    objects = [{**o, "x": p[0], "y": p[1], "r": SIZE_RADIUS[o["size"]]} for o, p in zip(objs, pos, strict=False)]
    return {"background": _background(rng), "objects": objects,
            "occluder": {"x": pos[-1][0], "y": pos[-1][1], "half": OCCLUDER_HALF} if occluder else None}


def _find(scene: dict[str, Any], props: Props) -> list[int]:
    return [i for i, o in enumerate(scene["objects"]) if _matches(o, props)]


def _side(a: dict[str, Any], b: dict[str, Any], rel: str) -> int:
    """+1 if ``a`` is clearly ``rel`` ``b``, -1 if clearly not (the opposite side), 0 if within the margin."""
    axis, sign = RELATIONS[rel]
    d = sign * ((a["x"], a["y"])[axis] - (b["x"], b["y"])[axis])
    return 1 if d >= RELATION_MARGIN else -1 if d <= -RELATION_MARGIN else 0


def _clear_relations(a: dict[str, Any], b: dict[str, Any]) -> list[str]:
    """The relations that clearly hold between ``a`` and ``b`` (``a`` <rel> ``b``)."""
    return [rel for rel in RELATIONS if _side(a, b, rel) == 1]


# ---------------------------------------------------------------- rendering

def _render(scene: dict[str, Any], size: int, rng: np.random.Generator) -> bytes:
    """PNG bytes of ``scene`` at ``size`` x ``size`` pixels (``rng``: pixel noise and color jitter)."""
    bg = scene["background"]
    c0 = np.array(bg["color"], dtype=np.float32)
    if bg["kind"] == "gradient":
        a = np.deg2rad(bg["angle"])
        t = np.linspace(-0.5, 0.5, size, dtype=np.float32)
        ramp = np.cos(a) * t[None, :] + np.sin(a) * t[:, None]  # (size, size), in [-0.71, 0.71]
        ramp = (ramp - ramp.min()) / max(float(ramp.max() - ramp.min()), 1e-6)
        img = c0 + ramp[..., None] * (np.array(bg["color2"], dtype=np.float32) - c0)  # (size, size, 3)
    else:
        img = np.broadcast_to(c0, (size, size, 3)).astype(np.float32)
    if bg["kind"] == "noise":  # Gaussian noise, quantized to 256 levels (a table lookup on random bytes: fast)
        noise = _GAUSS[np.frombuffer(rng.bytes(size * size * 3), dtype=np.uint8)].reshape(size, size, 3)
        img = img + noise * np.float32(255.0 * bg["noise"])
    occ = scene["occluder"]
    if occ is not None:  # a gray box with diagonal hatching and a dark border
        x0, x1 = int(round((occ["x"] - occ["half"]) * size)), int(round((occ["x"] + occ["half"]) * size))
        y0, y1 = int(round((occ["y"] - occ["half"]) * size)), int(round((occ["y"] + occ["half"]) * size))
        yy, xx = np.mgrid[y0:y1, x0:x1]
        hatch = ((xx + yy) // max(1, size // 32)) % 3 == 0
        box = np.where(hatch[..., None], np.float32(95), np.float32(150))
        box = np.broadcast_to(box, (y1 - y0, x1 - x0, 3)).copy()
        box[[0, -1], :], box[:, [0, -1]] = 40, 40
        img[y0:y1, x0:x1] = box
    pil = Image.fromarray(np.clip(np.rint(img), 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(pil)
    jitter = rng.integers(-COLOR_JITTER, COLOR_JITTER + 1, (len(scene["objects"]), 3))
    for obj, jit in zip(scene["objects"], jitter, strict=True):
        fill = tuple(int(min(255, max(0, c + j))) for c, j in zip(COLOR_RGB[obj["color"]], jit, strict=True))
        _draw_shape(draw, obj["shape"], obj["x"] * size, obj["y"] * size, obj["r"] * size, fill)
    return encode_png(np.asarray(pil), level=0 if bg["kind"] == "noise" else 1)  # noise does not compress


def encode_png(image: np.ndarray, level: int = 1) -> bytes:
    """PNG bytes of an (H, W, 3) uint8 RGB image: 8-bit truecolor, every row "Up"-filtered, zlib ``level``.

    Twice as fast as Pillow's encoder on small images, and its bytes do not depend on the Pillow version."""
    if image.dtype != np.uint8 or image.ndim != 3 or image.shape[2] != 3:
        raise ValueError(f"encode_png: need an (H, W, 3) uint8 array, got {image.dtype} {image.shape}")
    h, w, _ = image.shape
    rows = image.reshape(h, w * 3)
    data = np.empty((h, w * 3 + 1), dtype=np.uint8)  # (H, 1 + 3W): filter type byte, then the filtered row
    data[:, 0] = 2  # Up: each byte minus the byte above it (mod 256); the row above the first is zeros
    data[0, 1:] = rows[0]
    np.subtract(rows[1:], rows[:-1], out=data[1:, 1:])

    def chunk(tag: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + tag + body + struct.pack(">I", zlib.crc32(tag + body))

    header = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)  # 8 bits, truecolor, deflate, no interlace
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(data.tobytes(), level))
            + chunk(b"IEND", b""))


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float,
                fill: tuple[int, ...]) -> None:
    """Draw a shape inside the bounding circle of radius ``r`` around (cx, cy) (pixel units)."""
    if shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif shape == "square":
        h = 0.75 * r
        draw.rectangle((cx - h, cy - h, cx + h, cy + h), fill=fill)
    elif shape == "triangle":  # pointing up, centroid at the center
        rt = 1.1 * r
        draw.polygon([(cx, cy - rt), (cx - 0.866 * rt, cy + 0.5 * rt), (cx + 0.866 * rt, cy + 0.5 * rt)], fill=fill)
    elif shape == "cross":  # a plus sign
        arm, half = 0.95 * r, 0.34 * r
        draw.rectangle((cx - arm, cy - half, cx + arm, cy + half), fill=fill)
        draw.rectangle((cx - half, cy - arm, cx + half, cy + arm), fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}")


# ---------------------------------------------------------------- words

def _phrase(rng: np.random.Generator, props: Props, plural: bool = False, noun: str | None = None) -> str:
    """Words for a description: "small red circle", "red objects", "large thing"."""
    words = [props[a] for a in ("size", "color") if a in props]
    if "shape" in props:
        words.append(SHAPE_PLURALS[props["shape"]] if plural else props["shape"])
    else:
        noun = noun or _pick(rng, ("object", "thing"))
        words.append(noun + "s" if plural else noun)
    return " ".join(words)


def _a(phrase: str) -> str:
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


def _counted(rng: np.random.Generator, k: int, props: Props, noun: str | None = None) -> str:
    """ "one red circle", "three objects"."""
    return f"{NUMBER_WORDS[k]} {_phrase(rng, props, k != 1, noun)}"


def _sample(ctx: _Context, scenes: Sequence[dict[str, Any]], texts: Sequence[str], label: str | None = None,
            answers: Sequence[str] = (), **meta: Any) -> Sample:
    images = tuple(_render(s, ctx.image_size, ctx.rng) for s in scenes) if ctx.image_size else ()  # rng: last use
    info: dict[str, Any] = {"task": ctx.task, "split": ctx.split, "seed": ctx.seed, "index": ctx.index, **meta}
    if len(scenes) == 1:
        info["scene"] = scenes[0]
    else:
        info["scenes"] = list(scenes)
    return Sample(key=ctx.key, images=images, texts=tuple(texts), label=label, answers=tuple(answers), meta=info)


# ---------------------------------------------------------------- vqa

_ATTR_TEMPLATES = {
    "color": ("what color is the {d} ?", "what is the color of the {d} ?", "which color does the {d} have ?"),
    "shape": ("what shape is the {d} ?", "what is the shape of the {d} ?", "which shape does the {d} have ?"),
    "size": ("what size is the {d} ?", "how big is the {d} ?", "is the {d} small or large ?"),
}
_COUNT_TEMPLATES = ("how many {p} are there ?", "how many {p} are in the image ?", "what number of {p} can you see ?")
_EXISTS_TEMPLATES = ("is there {ad} ?", "are there any {p} ?", "does the image contain {ad} ?")
_RELATION_TEMPLATES = ("is the {a} {rel} the {b} ?", "is the {a} located {rel} the {b} ?")
_RELATE_QUERY_TEMPLATES = {
    "color": ("what color is the {n} {rel} the {b} ?", "which color has the {n} {rel} the {b} ?"),
    "shape": ("what shape is {rel} the {b} ?", "what shape is the {n} {rel} the {b} ?"),
}
_ANSWER_GROUPS: tuple[tuple[str, ...], ...] = (COLORS, SHAPES, SIZES, ("yes", "no"))


def _annotate(rng: np.random.Generator, answer: str) -> list[str]:
    """10 annotator answers: each wrong with probability ``ANNOTATOR_NOISE`` (at most 3 wrong), a wrong answer
    being another answer of the same kind (a count off by one)."""
    wrong = rng.random(ANNOTATORS) < ANNOTATOR_NOISE
    wrong[np.flatnonzero(wrong)[MAX_WRONG_ANNOTATORS:]] = False
    out = []
    for w in wrong:
        if not w:
            out.append(answer)
        elif answer.isdigit():
            k = int(answer)
            out.append(str(k + 1 if k == 0 or (k < MAX_OBJECTS and rng.random() < 0.5) else k - 1))
        else:
            group = next(g for g in _ANSWER_GROUPS if answer in g)
            out.append(_pick(rng, [a for a in group if a != answer]))
    return out


def _vqa(ctx: _Context) -> Sample:
    rng = ctx.rng
    qtype = _pick(rng, VQA_QUESTION_TYPES, [VQA_TYPE_WEIGHTS[t] for t in VQA_QUESTION_TYPES])
    program: dict[str, Any] = {"type": qtype}
    if qtype == "attribute":
        query = _pick(rng, ATTRIBUTES)
        target = _random_object(rng)
        props = _describe_object(rng, target, exclude=(query,))
        planted = [target]
        if rng.random() < 0.5:  # a distractor sharing all but one of the description's attributes
            planted.append(_near_miss(rng, props))
        scene = _scene(rng, planted, forbid=[props])
        question = _pick(rng, _ATTR_TEMPLATES[query]).format(d=_phrase(rng, props))
        focus = _find(scene, props)
        answer = target[query]
        program.update(query=query, filter=props)
    elif qtype == "count":
        if rng.random() < 0.1:  # all objects
            props, k = {}, int(rng.integers(MIN_OBJECTS, MAX_OBJECTS + 1))
            scene = _scene(rng, _fill(rng, k, []), n_objects=k)
        else:
            props, k = _random_props(rng), int(rng.integers(0, MAX_OBJECTS))
            scene = _scene(rng, [_random_object(rng, props) for _ in range(k)], forbid=[props])
        question = _pick(rng, _COUNT_TEMPLATES).format(p=_phrase(rng, props, plural=True))
        focus = _find(scene, props)
        answer = str(k)
        program.update(filter=props)
    elif qtype == "exists":
        props = _random_props(rng)
        yes = bool(rng.random() < 0.5)
        if yes:
            planted = [_random_object(rng, props) for _ in range(int(rng.integers(1, 3)))]
        else:
            planted = [_near_miss(rng, props)] if rng.random() < 0.5 else []
        scene = _scene(rng, planted, forbid=[props])
        template = _pick(rng, _EXISTS_TEMPLATES)
        noun = _pick(rng, ("object", "thing"))
        question = template.format(ad=_a(_phrase(rng, props, noun=noun)), p=_phrase(rng, props, True, noun))
        focus = _find(scene, props)
        answer = "yes" if yes else "no"
        program.update(filter=props)
    elif qtype == "relation":
        scene, ia, ib, pa, pb = _related_pair(rng)
        a, b = scene["objects"][ia], scene["objects"][ib]
        true_rel = _pick(rng, _clear_relations(a, b))
        yes = bool(rng.random() < 0.5)
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        rel = true_rel if yes else opposite[true_rel]
        question = _pick(rng, _RELATION_TEMPLATES).format(a=_phrase(rng, pa), rel=rel, b=_phrase(rng, pb))
        focus, answer = [ia, ib], "yes" if yes else "no"
        program.update(a=pa, b=pb, relation=rel)
    else:  # relate_query
        query = _pick(rng, ("color", "shape"))
        while True:
            ref = _random_object(rng)
            pb = _describe_object(rng, ref)
            scene = _scene(rng, [ref], forbid=[pb])
            ib = _find(scene, pb)[0]
            options = _unique_neighbors(scene, ib)
            if options:
                break
        rel, it = _pick(rng, options)
        noun = _pick(rng, ("object", "thing"))
        question = _pick(rng, _RELATE_QUERY_TEMPLATES[query]).format(n=noun, rel=rel, b=_phrase(rng, pb))
        focus, answer = [it, ib], scene["objects"][it][query]
        program.update(query=query, b=pb, relation=rel)
    program["answer"] = answer
    answers = _annotate(rng, answer)
    return _sample(ctx, [scene], [question], answers=answers, question_id=ctx.index, image_id=ctx.index,
                   qtype=qtype, answer=answer, program=program, focus=focus)


def _related_pair(rng: np.random.Generator, min_objects: int = MIN_OBJECTS,
                  max_objects: int = MAX_OBJECTS) -> tuple[dict[str, Any], int, int, Props, Props]:
    """A scene with two uniquely described objects a, b in a clear spatial relation: (scene, ia, ib, pa, pb)."""
    while True:
        a = _random_object(rng)
        b = _random_object(rng)
        pa = _describe_object(rng, a, avoid=[b])
        pb = _describe_object(rng, b, avoid=[a])
        if _matches(a, pb) or _matches(b, pa) or not _allowed([pa, pb]):
            continue  # identical objects (no unique descriptions), or no room for other objects
        scene = _scene(rng, [a, b], forbid=[pa, pb], n_objects=int(rng.integers(min_objects, max_objects + 1)))
        ia, ib = _find(scene, pa)[0], _find(scene, pb)[0]
        if _clear_relations(scene["objects"][ia], scene["objects"][ib]):
            return scene, ia, ib, pa, pb


def _unique_neighbors(scene: dict[str, Any], ib: int) -> list[tuple[str, int]]:
    """(relation, object index) for each relation that exactly one other object clearly has to object ``ib``
    while every other object is clearly on the opposite side."""
    objs = scene["objects"]
    out = []
    for rel in RELATIONS:
        sides = [(_side(o, objs[ib], rel), i) for i, o in enumerate(objs) if i != ib]
        hits = [i for s, i in sides if s == 1]
        if len(hits) == 1 and all(s == -1 for s, i in sides if i != hits[0]):
            out.append((rel, hits[0]))
    return out


# ---------------------------------------------------------------- nlvr2

_NLVR2_TEXT = {
    "more_left": ("the left image contains more {P} than the right image",
                  "there are more {P} in the left image than in the right image"),
    "more_right": ("the right image contains more {P} than the left image",
                   "there are more {P} in the right image than in the left image"),
    "both": ("both images contain {ap}", "each image contains at least one {p}"),
    "exactly_one": ("exactly one image contains {ap}", "only one of the two images contains {ap}"),
    "neither": ("neither image contains {ap}", "there is no {p} in either image"),
    "same": ("the two images contain the same number of {P}", "both images have the same number of {P}"),
    "exact_left": ("the left image contains exactly {k}", "there {be} exactly {k} in the left image"),
    "exact_right": ("the right image contains exactly {k}", "there {be} exactly {k} in the right image"),
    "total": ("there {be} exactly {k} in the two images", "the two images contain {k} in total"),
}
_NLVR2_MAX = 3  # most matching objects planted per image


def nlvr2_truth(template: str, n_left: int, n_right: int, k: int = 0) -> bool:
    """Whether an nlvr2 statement holds, given how many objects of each image match its description."""
    rules = {"more_left": n_left > n_right, "more_right": n_right > n_left, "both": n_left >= 1 and n_right >= 1,
             "exactly_one": (n_left >= 1) != (n_right >= 1), "neither": n_left == 0 and n_right == 0,
             "same": n_left == n_right, "exact_left": n_left == k, "exact_right": n_right == k,
             "total": n_left + n_right == k}
    return rules[template]


def _nlvr2(ctx: _Context) -> Sample:
    rng = ctx.rng
    label = ctx.balanced_label(NLVR2_LABELS)
    template = _pick(rng, NLVR2_TEMPLATES)
    props = _random_props(rng)
    k = int(rng.integers(1, 5 if template == "total" else _NLVR2_MAX + 1))
    pairs = [(i, j) for i in range(_NLVR2_MAX + 1) for j in range(_NLVR2_MAX + 1)
             if nlvr2_truth(template, i, j, k) == (label == "True")]
    n_left, n_right = _pick(rng, pairs)
    scenes = [_scene(rng, [_random_object(rng, props) for _ in range(m)], forbid=[props]) for m in (n_left, n_right)]
    noun = _pick(rng, ("object", "thing"))
    statement = _pick(rng, _NLVR2_TEXT[template]).format(
        P=_phrase(rng, props, True, noun), p=_phrase(rng, props, False, noun),
        ap=_a(_phrase(rng, props, False, noun)), k=_counted(rng, k, props, noun), be="is" if k == 1 else "are")
    statement_meta = {"template": template, "filter": props, "k": k, "counts": [n_left, n_right]}
    return _sample(ctx, scenes, [statement], label=label, identifier=f"{ctx.split}-{ctx.index}",
                   statement=statement_meta, focus=[_find(s, props) for s in scenes])


# ---------------------------------------------------------------- snli_ve

_SNLI_TEXT = {
    "exists": ("there is {ad}", "the image shows {ad}", "{ad} can be seen"),
    "not_exists": ("there is no {d}", "the image shows no {P}", "no {d} can be seen"),
    "count_exact": ("there {be} exactly {k}", "the image shows exactly {k}"),
    "count_at_least": ("there {be} at least {k}", "the image shows at least {k}"),
    "relation": ("the {a} is {rel} the {b}", "the {a} sits {rel} the {b}"),
}


def snli_ve_label(family: str, occluder: bool, visible: int = 0, k: int = 0, both_visible: bool = True,
                  relation_holds: bool = False) -> str:
    """The label of an snli_ve hypothesis, given the scene: whether it has an occluder, how many visible objects
    match the description (``visible``; count families compare it with ``k``), and for ``relation`` whether both
    objects are visible and the relation holds between them. What the occluder may hide makes ``neutral``."""
    if family == "exists":
        return "entailment" if visible >= 1 else "neutral" if occluder else "contradiction"
    if family == "not_exists":
        return "contradiction" if visible >= 1 else "neutral" if occluder else "entailment"
    if family == "count_exact":
        if visible > k:
            return "contradiction"
        if occluder:
            return "neutral"
        return "entailment" if visible == k else "contradiction"
    if family == "count_at_least":
        return "entailment" if visible >= k else "neutral" if occluder else "contradiction"
    if family == "relation":
        if both_visible:
            return "entailment" if relation_holds else "contradiction"
        return "neutral" if occluder else "contradiction"
    raise ValueError(f"family={family!r}: must be one of {SNLI_VE_FAMILIES}")


_BOX_WEIGHT = 4.0
"""How much likelier a scene state with the occluder box is than one without, among the states that give the
label: a neutral needs the box, so without this weight 'box => neutral' would be a strong image-only shortcut."""


def _snli_ve(ctx: _Context) -> Sample:
    rng = ctx.rng
    label = ctx.balanced_label(SNLI_VE_LABELS)
    family = _pick(rng, SNLI_VE_FAMILIES, _SNLI_VE_WEIGHTS)
    noun = _pick(rng, ("object", "thing"))
    if family != "relation":
        props = _random_props(rng)
        k = int(rng.integers(1, 4)) if family.startswith("count") else 1
        states = [(v, occ) for v in range(4) for occ in (False, True)
                  if snli_ve_label(family, occ, v, k) == label]
        visible, occ = _pick(rng, states, [_BOX_WEIGHT if o else 1.0 for _, o in states])
        planted = [_random_object(rng, props) for _ in range(visible)]
        if visible == 0 and rng.random() < 0.5:
            planted.append(_near_miss(rng, props))
        scene = _scene(rng, planted, forbid=[props], occluder=occ)
        hyp = _pick(rng, _SNLI_TEXT[family]).format(
            ad=_a(_phrase(rng, props, False, noun)), d=_phrase(rng, props, False, noun),
            P=_phrase(rng, props, True, noun), k=_counted(rng, k, props, noun), be="is" if k == 1 else "are")
        program: dict[str, Any] = {"family": family, "filter": props, "k": k, "visible": visible}
        focus = _find(scene, props)
    else:
        states = [(both, holds, occ) for both in (True, False) for holds in (True, False) for occ in (False, True)
                  if (both or not holds)
                  and snli_ve_label(family, occ, both_visible=both, relation_holds=holds) == label]
        both, holds, occ = _pick(rng, states, [_BOX_WEIGHT if o else 1.0 for *_, o in states])
        while True:  # one object more when one is to be removed; one less when a box needs room
            scene, ia, ib, pa, pb = _related_pair(rng, MIN_OBJECTS + (not both), MAX_OBJECTS - occ)
            box = _free_spot(rng, scene) if occ else None
            if box is not None or not occ:
                break
        scene["occluder"] = box
        a, b = scene["objects"][ia], scene["objects"][ib]
        true_rel = _pick(rng, _clear_relations(a, b))
        opposite = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
        rel = true_rel if holds or not both else opposite[true_rel]
        if not both:  # remove a or b; keep the other objects where they are
            gone = _pick(rng, (ia, ib))
            scene["objects"] = [o for i, o in enumerate(scene["objects"]) if i != gone]
        hyp = _pick(rng, _SNLI_TEXT[family]).format(a=_phrase(rng, pa, False, noun), rel=rel,
                                                     b=_phrase(rng, pb, False, noun))
        program = {"family": family, "a": pa, "b": pb, "relation": rel, "both_visible": both}
        focus = sorted(_find(scene, pa) + _find(scene, pb))
    program["occluder"] = occ
    return _sample(ctx, [scene], [hyp], label=label, image_id=ctx.index, hypothesis=program, focus=focus)


def _free_spot(rng: np.random.Generator, scene: dict[str, Any]) -> dict[str, Any] | None:
    """An occluder box in the free space of a scene (its objects stay where they are), or None if none fits."""
    r = OCCLUDER_HALF * 2**0.5
    lo, span = r + _BORDER, 1.0 - 2 * (r + _BORDER)
    for x, y in np.round(rng.random((64, 2)) * span + lo, 3).tolist():
        if all((x - o["x"]) ** 2 + (y - o["y"]) ** 2 >= (r + o["r"] + _GAP) ** 2 for o in scene["objects"]):
            return {"x": x, "y": y, "half": OCCLUDER_HALF}
    return None


# ---------------------------------------------------------------- retrieval / caption

def _captions(rng: np.random.Generator, scene: dict[str, Any]) -> list[str]:
    """3-5 true captions of different kinds, in random order."""
    objs = scene["objects"]
    kinds = [CAPTION_KINDS[i] for i in rng.permutation(len(CAPTION_KINDS))]
    pairs = [(i, j) for i in range(len(objs)) for j in range(len(objs)) if i != j and _clear_relations(objs[i],
                                                                                                         objs[j])]
    if not pairs:
        kinds.remove("relation")
    out = []
    for kind in kinds[: int(rng.integers(3, 6))]:
        if kind == "list":
            chosen = rng.permutation(len(objs))[: int(rng.integers(1, min(3, len(objs)) + 1))]
            items = [_a(_phrase(rng, _full(rng, objs[i]))) for i in chosen]
            listed = items[0] if len(items) == 1 else " , ".join(items[:-1]) + " and " + items[-1]
            out.append(_pick(rng, ("{}", "a picture of {}", "an image with {}")).format(listed))
        elif kind == "overview":
            bg = scene["background"]
            look = {"solid": "plain", "gradient": "shaded", "noise": "noisy"}[bg["kind"]]
            things = "object" if len(objs) == 1 else "objects"
            out.append(f"{NUMBER_WORDS[len(objs)]} {things} on a {bg['tone']} {look} background")
        elif kind in ("color_counts", "shape_counts"):
            attr = "color" if kind == "color_counts" else "shape"
            counts = Counter(o[attr] for o in objs)
            values = [v for v in _VALUES[attr] if v in counts]
            chosen = [values[i] for i in sorted(rng.permutation(len(values))[: int(rng.integers(1, 3))])]
            parts = [_counted(rng, counts[v], {attr: v}) for v in chosen]
            out.append(" and ".join(parts))
        else:
            i, j = _pick(rng, pairs)
            rel = _pick(rng, _clear_relations(objs[i], objs[j]))
            out.append(f"{_a(_phrase(rng, _full(rng, objs[i])))} {rel} {_a(_phrase(rng, _full(rng, objs[j])))}")
    return out


def _full(rng: np.random.Generator, obj: dict[str, Any]) -> Props:
    """Color and shape of an object, and its size half of the time."""
    attrs = ("size", "color", "shape") if rng.random() < 0.5 else ("color", "shape")
    return {a: obj[a] for a in attrs}


SINGLE_OBJECT_SCENES = 0.5
"""``retrieval`` / ``caption``: share of scenes with a single object, whose captions name what it is. They give
pre-training words that can only come from the image without first finding one object among others: a ViT
trained from scratch learns shapes from them long before it can from relations between several objects."""


def _captioned(ctx: _Context) -> Sample:
    rng = ctx.rng
    scene = _scene(rng, [], n_objects=1 if rng.random() < SINGLE_OBJECT_SCENES else None)
    captions = _captions(rng, scene)
    return _sample(ctx, [scene], captions, image_id=ctx.index)


_MAKERS = {"vqa": _vqa, "nlvr2": _nlvr2, "snli_ve": _snli_ve, "retrieval": _captioned, "caption": _captioned}


__all__ = ["ANNOTATORS", "ATTRIBUTES", "COLORS", "COLOR_RGB", "DEFAULT_SIZES", "MAX_OBJECTS", "MIN_OBJECTS",
           "NLVR2_TEMPLATES", "RELATIONS", "RELATION_MARGIN", "SHAPES", "SHAPES_SPLITS", "SIZES", "SIZE_RADIUS",
           "SNLI_VE_FAMILIES", "VQA_ANSWERS", "VQA_QUESTION_TYPES", "VQA_TYPE_WEIGHTS", "GENERATOR_VERSION",
           "FOCUS_COVERAGE", "OBJECT_LABELS", "MajorityBaseline", "all_texts", "focus_patches", "object_labels",
           "object_patches",
           "answer_vocabulary", "encode_png", "generate", "generate_splits", "majority_baseline", "nlvr2_truth",
           "snli_ve_label", "vqa_score"]
