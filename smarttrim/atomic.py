"""Atomic writes: a file or a directory appears whole at its final path, or not at all."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path


def _umask() -> int:
    """The process's umask (``os.umask`` can only be read by setting it)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write(path: Path, write: Callable[[str], object]) -> None:
    """Call ``write(tmp)`` on a temporary file beside ``path``, then rename it to ``path``. The file gets the
    mode of any newly created file (0666 less the umask: teammates can read results), not ``mkstemp``'s 0600."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.fchmod(fd, 0o666 & ~_umask())
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def temp_dir_beside(out: Path) -> Path:
    """A new empty directory next to ``out`` (same file system, so it can be renamed to ``out``), with the mode
    of any new directory (0777 less the umask), not ``mkdtemp``'s 0700."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    tmp.chmod(0o777 & ~_umask())
    return tmp


def replace_dir(new: Path, out: Path) -> None:
    """Move directory ``new`` to ``out``; an existing ``out`` is swapped aside first and removed after
    (``rename`` cannot overwrite a non-empty directory)."""
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-", dir=out.parent))
        os.replace(out, old / "dir")
        os.replace(new, out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(new, out)
