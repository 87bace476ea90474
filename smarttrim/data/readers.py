"""Readers for the official formats of the fine-tuning data sets.

Each reader ``read_<source>(root, split)`` returns an iterator over one split of a data set laid out as
its publishers distribute it, yielding a ``Sample`` per example and a ``BadRecord`` per record that cannot be
read (malformed JSON line, missing or mistyped field, empty text, label outside the allowed set, missing image
file, duplicate id), then going on with the next record; the shard stage decides whether to fail or skip.
Problems with a whole file (missing, not JSON, not the expected structure) raise ``DataError`` naming the file,
when the reader is called (before the first record is asked for). Image files are not opened: ``Sample.images``
holds their paths, and a missing one is a ``BadRecord`` with field ``"image"`` naming the expected path.

``DataError.record`` is the record's own id (question_id, identifier, pairID, imgid; nocaps: ``"image <id>"``,
``"annotation <id>"``) when it has a usable one, else its position: ``"line N"`` (1-based) in a JSON-lines file,
the 0-based index in a JSON list. ``DataError.file`` is the annotation file the record comes from.

Keys are unique within a data set (they start with the split, except NLVR2 identifiers, which already do) and
contain only letters, digits, ``_`` and ``-``: other characters of a source id become ``_``; a key met twice
in a split is a ``BadRecord``.

Sources (``READERS``):

=====================  ======================================================================================
``vqa_v2``             ``v2_OpenEnded_mscoco_<split>_questions.json`` + ``v2_mscoco_<split>_annotations.json``
                       (none for test splits); images ``<image_dir>/COCO_<image_dir>_<image_id:012d>.jpg``
``nlvr2``              ``<split>.json`` (JSON lines); images ``images/<split>/[<dir>/]<pair>-img{0,1}.png``
``snli_ve``            ``snli_ve_<split>.jsonl``; images ``flickr30k_images/<Flickr30K_ID>.jpg``
``karpathy_flickr30k`` ``dataset_flickr30k.json``; images ``flickr30k-images/<filename>``
``karpathy_coco``      ``dataset_coco.json``; images ``<filepath>/<filename>``
``nocaps``             ``nocaps_val_4500_captions.json``; images ``validation/<file_name>``
=====================  ======================================================================================
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

from smarttrim.data.records import NLVR2_LABELS, SNLI_VE_LABELS, BadRecord, DataError, Sample
from smarttrim.data.vqa_normalize import answer_vocabulary, normalize_answer, vqa_soft_score, vqa_soft_scores

__all__ = ["KARPATHY_SPLITS", "READERS", "Reader", "answer_vocabulary", "normalize_answer", "read_karpathy_coco",
           "read_karpathy_flickr30k", "read_nlvr2", "read_nocaps", "read_snli_ve", "read_vqa_v2", "splits_of",
           "vqa_image_dir", "vqa_soft_score", "vqa_soft_scores"]

Reader = Callable[..., Iterator[Sample | BadRecord]]

KARPATHY_SPLITS: tuple[str, ...] = ("train", "val", "test")
"""The splits of the Karpathy files as read here; their ``restval`` images are part of ``train``."""

NLVR2_SPLITS: tuple[str, ...] = ("train", "dev", "test1", "test2")

_SPLIT_NAME = re.compile(r"[A-Za-z0-9_-]+")
_NOT_KEY_CHAR = re.compile(r"[^A-Za-z0-9_-]")


# ------------------------------------------------------------------------------------------------- helpers


def _check_split(split: str) -> str:
    if not isinstance(split, str) or not _SPLIT_NAME.fullmatch(split):
        raise ValueError(f"split must be a non-empty name of letters, digits, '_' and '-', got {split!r}")
    return split


def _key_part(value: object) -> str:
    """A source id as a key part: characters other than letters, digits, '_' and '-' become '_'."""
    return _NOT_KEY_CHAR.sub("_", str(value))


def _existing_file(path: Path, what: str) -> Path:
    if not path.is_file():
        raise DataError(path, f"{what} not found" + (" (it is a directory)" if path.is_dir() else ""))
    return path


def _load_json(path: Path, what: str) -> Any:
    """The content of a whole JSON file; DataError naming the path when missing or not valid JSON."""
    _existing_file(path, what)
    try:
        with path.open("rb") as f:
            return json.load(f)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise DataError(path, f"{what} is not valid JSON: {e}") from None


def _json_list(content: Any, path: Path, name: str) -> list[Any]:
    """``content[name]``, which must be a list (whole-file structure: DataError when not)."""
    if not isinstance(content, dict) or not isinstance(content.get(name), list):
        raise DataError(path, f"expected a JSON object with a list {name!r}")
    return content[name]


def _jsonl(path: Path) -> Iterator[tuple[int, Any]]:
    """(line number, parsed value or the DataError of a malformed line) for each non-blank line."""
    with path.open("rb") as f:
        for number, raw in enumerate(f, start=1):
            if not raw.strip():
                continue
            try:
                yield number, json.loads(raw)
            except (json.JSONDecodeError, UnicodeDecodeError) as e:
                yield number, DataError(path, f"malformed JSON line: {e}", record=f"line {number}")


class _Record:
    """Typed field access on one JSON record; every failure is a DataError naming file, record and field."""

    def __init__(self, value: Any, file: Path, record: str | int) -> None:
        self.file, self.record = file, record
        if not isinstance(value, dict):
            raise self.error(f"expected a JSON object, got {type(value).__name__}")
        self.value: dict[str, Any] = value

    def error(self, reason: str, field: str | None = None) -> DataError:
        return DataError(self.file, reason, record=self.record, field=field)

    def get(self, name: str) -> Any:
        if name not in self.value or self.value[name] is None:
            raise self.error("missing", name)
        return self.value[name]

    def text(self, name: str) -> str:
        """A non-empty string, stripped."""
        value = self.get(name)
        if not isinstance(value, str):
            raise self.error(f"expected a string, got {type(value).__name__}", name)
        if not value.strip():
            raise self.error("empty text", name)
        return value.strip()

    def integer(self, name: str) -> int:
        value = self.get(name)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.error(f"expected an integer, got {value!r}", name)
        return value

    def ident(self, name: str) -> int | str:
        """An id: an integer or a non-empty string (stripped)."""
        value = self.get(name)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip():
            return value.strip()
        raise self.error(f"expected an id (integer or non-empty string), got {value!r}", name)

    def file_name(self, name: str) -> str:
        """A file name (no directory part)."""
        value = self.text(name) if not isinstance(self.value.get(name), int) else str(self.value[name])
        if "/" in value or "\\" in value or value in (".", ".."):
            raise self.error(f"expected a file name, got {value!r}", name)
        return value

    def items(self, name: str) -> list[Any]:
        """A non-empty list."""
        value = self.get(name)
        if not isinstance(value, list):
            raise self.error(f"expected a list, got {type(value).__name__}", name)
        if not value:
            raise self.error("empty list", name)
        return value


def _id_of(value: Any, name: str, fallback: str | int) -> str | int:
    """The record's own id for error messages when usable, else its position."""
    if isinstance(value, dict):
        ident = value.get(name)
        if (isinstance(ident, int) and not isinstance(ident, bool)) or (isinstance(ident, str) and ident.strip()):
            return ident.strip() if isinstance(ident, str) else ident
    return fallback


def _image(path: Path, file: Path, record: str | int) -> Path:
    if not path.is_file():
        raise DataError(file, f"image file not found: {path}", record=record, field="image")
    return path


class _Keys:
    """Keys already given in a split; a repeated one is a DataError on the record's id field."""

    def __init__(self) -> None:
        self.seen: set[str] = set()

    def add(self, key: str, rec: _Record, field: str) -> str:
        if key in self.seen:
            raise rec.error(f"duplicate: key {key!r} already used in this split", field)
        self.seen.add(key)
        return key


def _records(items: Iterable[tuple[str | int, Any]], file: Path,
             build: Callable[[_Record], Sample]) -> Iterator[Sample | BadRecord]:
    """Run ``build`` on each (record id, value); a DataError (or a malformed line given as one) becomes a
    BadRecord and the next record is read."""
    for record, value in items:
        if isinstance(value, DataError):
            yield BadRecord(value)
            continue
        try:
            yield build(_Record(value, file, record))
        except DataError as e:
            yield BadRecord(e)


# ------------------------------------------------------------------------------------------------- VQA v2

_VQA_SPLIT = re.compile(r"(train|val|test)(?:-dev|-std|-challenge|dev)?(\d{4})")


def vqa_image_dir(split: str) -> str:
    """The COCO image directory of a VQA split: ``train2014`` -> ``train2014``, ``test-dev2015`` ->
    ``test2015`` (test-dev is a subset of the test2015 images); other names are used as they are."""
    match = _VQA_SPLIT.fullmatch(split)
    return f"{match.group(1)}{match.group(2)}" if match else split


def read_vqa_v2(root: Path, split: str, image_dir: str | None = None,
                annotated: bool | None = None) -> Iterator[Sample | BadRecord]:
    """VQA v2, one ``Sample`` per question, in the order of the questions file.

    Files: ``<root>/v2_OpenEnded_mscoco_<split>_questions.json`` and, unless the split is unannotated,
    ``<root>/v2_mscoco_<split>_annotations.json``; image ``<root>/<image_dir>/COCO_<image_dir>_<id:012d>.jpg``.

    image_dir: the COCO image directory; default ``vqa_image_dir(split)`` (``test-dev2015`` -> ``test2015``).
    annotated: whether the split has an annotations file; default: every split except those starting with
        ``test`` (a missing annotations file of an annotated split is an error, not an unannotated split).

    Sample: key ``<split>-<question_id>``, ``texts=(question,)``, ``answers`` the annotators' answers (10 in
    the official files) normalized by ``normalize_answer`` (empty for an unannotated split), ``label`` None,
    meta ``question_id``, ``image_id`` and, when annotated, ``answer_type``, ``question_type`` and
    ``multiple_choice_answer`` (normalized; the answer METER/ViLT count for ``answer_vocabulary``).

    Bad records: a question or annotation with a missing or mistyped field, an empty question or no answers,
    a question without annotation (field ``"annotation"``), an annotation whose image_id differs from its
    question's, an annotation without question (reported last, on the annotations file), a repeated
    question_id, a missing image file.
    """
    root, split = Path(root), _check_split(split)
    image_dir = image_dir or vqa_image_dir(split)
    if annotated is None:
        annotated = not split.startswith("test")
    questions_file = root / f"v2_OpenEnded_mscoco_{split}_questions.json"
    annotations_file = root / f"v2_mscoco_{split}_annotations.json"
    questions = _json_list(_load_json(questions_file, "VQA questions file"), questions_file, "questions")
    annotations = (_json_list(_load_json(annotations_file, "VQA annotations file"), annotations_file, "annotations")
                   if annotated else None)
    return _vqa_records(root, split, image_dir, questions_file, questions, annotations_file, annotations)


def _vqa_records(root: Path, split: str, image_dir: str, questions_file: Path, questions: list[Any],
                 annotations_file: Path, annotations: list[Any] | None) -> Iterator[Sample | BadRecord]:
    by_question: dict[int, _Record] = {}
    if annotations is not None:
        for index, value in enumerate(annotations):
            try:
                rec = _Record(value, annotations_file, _id_of(value, "question_id", index))
                question_id = rec.integer("question_id")
                if question_id in by_question:
                    raise rec.error("duplicate annotation for this question", "question_id")
                by_question[question_id] = rec
            except DataError as e:
                yield BadRecord(e)

    image_exists: dict[int, bool] = {}
    keys = _Keys()

    def build(q: _Record) -> Sample:
        question_id, image_id = q.integer("question_id"), q.integer("image_id")
        question = q.text("question")
        key = keys.add(f"{split}-{question_id}", q, "question_id")
        meta: dict[str, Any] = {"question_id": question_id, "image_id": image_id}
        answers: tuple[str, ...] = ()
        if annotations is not None:
            a = by_question.get(question_id)
            if a is None:
                raise q.error(f"no annotation for this question in {annotations_file}", "annotation")
            if a.integer("image_id") != image_id:
                raise a.error(f"{a.value['image_id']} differs from the question's image_id {image_id}", "image_id")
            raw = a.items("answers")
            if not all(isinstance(x, dict) and isinstance(x.get("answer"), str) for x in raw):
                raise a.error("expected a list of objects with a string 'answer'", "answers")
            answers = tuple(normalize_answer(x["answer"]) for x in raw)
            for name in ("answer_type", "question_type"):
                if isinstance(a.value.get(name), str):
                    meta[name] = a.value[name]
            if isinstance(a.value.get("multiple_choice_answer"), str):
                meta["multiple_choice_answer"] = normalize_answer(a.value["multiple_choice_answer"])
        path = root / image_dir / f"COCO_{image_dir}_{image_id:012d}.jpg"
        if image_id not in image_exists:
            image_exists[image_id] = path.is_file()
        if not image_exists[image_id]:
            raise q.error(f"image file not found: {path}", "image")
        return Sample(key=key, images=(path,), texts=(question,), answers=answers, meta=meta)

    yield from _records(((_id_of(v, "question_id", i), v) for i, v in enumerate(questions)), questions_file, build)
    asked = {v["question_id"] for v in questions if isinstance(v, dict) and isinstance(v.get("question_id"), int)}
    for question_id, a in by_question.items():
        if question_id not in asked:
            yield BadRecord(a.error(f"no question with this id in {questions_file}", "question_id"))


# ------------------------------------------------------------------------------------------------- NLVR2

_NLVR2_IDENTIFIER = re.compile(r"(.+)-\d+")


def read_nlvr2(root: Path, split: str) -> Iterator[Sample | BadRecord]:
    """NLVR2, one ``Sample`` per statement, in file order.

    File: ``<root>/<split>.json``, JSON lines (``identifier``, ``sentence``, ``label``; splits ``train``,
    ``dev``, ``test1``). Images: identifier ``<split>-<set>-<pair>-<sentence>`` uses the pair's images
    ``<split>-<set>-<pair>-img0.png`` (left) and ``-img1.png`` (right), looked up under
    ``<root>/images/<split>/``: first in ``<directory>/`` when the record has a ``directory`` field (the
    official train layout spreads its images over numbered subdirectories), then directly, then anywhere
    below (found by a recursive search, made once per call and only when needed).

    Sample: key the identifier (prefixed with ``<split>-`` if it does not start with it), ``images`` (left,
    right), ``texts=(sentence,)``, ``label`` ``"True"`` or ``"False"`` (a JSON boolean is accepted too), meta
    ``identifier`` (and ``directory`` when given).

    Bad records: malformed JSON line, missing or empty identifier/sentence, a label other than True/False
    (field ``"label"``), an identifier not ending in ``-<number>``, a repeated identifier, a missing image.
    """
    root, split = Path(root), _check_split(split)
    file = _existing_file(root / f"{split}.json", "NLVR2 annotation file")
    return _nlvr2_records(root, split, file)


def _nlvr2_records(root: Path, split: str, file: Path) -> Iterator[Sample | BadRecord]:
    image_root = root / "images" / split
    found: dict[str, Path] | None = None  # file name -> path, from one recursive search when first needed
    keys = _Keys()

    def locate(name: str, directory: str | None, rec: _Record) -> Path:
        nonlocal found
        expected = image_root / directory / name if directory is not None else image_root / name
        for candidate in (expected, image_root / name):
            if candidate.is_file():
                return candidate
        if found is None:
            found = {}
            if image_root.is_dir():
                for path in sorted(image_root.rglob("*.png")):
                    found.setdefault(path.name, path)
        if name in found:
            return found[name]
        raise rec.error(f"image file not found: {expected} (nor anywhere below {image_root})", "image")

    def build(rec: _Record) -> Sample:
        identifier = rec.text("identifier")
        match = _NLVR2_IDENTIFIER.fullmatch(identifier)
        if match is None or "/" in identifier or "\\" in identifier:
            raise rec.error(f"expected '<split>-<set>-<pair>-<sentence>', got {identifier!r}", "identifier")
        sentence = rec.text("sentence")
        label = rec.get("label")
        if isinstance(label, bool):
            label = str(label)
        if label not in NLVR2_LABELS:
            raise rec.error(f"expected one of {list(NLVR2_LABELS)}, got {label!r}", "label")
        directory = rec.value.get("directory")
        directory = str(directory) if isinstance(directory, int | str) and str(directory).strip() else None
        pair = match.group(1)
        images = tuple(locate(f"{pair}-img{i}.png", directory, rec) for i in (0, 1))
        ident = _key_part(identifier)
        key = keys.add(ident if ident.startswith(f"{split}-") else f"{split}-{ident}", rec, "identifier")
        meta: dict[str, Any] = {"identifier": identifier}
        if directory is not None:
            meta["directory"] = directory
        return Sample(key=key, images=images, texts=(sentence,), label=label, meta=meta)

    lines = ((_id_of(v, "identifier", f"line {n}"), v) for n, v in _jsonl(file))
    yield from _records(lines, file, build)


# ------------------------------------------------------------------------------------------------- SNLI-VE


def read_snli_ve(root: Path, split: str) -> Iterator[Sample | BadRecord]:
    """SNLI-VE, one ``Sample`` per (image, hypothesis) pair, in file order.

    File: ``<root>/snli_ve_<split>.jsonl`` (splits ``train``, ``dev``, ``test``), JSON lines with
    ``Flickr30K_ID``, ``sentence2`` (the hypothesis), ``gold_label``, ``pairID``; image
    ``<root>/flickr30k_images/<Flickr30K_ID>.jpg``.

    Sample: key ``<split>-<pairID>`` (``3416050480.jpg#4r1n`` -> ``3416050480_jpg_4r1n``), ``texts=(hypothesis,)``,
    ``label`` one of ``SNLI_VE_LABELS``, meta ``pairID``, ``flickr30k_id`` (and ``captionID`` when given).

    Bad records: malformed JSON line, missing field, empty hypothesis, a gold_label outside
    entailment/neutral/contradiction (field ``"gold_label"``; SNLI's ``"-"``, no consensus, included), a
    repeated pairID, a missing image.
    """
    root, split = Path(root), _check_split(split)
    file = _existing_file(root / f"snli_ve_{split}.jsonl", "SNLI-VE annotation file")
    return _snli_ve_records(root, split, file)


def _snli_ve_records(root: Path, split: str, file: Path) -> Iterator[Sample | BadRecord]:
    keys = _Keys()

    def build(rec: _Record) -> Sample:
        pair_id = str(rec.ident("pairID"))
        image_id = rec.file_name("Flickr30K_ID")
        hypothesis = rec.text("sentence2")
        label = rec.get("gold_label")
        if label not in SNLI_VE_LABELS:
            raise rec.error(f"expected one of {list(SNLI_VE_LABELS)}, got {label!r}", "gold_label")
        image = _image(root / "flickr30k_images" / f"{image_id}.jpg", rec.file, rec.record)
        key = keys.add(f"{split}-{_key_part(pair_id)}", rec, "pairID")
        meta: dict[str, Any] = {"pairID": pair_id, "flickr30k_id": image_id}
        if isinstance(rec.value.get("captionID"), str):
            meta["captionID"] = rec.value["captionID"]
        return Sample(key=key, images=(image,), texts=(hypothesis,), label=label, meta=meta)

    lines = ((_id_of(v, "pairID", f"line {n}"), v) for n, v in _jsonl(file))
    yield from _records(lines, file, build)


# ------------------------------------------------------------------------------------------------- Karpathy


def _read_karpathy(root: Path, split: str, file_name: str, coco: bool) -> Iterator[Sample | BadRecord]:
    root, split = Path(root), _check_split(split)
    if split not in KARPATHY_SPLITS:
        raise ValueError(f"Karpathy splits are {list(KARPATHY_SPLITS)} (restval is part of train), got {split!r}")
    file = root / file_name
    images = _json_list(_load_json(file, "Karpathy split file"), file, "images")
    return _karpathy_records(root, split, file, images, coco)


def _karpathy_records(root: Path, split: str, file: Path, images: list[Any],
                      coco: bool) -> Iterator[Sample | BadRecord]:
    wanted = {"train": ("train", "restval")}.get(split, (split,))
    known = ("train", "restval", "val", "test")
    keys = _Keys()

    def build(rec: _Record) -> Sample | None:
        own_split = rec.get("split")
        if own_split not in known:
            # cannot tell which split the record belongs to: reported in every split read
            raise rec.error(f"expected one of {list(known)}, got {own_split!r}", "split")
        if own_split not in wanted:
            return None
        imgid = rec.integer("imgid")
        filename = rec.file_name("filename")
        sentences = rec.items("sentences")
        captions = []
        for i, sentence in enumerate(sentences):
            raw = sentence.get("raw") if isinstance(sentence, dict) else None
            if not isinstance(raw, str):
                raise rec.error(f"sentence {i}: expected an object with a string 'raw'", "sentences")
            if not raw.strip():
                raise rec.error(f"sentence {i}: empty text", "sentences")
            captions.append(raw.strip())
        meta: dict[str, Any] = {"imgid": imgid, "filename": filename, "split": own_split}
        if coco:
            filepath = rec.text("filepath")
            if "\\" in filepath or ".." in Path(filepath).parts or Path(filepath).is_absolute():
                raise rec.error(f"expected a directory below the root, got {filepath!r}", "filepath")
            image = root / filepath / filename
            if isinstance(rec.value.get("cocoid"), int):
                meta["cocoid"] = rec.value["cocoid"]
        else:
            image = root / "flickr30k-images" / filename
        _image(image, rec.file, rec.record)
        key = keys.add(f"{split}-{imgid}", rec, "imgid")
        return Sample(key=key, images=(image,), texts=tuple(captions), meta=meta)

    for index, value in enumerate(images):
        try:
            sample = build(_Record(value, file, _id_of(value, "imgid", index)))
        except DataError as e:
            # the split is checked first: a record of another split is reported when that split is read
            yield BadRecord(e)
            continue
        if sample is not None:
            yield sample


def read_karpathy_flickr30k(root: Path, split: str) -> Iterator[Sample | BadRecord]:
    """Flickr30K with the Karpathy splits, one ``Sample`` per image with all its captions, in file order.

    File: ``<root>/dataset_flickr30k.json`` (``{"images": [{"filename", "imgid", "split", "sentences":
    [{"raw", ...}]}]}``); image ``<root>/flickr30k-images/<filename>``. Splits ``train``, ``val``, ``test``;
    ``train`` includes the images marked ``restval`` (as in the retrieval/captioning literature).

    Sample: key ``<split>-<imgid>``, ``texts`` the raw captions (stripped), ``label`` None, meta ``imgid``,
    ``filename``, ``split`` (the file's, ``restval`` included).

    Bad records: a record that is not an object or has no valid ``split`` (reported in every split read, since
    its split is unknown), missing field, no sentences or an empty caption (field ``"sentences"``), repeated
    imgid, missing image.
    """
    return _read_karpathy(root, split, "dataset_flickr30k.json", coco=False)


def read_karpathy_coco(root: Path, split: str) -> Iterator[Sample | BadRecord]:
    """COCO with the Karpathy splits; as ``read_karpathy_flickr30k`` but the file is
    ``<root>/dataset_coco.json`` and the image ``<root>/<filepath>/<filename>`` (filepath ``train2014`` or
    ``val2014``, a required field); meta also has ``cocoid``."""
    return _read_karpathy(root, split, "dataset_coco.json", coco=True)


# ------------------------------------------------------------------------------------------------- nocaps


def read_nocaps(root: Path, split: str = "val") -> Iterator[Sample | BadRecord]:
    """nocaps validation, one ``Sample`` per image with its captions, in the order of the images.

    File: ``<root>/nocaps_val_4500_captions.json`` (COCO style: ``images`` with ``id``, ``file_name``,
    ``domain``, ...; ``annotations`` with ``image_id``, ``caption``, ``id``); image
    ``<root>/validation/<file_name>``. Only the ``val`` split has public captions.

    Sample: key ``val-<id>``, ``texts`` the image's captions in annotation order (stripped), ``label`` None,
    meta ``image_id``, ``file_name`` and ``domain``/``open_images_id`` when given.

    Bad records, annotations first: an annotation with a missing field, an empty caption or an image_id that
    no image has (the image keeps its other captions); then images: missing field, repeated id, no valid
    caption (field ``"captions"``), missing image.
    """
    root, split = Path(root), _check_split(split)
    if split != "val":
        raise ValueError(f"nocaps has public captions for the 'val' split only, got {split!r}")
    file = root / "nocaps_val_4500_captions.json"
    content = _load_json(file, "nocaps captions file")
    images, annotations = _json_list(content, file, "images"), _json_list(content, file, "annotations")
    return _nocaps_records(root, split, file, images, annotations)


def _nocaps_records(root: Path, split: str, file: Path, images: list[Any],
                    annotations: list[Any]) -> Iterator[Sample | BadRecord]:
    image_ids = {v["id"] for v in images if isinstance(v, dict) and isinstance(v.get("id"), int | str)}
    captions: dict[int | str, list[str]] = {}
    for index, value in enumerate(annotations):
        try:
            rec = _Record(value, file, f"annotation {_id_of(value, 'id', index)}")
            image_id = rec.ident("image_id")
            caption = rec.text("caption")
            if image_id not in image_ids:
                raise rec.error(f"no image with id {image_id!r}", "image_id")
            captions.setdefault(image_id, []).append(caption)
        except DataError as e:
            yield BadRecord(e)

    keys = _Keys()

    def build(rec: _Record) -> Sample:
        image_id = rec.ident("id")
        file_name = rec.file_name("file_name")
        key = keys.add(f"{split}-{_key_part(image_id)}", rec, "id")
        texts = captions.get(image_id)
        if not texts:
            raise rec.error("no valid caption for this image", "captions")
        image = _image(root / "validation" / file_name, rec.file, rec.record)
        meta: dict[str, Any] = {"image_id": image_id, "file_name": file_name}
        for name in ("domain", "open_images_id"):
            if isinstance(rec.value.get(name), str):
                meta[name] = rec.value[name]
        return Sample(key=key, images=(image,), texts=tuple(texts), meta=meta)

    yield from _records(((f"image {_id_of(v, 'id', i)}", v) for i, v in enumerate(images)), file, build)


# ------------------------------------------------------------------------------------------------- registry

READERS: dict[str, Reader] = {
    "vqa_v2": read_vqa_v2,
    "nlvr2": read_nlvr2,
    "snli_ve": read_snli_ve,
    "karpathy_flickr30k": read_karpathy_flickr30k,
    "karpathy_coco": read_karpathy_coco,
    "nocaps": read_nocaps,
}
"""Source name -> reader ``(root, split, ...) -> Iterator[Sample | BadRecord]``."""


def _split_order(split: str) -> tuple[int, str]:
    for rank, prefix in enumerate(("train", "val", "dev", "test")):
        if split.startswith(prefix):
            return rank, split
    return 4, split


def splits_of(source: str, root: Path) -> list[str]:
    """The splits of ``source`` whose annotation files are under ``root`` (train first, then val/dev, test).

    vqa_v2: every ``v2_OpenEnded_mscoco_<split>_questions.json``; nlvr2: those of train/dev/test1/test2 with a
    ``<split>.json``; snli_ve: every ``snli_ve_<split>.jsonl``; Karpathy: train/val/test when the file exists
    (their content is not read); nocaps: val when its file exists.
    """
    if source not in READERS:
        raise KeyError(f"unknown source {source!r}; known: {sorted(READERS)}")
    root = Path(root)

    def matching(pattern: str, regex: str) -> list[str]:
        names = (re.fullmatch(regex, p.name) for p in root.glob(pattern) if p.is_file())
        return [m.group(1) for m in names if m and _SPLIT_NAME.fullmatch(m.group(1))]

    if source == "vqa_v2":
        splits = matching("v2_OpenEnded_mscoco_*_questions.json", r"v2_OpenEnded_mscoco_(.+)_questions\.json")
    elif source == "nlvr2":
        splits = [s for s in NLVR2_SPLITS if (root / f"{s}.json").is_file()]
    elif source == "snli_ve":
        splits = matching("snli_ve_*.jsonl", r"snli_ve_(.+)\.jsonl")
    elif source in ("karpathy_flickr30k", "karpathy_coco"):
        name = "dataset_flickr30k.json" if source == "karpathy_flickr30k" else "dataset_coco.json"
        splits = list(KARPATHY_SPLITS) if (root / name).is_file() else []
    else:
        splits = ["val"] if (root / "nocaps_val_4500_captions.json").is_file() else []
    return sorted(splits, key=_split_order)
