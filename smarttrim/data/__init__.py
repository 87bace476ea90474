"""Data: the record type, official-format readers, the built-in ``shapes`` generator and the streaming loader."""

from smarttrim.data.records import NLVR2_LABELS, SNLI_VE_LABELS, TASK_FLAVORS, BadRecord, DataError, ImageSource, Sample

__all__ = ["NLVR2_LABELS", "SNLI_VE_LABELS", "TASK_FLAVORS", "BadRecord", "DataError", "ImageSource", "Sample"]
