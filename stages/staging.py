"""Staged storage: a run directory kept in an object store (or any pyarrow file system) and worked on in node-local
copies. ``pipeline.storage`` decides when a run is staged; stages use ``localize`` to fetch what they read on nodes
the DAG did not prepare (Ray Train workers). The rules (what is fetched when, what is uploaded in which order) are in
``Mirror``'s docstrings and ``pipeline/storage.py``."""

from __future__ import annotations

import functools
import hashlib
import json
import os
import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

MARKER_SUFFIX = ".done.json"
BULK_SUFFIXES = (".tar", ".safetensors", ".bin", ".pt", ".ckpt")
"""Files a ``top_only`` pull leaves in storage: a shard stage's WebDataset tars, weights."""
LOCK_TIMEOUT_S = 3600
"""How long a fetch waits for another process of the node fetching the same directory (a large model or shards)."""


def uri_scheme(location: str) -> str:
    """The URI scheme of ``location`` ("" for a plain path, also a Windows drive letter)."""
    scheme = urlparse(location).scheme
    return scheme if len(scheme) > 1 else ""  # one letter: a Windows drive


@functools.lru_cache(maxsize=8)
def _filesystem(remote: str) -> tuple[Any, str]:
    """(pyarrow file system, base path) of a stored location, one per process."""
    import pyarrow.fs as pafs

    if uri_scheme(remote):
        try:
            return pafs.FileSystem.from_uri(remote)
        except OSError as err:  # e.g. an unreachable endpoint or a bucket whose region cannot be resolved
            raise StorageError(f"{remote}: cannot reach the storage ({err}); check the URI, the network and the "
                               f"credentials (as for Ray Train's storage_path)") from err
    return pafs.LocalFileSystem(), remote


class StorageError(RuntimeError):
    """A staged input is not in storage (its stage is not done), or storage cannot be reached."""


@dataclass(frozen=True)
class Mirror:
    """A run directory kept in storage (``remote``: a URI, or a path) and worked on in a node-local copy
    (``local``: the same absolute path on every node, which every stage config names). Local paths map to stored
    ones by their position under ``local``; stage directories are ``<local>/<kind>/<label>-<key>`` with the
    marker ``<dir>.done.json`` beside them. Picklable (Ray ships it with each stage); the file system is opened
    once per process."""

    remote: str
    local: str

    @property
    def _fs(self) -> tuple[Any, str]:
        return _filesystem(self.remote)

    def owns(self, path: str | Path) -> bool:
        return Path(path).is_relative_to(self.local)

    def stored(self, path: str | Path) -> str:
        """The stored path (in the file system, without the scheme) of a local path under ``local``."""
        rel = Path(path).relative_to(self.local).as_posix()
        base = self._fs[1].rstrip("/")
        return base if rel == "." else f"{base}/{rel}"

    def uri(self, path: str | Path) -> str:
        """Where a local path is stored, as users name it (``s3://bucket/runs/x/report.md``)."""
        rel = Path(path).relative_to(self.local).as_posix()
        return self.remote if rel == "." else f"{self.remote}/{rel}"

    def is_file(self, path: str | Path) -> bool:
        import pyarrow.fs as pafs

        fs, _ = self._fs
        return bool(fs.get_file_info(self.stored(path)).type == pafs.FileType.File)

    def read_text(self, path: str | Path) -> str:
        fs, _ = self._fs
        try:
            with fs.open_input_stream(self.stored(path)) as f:
                return f.read().decode()
        except FileNotFoundError as err:
            raise FileNotFoundError(f"{self.uri(path)}: not in storage") from err

    def write_text(self, path: str | Path, text: str) -> None:
        """Store ``text`` at ``path``'s place, whole or not at all (object stores put an object atomically; on a
        file system a temporary file is moved into place)."""
        import pyarrow.fs as pafs

        fs, _ = self._fs
        dest = self.stored(path)
        fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        atomic = isinstance(fs, pafs.LocalFileSystem) or fs.type_name in ("local", "hdfs")
        target = f"{dest}.tmp-{uuid.uuid4().hex}" if atomic else dest
        with fs.open_output_stream(target) as f:
            f.write(text.encode())
        if atomic:
            fs.move(target, dest)

    def delete(self, path: str | Path) -> None:
        """Remove ``path`` (a file or a directory) from storage and from this node's cache."""
        import pyarrow.fs as pafs

        fs, _ = self._fs
        dest = self.stored(path)
        kind = fs.get_file_info(dest).type
        if kind == pafs.FileType.Directory:
            fs.delete_dir(dest)
        elif kind == pafs.FileType.File:
            fs.delete_file(dest)
        local = Path(path)
        shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)
        for tag in _tags(local):
            tag.unlink(missing_ok=True)

    def push(self, path: str | Path) -> None:
        """Upload a local file or directory to its stored place, replacing what is there (a directory's stale
        files from an earlier run of the same stage go first)."""
        import pyarrow.fs as pafs

        fs, _ = self._fs
        local, dest = Path(path), self.stored(path)
        if local.is_dir():
            if fs.get_file_info(dest).type == pafs.FileType.Directory:
                fs.delete_dir(dest)
            fs.create_dir(dest, recursive=True)
        else:
            fs.create_dir(dest.rsplit("/", 1)[0], recursive=True)
        pafs.copy_files(str(local), dest, source_filesystem=pafs.LocalFileSystem(), destination_filesystem=fs)

    def fetch(self, path: str | Path) -> bool:
        """Download a stored file or directory that is not a stage's (the run's ``mlflow.db``, ``pipeline.log``) to
        its local place, replacing the local one; False when storage has none."""
        import pyarrow.fs as pafs

        fs, _ = self._fs
        local, src = Path(path), self.stored(path)
        kind = fs.get_file_info(src).type
        if kind not in (pafs.FileType.File, pafs.FileType.Directory):
            return False
        local.parent.mkdir(parents=True, exist_ok=True)
        tmp = local.with_name(f".{local.name}.tmp-{uuid.uuid4().hex}")
        try:
            if kind == pafs.FileType.Directory:
                tmp.mkdir()
            pafs.copy_files(src, str(tmp), source_filesystem=fs, destination_filesystem=pafs.LocalFileSystem())
            shutil.rmtree(local, ignore_errors=True) if local.is_dir() else local.unlink(missing_ok=True)
            tmp.rename(local)
        finally:
            shutil.rmtree(tmp, ignore_errors=True) if tmp.is_dir() else tmp.unlink(missing_ok=True)
        return True

    def publish(self, out: str | Path, marker_text: str) -> None:
        """After a stage ran here: upload its directory, then its marker (a stored marker names a complete
        upload), and note that this node's copy is the stored one."""
        out = Path(out)
        if out.exists():
            self.push(out)
        self.write_text(out.with_name(out.name + MARKER_SUFFIX), marker_text)
        _tag(out, full=True).write_text(_digest(marker_text))

    def pull(self, out: str | Path, top_only: bool = False) -> Path:
        """Make this node's copy of a stage directory ``out`` the stored one (a no-op when it already is: the copy
        remembers the digest of the stored marker it was fetched for, so a stage recomputed with ``--force``
        elsewhere is fetched again). ``top_only``: only the directory's own files (metrics, curves: what the driver
        reports), not its subdirectories (weights) nor its data shards (``BULK_SUFFIXES``). Concurrent pulls on one
        node wait for each other (at most ``LOCK_TIMEOUT_S``)."""
        import filelock

        out = Path(out)
        marker = out.with_name(out.name + MARKER_SUFFIX)
        try:
            marker_text = self.read_text(marker)
        except FileNotFoundError as err:
            raise StorageError(f"{self.uri(out)}: not in storage (its stage is not done)") from err
        digest = _digest(marker_text)
        out.parent.mkdir(parents=True, exist_ok=True)
        lock = filelock.FileLock(str(out.with_name(f".{out.name}.lock")), timeout=LOCK_TIMEOUT_S)
        try:
            lock.acquire()
        except filelock.Timeout as err:
            raise StorageError(f"{lock.lock_file}: another process of this node has been fetching {self.uri(out)} "
                               f"for {LOCK_TIMEOUT_S} s; if none is, delete the lock file") from err
        try:
            full, top = _tag(out, full=True), _tag(out, full=False)
            if not (out.is_dir() and (_read(full) == digest or (top_only and _read(top) == digest))):
                self._download(out, top_only)
                marker.write_text(marker_text)
                for tag in (full, top):
                    tag.unlink(missing_ok=True)
                (top if top_only else full).write_text(digest)
        finally:
            lock.release()
        return out

    def _download(self, out: Path, top_only: bool) -> None:
        """Replace ``out`` by the stored directory (into a temporary sibling first, then renamed into place)."""
        import pyarrow.fs as pafs

        fs, _ = self._fs
        tmp = out.with_name(f".{out.name}.tmp-{uuid.uuid4().hex}")
        try:
            if top_only:
                tmp.mkdir(parents=True)
                for info in fs.get_file_info(pafs.FileSelector(self.stored(out), recursive=False)):
                    if info.type == pafs.FileType.File and not info.base_name.endswith(BULK_SUFFIXES):
                        pafs.copy_files(info.path, str(tmp / info.base_name), source_filesystem=fs,
                                        destination_filesystem=pafs.LocalFileSystem())
            else:
                tmp.mkdir(parents=True)  # copy_files creates the subdirectories it writes into, not the root
                pafs.copy_files(self.stored(out), str(tmp), source_filesystem=fs,
                                destination_filesystem=pafs.LocalFileSystem())
            shutil.rmtree(out, ignore_errors=True)
            tmp.rename(out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def stage_dir(self, path: str | Path) -> Path | None:
        """The stage directory (``<local>/<kind>/<label>-<key>``) a local path lies in, None outside one."""
        path = Path(path)
        if not self.owns(path):
            return None
        parts = path.relative_to(self.local).parts
        return Path(self.local, *parts[:2]) if len(parts) >= 2 else None

    def localize(self, path: str | Path) -> None:
        """Fetch the stage directory a path lies in (a Ray Train worker's shards or start model); a no-op for
        paths outside the run directory (the user's data, checkpoints and tokenizers)."""
        stage = self.stage_dir(path)
        if stage is not None:
            self.pull(stage)

    def to_env(self) -> str:
        return json.dumps({"remote": self.remote, "local": self.local})

    @classmethod
    def from_env(cls) -> Mirror | None:
        """The mirror a stage's Ray task runs with (``$SMARTTRIM_MIRROR``, set by the DAG)."""
        raw = os.environ.get(MIRROR_ENV)
        return cls(**json.loads(raw)) if raw else None


MIRROR_ENV = "SMARTTRIM_MIRROR"


def localize(*paths: str | Path | None, mirror: str | None = None) -> None:
    """In a process of a staged run (``mirror``: a ``Mirror.to_env()`` string, else ``$SMARTTRIM_MIRROR``), fetch the
    stage directories these paths lie in; elsewhere a no-op."""
    found = Mirror(**json.loads(mirror)) if mirror else Mirror.from_env()
    for path in paths if found is not None else ():
        if path is not None:
            found.localize(path)


def _tag(out: Path, full: bool) -> Path:
    return out.with_name(f".{out.name}.{'pulled' if full else 'pulled-top'}")


def _tags(out: Path) -> list[Path]:
    return [_tag(out, True), _tag(out, False), out.with_name(out.name + MARKER_SUFFIX)]


def _read(path: Path) -> str | None:
    try:
        return path.read_text()
    except FileNotFoundError:
        return None


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


__all__ = ["MARKER_SUFFIX", "MIRROR_ENV", "Mirror", "StorageError", "localize"]
