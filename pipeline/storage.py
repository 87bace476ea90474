"""Where a pipeline's results go, and a check that every node of the cluster reaches it.

Every stage writes its output directory and marker under ``<runs_dir>/<name>/``, on whichever node Ray runs it;
the driver reads the markers back and writes the report. So on a multi-node cluster ``runs_dir`` must be storage
that every node mounts at the same path (EFS, NFS, Lustre, a bucket mounted with mountpoint-s3 or gcsfuse):
``ray_cluster.yaml`` mounts an EFS file system at ``/mnt/shared`` on every node and sets ``SMARTTRIM_RUNS_ROOT``.

``runs_dir`` is resolved once, on the driver, to an absolute path that every stage config then carries:

- an absolute path, or a ``file://`` URI (``file:///mnt/shared/runs``): as given;
- a relative path (the default ``runs``): under ``$SMARTTRIM_RUNS_ROOT`` when set, else under the driver's working
  directory. Under ``ray job submit --working-dir .`` that directory is Ray's unpacked copy of the job's files,
  which Ray deletes with the job's files and other nodes do not see: ``check_visible`` refuses it on a multi-node
  cluster, and the driver warns about it on a single node.

Object-store URIs (``s3://``, ``gs://``) are refused with what to do instead (mount the bucket): the stages read
and write their directories through the local file system.
"""

from __future__ import annotations

import logging
import os
import uuid
from pathlib import Path
from urllib.parse import unquote, urlparse

LOG = logging.getLogger("smarttrim.pipeline")
ROOT_ENV = "SMARTTRIM_RUNS_ROOT"
"""Directory a relative ``runs_dir`` is resolved under (the cluster's shared mount)."""
JOB_DIR_MARK = "runtime_resources"
"""A path component of Ray's unpacked job working directories (``.../runtime_resources/working_dir_files/...``)."""


def runs_dir_problem(runs_dir: str) -> str | None:
    """Why ``runs_dir`` cannot be used (None: it can); for config validation."""
    parsed = urlparse(runs_dir)
    if len(parsed.scheme) > 1 and parsed.scheme != "file":  # one letter: a Windows drive
        return (f"{parsed.scheme}:// storage is not read or written directly; mount it on every node (e.g. "
                f"mountpoint-s3 or s3fs for s3://, gcsfuse for gs://) and give the mount path, e.g. /mnt/shared/runs")
    if parsed.scheme == "file" and (parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/")):
        return "a file:// URI names an absolute local path: file:///abs/path"
    return None


def resolve_runs_dir(runs_dir: str) -> Path:
    """``runs_dir`` as an absolute path (see the module docstring)."""
    problem = runs_dir_problem(runs_dir)
    if problem:
        raise ValueError(f"runs_dir={runs_dir!r}: {problem}")
    if runs_dir.startswith("file:"):
        return Path(unquote(urlparse(runs_dir).path))
    path = Path(runs_dir).expanduser()
    if not path.is_absolute():
        path = Path(os.environ.get(ROOT_ENV) or Path.cwd()) / path
    return path.resolve()


def in_job_dir(path: Path) -> bool:
    """Whether ``path`` lies inside a Ray job's unpacked working directory (deleted with the job's files)."""
    return JOB_DIR_MARK in path.parts


def check_visible(path: Path, timeout_s: float = 120.0) -> int:
    """On the connected Ray cluster, check from every alive node that ``path`` is the same directory the driver
    sees (a probe file written here must be there); returns the number of nodes checked. Raises ``ValueError``
    naming the nodes that do not see it. A single-node cluster needs no check (and only gets a warning when
    ``path`` is inside Ray's job directory)."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    nodes = [n for n in ray.nodes() if n.get("Alive")]
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


__all__ = ["ROOT_ENV", "check_visible", "in_job_dir", "resolve_runs_dir", "runs_dir_problem"]
