"""Logging of the pipeline driver: readable ``[pipeline] ...`` lines on the console, the same records with their time
and level in ``runs/<name>/pipeline.log``.

``setup_logging`` (``pipeline.run`` calls it once the config is loaded) configures the project's loggers
(``pipeline``, ``stages``, ``smarttrim``): records at ``level`` and above go to the console as their bare message
(warnings and errors to stderr, with their level), and to ``<run_dir>/pipeline.log``, appended (the file is the
history of every command run on that run directory), one line per record::

    2026-12-02 02:56:13,672 INFO pipeline: [pipeline] shard/shapes-vqa: done in 3.9 s (waited 7.1 s for inputs ...)

Other libraries' loggers are left as they are. The level is ``SMARTTRIM_LOG_LEVEL`` (default INFO); DEBUG adds each
stage's submission and keeps Ray Train's per-checkpoint lines.

The stages' own progress (training steps, evaluation batches) is printed by Ray workers, whose stdout Ray forwards to
the driver's console (not into this file); ``setup_logging`` sets Ray's log deduplication for it before Ray is imported
(``stages.progress.quiet_ray_logs``: progress lines of different models never folded into one, Ray Train's
per-checkpoint ``TrainingReport(...)`` lines dropped unless the level is DEBUG).
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

from stages.progress import quiet_ray_logs

LOGGERS = ("pipeline", "stages", "smarttrim")
"""The project's loggers (``logging.getLogger("pipeline")``, ``"smarttrim.ray"``, ...)."""
LOG_FILE = "pipeline.log"
LEVEL_ENV = "SMARTTRIM_LOG_LEVEL"


class _OneLine(logging.Formatter):
    """A record on one line (a multi-line message, e.g. a list of failed stages, joined with `` | ``)."""

    def format(self, record: logging.LogRecord) -> str:
        return super().format(record).replace("\n", " | ")


class _AppendFile(logging.FileHandler):
    """Appends to a file made (with its directory) at the first record: a command that logs nothing leaves none."""

    def __init__(self, path: Path) -> None:
        super().__init__(path, mode="a", encoding="utf-8", delay=True)

    def _open(self):  # type: ignore[no-untyped-def]
        Path(self.baseFilename).parent.mkdir(parents=True, exist_ok=True)
        return super()._open()


class _Below(logging.Filter):
    def __init__(self, level: int) -> None:
        super().__init__()
        self.level = level

    def filter(self, record: logging.LogRecord) -> bool:
        return record.levelno < self.level


def resolve_level(level: int | str | None) -> int:
    """``level`` as a number: a name (``"debug"``) or a number; None = ``SMARTTRIM_LOG_LEVEL``, else INFO."""
    value = level if level is not None else os.environ.get(LEVEL_ENV) or "INFO"
    if isinstance(value, int):
        return value
    number = logging.getLevelName(value.strip().upper())
    if not isinstance(number, int):
        raise ValueError(f"{LEVEL_ENV}={value!r}: not a logging level (DEBUG, INFO, WARNING, ERROR)")
    return number


def setup_logging(run_dir: Path, level: int | str | None = None) -> Path:
    """Log the project's records at ``level`` to the console and to ``<run_dir>/pipeline.log``; returns the file.
    Calling it again replaces the handlers it added before (another run directory, another level)."""
    number = resolve_level(level)
    quiet_ray_logs(verbose=number <= logging.DEBUG)
    if "ray" in sys.modules:
        logging.getLogger("pipeline").debug("[pipeline] Ray was imported before setup_logging: its log "
                                            "deduplication settings are its defaults")
    path = run_dir.resolve() / LOG_FILE
    out = logging.StreamHandler(sys.stdout)
    out.addFilter(_Below(logging.WARNING))
    out.setFormatter(logging.Formatter("%(message)s"))
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(logging.WARNING)
    err.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    file = _AppendFile(path)
    file.setFormatter(_OneLine("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    for name in LOGGERS:
        logger = logging.getLogger(name)
        for handler in [h for h in logger.handlers if getattr(h, "_smarttrim", False)]:
            logger.removeHandler(handler)
            handler.close()
        logger.setLevel(number)
        logger.propagate = False  # not twice through handlers another library put on the root logger
        for handler in (out, err, file):
            handler._smarttrim = True  # type: ignore[attr-defined]
            logger.addHandler(handler)
    return path


def task_logging() -> None:
    """In a Ray task (no ``setup_logging`` there): the project's INFO records as bare lines on stdout, which Ray
    forwards to the driver. Does nothing where the loggers have handlers already (the driver itself)."""
    logger = logging.getLogger("pipeline")
    if logger.handlers:
        return
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    for name in LOGGERS:
        logging.getLogger(name).addHandler(handler)
        logging.getLogger(name).setLevel(resolve_level(None))
        logging.getLogger(name).propagate = False


__all__ = ["LOGGERS", "LOG_FILE", "resolve_level", "setup_logging", "task_logging"]
