"""The one record type every data source yields, and the error every reader raises.

A source (an official-format reader or the built-in ``shapes`` generator) yields, per split, a stream of
``Sample`` objects and ``BadRecord`` objects (input that could not be read: the shard stage either fails
on it or skips it and lists it in the manifest). The shard stage turns samples into WebDataset shards; the
streaming loader turns shards into model batches.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TASK_FLAVORS: tuple[str, ...] = ("vqa", "nlvr2", "snli_ve", "retrieval", "caption")
SNLI_VE_LABELS: tuple[str, ...] = ("entailment", "neutral", "contradiction")
NLVR2_LABELS: tuple[str, ...] = ("False", "True")

ImageSource = bytes | Path
"""An encoded image (JPEG/PNG bytes, stored as is) or the path of an image file to read."""


class DataError(ValueError):
    """Bad input, naming the file, the record and the field: ``<file>: record <record>: field <field>: why``."""

    def __init__(self, file: str | Path, reason: str, record: str | int | None = None,
                 field: str | None = None) -> None:
        self.file, self.record, self.field, self.reason = str(file), record, field, reason
        where = [str(file)]
        if record is not None:
            where.append(f"record {record}")
        if field is not None:
            where.append(f"field {field!r}")
        super().__init__(": ".join([*where, reason]))

    def __reduce__(self) -> tuple[type, tuple[str, str, str | int | None, str | None]]:
        """Picklable with its fields (stages read sources in worker processes)."""
        return (DataError, (self.file, self.reason, self.record, self.field))

    def as_dict(self) -> dict[str, Any]:
        """JSON form, as listed under ``skipped`` in a shard manifest."""
        return {"file": self.file, "record": self.record, "field": self.field, "reason": self.reason}


@dataclass(frozen=True)
class Sample:
    """One example of a task, as read from its source.

    key: unique within the data set; letters, digits, '_' and '-' only (it becomes the WebDataset key).
    images: one image (vqa, snli_ve, retrieval, caption) or two (nlvr2: left, right).
    texts: the question (vqa), statement (nlvr2) or hypothesis (snli_ve); the captions of the image
        (retrieval, caption: one or more).
    label: nlvr2 one of ``NLVR2_LABELS``, snli_ve one of ``SNLI_VE_LABELS``; None otherwise or when the
        split has no annotations (test).
    answers: vqa: every annotator's answer, normalized as the official VQA evaluation does (empty when
        the split has no annotations).
    meta: ids from the source (question_id, image_id, identifier, ...), JSON-serializable.
    """

    key: str
    images: tuple[ImageSource, ...]
    texts: tuple[str, ...]
    label: str | None = None
    answers: tuple[str, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class BadRecord:
    """A record that could not be turned into a ``Sample``; ``error`` says where and why."""

    error: DataError


def question_kind(meta: dict[str, Any]) -> str | None:
    """The kind of question an instance asks (``Sample.meta``, as stored in the shards), for metrics per kind as
    the official VQA evaluation reports them per answer type: VQA v2's ``answer_type`` (``yes/no``, ``number``,
    ``other``) when annotated; for the built-in ``shapes`` data its question type (vqa ``qtype``, an attribute
    question by the attribute it asks: ``attribute/color``), its statement template (nlvr2) or hypothesis family
    (snli_ve); None when the source says nothing (the per-kind breakdown is then omitted)."""
    if isinstance(meta.get("answer_type"), str):
        return meta["answer_type"]
    qtype = meta.get("qtype")
    if isinstance(qtype, str):
        query = (meta.get("program") or {}).get("query")
        return f"{qtype}/{query}" if qtype == "attribute" and isinstance(query, str) else qtype
    for field_name, key in (("statement", "template"), ("hypothesis", "family")):
        program = meta.get(field_name)
        if isinstance(program, dict) and isinstance(program.get(key), str):
            return program[key]
    return None
