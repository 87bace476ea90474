"""Where a pipeline's results go: a directory every node mounts, or an object store staged through node-local copies.

Every stage writes its output directory and marker under ``<runs_dir>/<name>/``, on whichever node Ray runs it;
the driver reads the markers back and writes the report. Two ways to make that work on a multi-node cluster:

- **direct** (``runs_dir`` a path or a ``file://`` URI): storage every node mounts at the same path (EFS, NFS,
  Lustre, a bucket through mountpoint-s3 or gcsfuse); stages read and write it in place. ``ray_cluster.yaml`` mounts
  an EFS file system at ``/mnt/shared`` on every node and sets ``SMARTTRIM_RUNS_ROOT``.
- **staged** (``runs_dir`` an object-store URI: ``s3://``, ``gs://``, ``hdfs://``, ``abfs://``; or any runs_dir with
  ``runs_dir_mode: staged``): reached through ``pyarrow.fs`` as Ray Train reaches its storage (credentials from the
  environment, as for Ray Train). Stages work in a node-local copy of the run directory (the **cache**,
  ``$SMARTTRIM_CACHE_DIR`` or ``<tmp>/smarttrim-cache-<user>``, the same path on every node, see ``Mirror``):
  before a stage runs, its inputs (the output directories of the stages it depends on) are fetched into the
  node's cache unless the cached copy is the stored one; after it ran, its directory is uploaded and then its
  marker (so a stored marker always names a complete upload); markers are read from storage, so every node and
  the driver agree on what is done. The driver fetches only the top-level files of each stage (metrics, curves,
  never weights) for the report and uploads the report files.

``runs_dir`` is resolved once, on the driver, and every stage config carries absolute paths:

- an absolute path, or a ``file://`` URI (``file:///mnt/shared/runs``): as given;
- a relative path (the default ``runs``): under ``$SMARTTRIM_RUNS_ROOT`` when set, else under the driver's working
  directory. Under ``ray job submit --working-dir .`` that directory is Ray's unpacked copy of the job's files,
  which Ray deletes with the job's files and other nodes do not see: ``check_visible`` refuses it on a multi-node
  cluster, and the driver warns about it on a single node;
- an object-store URI: the cache directory for it (``Mirror.local``), the stored copy at the URI.
"""

from __future__ import annotations

import getpass
import hashlib
import logging
import os
import tempfile
import uuid
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

from stages.staging import MIRROR_ENV, Mirror, StorageError, localize, uri_scheme

LOG = logging.getLogger("smarttrim.pipeline")
ROOT_ENV = "SMARTTRIM_RUNS_ROOT"
"""Directory a relative ``runs_dir`` is resolved under (the cluster's shared mount)."""
CACHE_ENV = "SMARTTRIM_CACHE_DIR"
"""Node-local directory of the staged copies (the same path on every node; default ``<tmp>/smarttrim-cache-<user>``)."""
JOB_DIR_MARK = "runtime_resources"
"""A path component of Ray's unpacked job working directories (``.../runtime_resources/working_dir_files/...``)."""
STAGED_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss")
"""URI schemes of storage that is staged (``pyarrow.fs.FileSystem.from_uri`` reaches them)."""
MODES = ("auto", "direct", "staged")
"""``runs_dir_mode``: ``auto`` (staged for an object-store URI, direct for a path), ``direct``, ``staged``."""


def runs_dir_problem(runs_dir: str, mode: str = "auto") -> str | None:
    """Why ``runs_dir`` (with ``runs_dir_mode`` ``mode``) cannot be used (None: it can); for config validation."""
    if mode not in MODES:
        return f"runs_dir_mode={mode!r}: must be one of {MODES}"
    scheme, parsed = uri_scheme(runs_dir), urlparse(runs_dir)
    if scheme in STAGED_SCHEMES:
        if mode == "direct":
            return (f"{scheme}:// storage cannot be written in place: use runs_dir_mode: staged (or auto), or mount it "
                    f"on every node and give the mount path")
        if not parsed.netloc:
            return f"a {scheme}:// URI names a bucket or host: {scheme}://bucket/prefix"
        return None
    if scheme not in ("", "file"):
        return (f"{scheme}:// is not a storage this pipeline reaches: a path every node mounts, file:///abs/path, or "
                f"one of {', '.join(s + '://' for s in STAGED_SCHEMES)}")
    if scheme == "file" and (parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/")):
        return "a file:// URI names an absolute local path: file:///abs/path"
    return None


def is_staged(runs_dir: str, mode: str = "auto") -> bool:
    """Whether stages work in node-local copies of ``runs_dir`` (see the module docstring)."""
    return mode == "staged" or (mode == "auto" and uri_scheme(runs_dir) in STAGED_SCHEMES)


def resolve_runs_dir(runs_dir: str) -> Path:
    """A path or ``file://`` ``runs_dir`` as an absolute path (see the module docstring)."""
    problem = runs_dir_problem(runs_dir, "staged")
    if problem or uri_scheme(runs_dir) in STAGED_SCHEMES:
        raise ValueError(f"runs_dir={runs_dir!r}: {problem or 'not a path'}")
    if runs_dir.startswith("file:"):
        return Path(unquote(urlparse(runs_dir).path))
    path = Path(runs_dir).expanduser()
    if not path.is_absolute():
        path = Path(os.environ.get(ROOT_ENV) or Path.cwd()) / path
    return path.resolve()


def cache_root() -> Path:
    """Where staged copies live on this node (``$SMARTTRIM_CACHE_DIR``, else ``<tmp>/smarttrim-cache-<user>``)."""
    env = os.environ.get(CACHE_ENV)
    return (Path(env).expanduser() if env else Path(tempfile.gettempdir()) / f"smarttrim-cache-{_user()}").resolve()


def _user() -> str:
    try:
        return getpass.getuser()
    except (KeyError, OSError):  # no passwd entry (some containers)
        return str(os.getuid())


def mirror_for(runs_dir: str, name: str) -> Mirror:
    """The staged run directory ``<runs_dir>/<name>``: stored at the URI (or resolved path), worked on under
    ``<cache>/<hash of the stored location>/<name>``."""
    remote = runs_dir.rstrip("/") if uri_scheme(runs_dir) in STAGED_SCHEMES else str(resolve_runs_dir(runs_dir))
    remote = f"{remote}/{name}"
    digest = hashlib.sha256(remote.encode()).hexdigest()[:12]
    return Mirror(remote=remote, local=str(cache_root() / digest / name))


def in_job_dir(path: Path) -> bool:
    """Whether ``path`` lies inside a Ray job's unpacked working directory (deleted with the job's files)."""
    return JOB_DIR_MARK in path.parts


def check_visible(path: Path, timeout_s: float = 120.0, mirror: Mirror | None = None) -> int:
    """On the connected Ray cluster, check from every alive node that ``path`` is the same directory the driver
    sees (a probe file written here must be there); returns the number of nodes checked. Raises ``ValueError``
    naming the nodes that do not see it. A single-node cluster needs no check (and only gets a warning when
    ``path`` is inside Ray's job directory). With ``mirror`` (a staged run), the probe goes through storage, and
    is checked on every node, this one included (credentials and the bucket are checked before any work)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if mirror is not None:
        return _check_storage(mirror, nodes, timeout_s)
    if len(nodes) <= 1:
        if in_job_dir(path):
            LOG.warning("results go to %s, inside Ray's working directory of this job, which Ray deletes with the "
                        "job's files: set runs_dir to an absolute path (or SMARTTRIM_RUNS_ROOT) to keep them", path)
        return len(nodes)
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".visible-{uuid.uuid4().hex}"
    probe.write_text("probe\n")

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(p: str) -> bool:
        return Path(p).is_file()

    try:
        refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")": sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(str(probe))
            for n in nodes}
        blind = [name for name, ref in refs.items() if not ray.get(ref, timeout=timeout_s)]
    finally:
        probe.unlink(missing_ok=True)
    if blind:
        raise ValueError(
            f"runs_dir: {path} is not visible from {len(blind)} of {len(nodes)} node(s) of the cluster "
            f"({', '.join(blind)}): stages would write results the driver cannot read. Put runs_dir on storage "
            f"every node mounts at the same path (ray_cluster.yaml mounts EFS at /mnt/shared and sets "
            f"{ROOT_ENV}=/mnt/shared)")
    return len(nodes)


def _check_storage(mirror: Mirror, nodes: list[dict[str, Any]], timeout_s: float) -> int:
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    probe = Path(mirror.local) / f".visible-{uuid.uuid4().hex}"
    try:
        mirror.write_text(probe, "probe\n")
    except OSError as err:
        raise ValueError(f"runs_dir: cannot write to {mirror.remote}: {err}") from err

    @ray.remote(num_cpus=0, max_retries=0)
    def sees(m: Mirror, p: str) -> str | None:
        try:
            Path(m.local).mkdir(parents=True, exist_ok=True)
            return None if m.is_file(p) else f"does not see {m.uri(p)}"
        except OSError as err:
            return str(err)

    try:
        refs = {n["NodeManagerAddress"] + " (" + n["NodeID"][:8] + ")": sees.options(
            scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False)).remote(mirror, str(probe))
            for n in nodes}
        problems = {name: why for name, ref in refs.items() if (why := ray.get(ref, timeout=timeout_s))}
    finally:
        mirror.delete(probe)
    if problems:
        lines = "; ".join(f"{name}: {why}" for name, why in problems.items())
        raise ValueError(f"runs_dir: {mirror.remote} (staged through {mirror.local} on each node) does not work on "
                         f"{len(problems)} of {len(nodes)} node(s): {lines}. Every node needs the storage's "
                         f"credentials and a writable {CACHE_ENV}")
    return len(nodes)


__all__ = ["CACHE_ENV", "MIRROR_ENV", "MODES", "ROOT_ENV", "STAGED_SCHEMES", "Mirror", "StorageError", "cache_root",
           "check_visible", "in_job_dir", "is_staged", "localize", "mirror_for", "resolve_runs_dir", "runs_dir_problem"]
