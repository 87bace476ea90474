"""Submit the SmartTrim pipeline (or any entrypoint) to a Ray cluster as a Ray job, with token authentication.

Usage:
  python cluster/submit.py [options] [key=value ...]

Runs, from the repository root,
  ray job submit --address ADDRESS --submission-id ID --working-dir . -- \
      python -m pipeline.run all --config CONFIG [key=value ...]
follows the job's logs and exits with the job's final status:
  0 SUCCEEDED, 1 FAILED, 2 STOPPED, 3 not submitted / status unknown (authentication refused, cluster
  unreachable, bad token file), 4 still running (log following interrupted; the job goes on).

The pipeline's config and overrides are validated here first (an unknown key, a wrong type, an override path
that does not exist: exit 3, nothing submitted); paths in it are the cluster's and are checked there.
--entrypoint replaces the whole command (key=value arguments are appended to it). The working directory is
uploaded (Ray skips .gitignore'd files) and becomes the job's current directory on the cluster.

Address: --address, else $RAY_API_SERVER_ADDRESS, else $RAY_ADDRESS if it is an http(s) URL, else
http://127.0.0.1:8265 (a local head, or `ray dashboard ray_cluster.yaml` forwarding the cluster's dashboard).
Token: --token-file (sets RAY_AUTH_TOKEN_PATH), else Ray's own lookup: $RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH,
~/.ray/auth_token. With a token, the client runs with RAY_AUTH_MODE=token (Ray only sends the token then).

Examples:
  python cluster/submit.py --config pipeline/configs/quickstart.yaml
  python cluster/submit.py --address http://127.0.0.1:8265 --config pipeline/configs/paper.yaml \
      tasks.1.backbone.max_steps=100
  python cluster/submit.py --entrypoint "python -m stages.shard --source shapes --task vqa --out data/shapes-vqa"
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _auth  # noqa: E402  (sibling module; this directory is not a package)

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
DEFAULT_CONFIG = "pipeline/configs/quickstart.yaml"
EXIT_CODES = {"SUCCEEDED": 0, "FAILED": 1, "STOPPED": 2}
EXIT_NOT_SUBMITTED, EXIT_RUNNING = 3, 4


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides passed to the entrypoint")
    p.add_argument("--address", help=f"job API (dashboard) URL (default: see above, {DEFAULT_ADDRESS})")
    p.add_argument("--token-file", type=Path, help="token file for this submission (sets RAY_AUTH_TOKEN_PATH)")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="pipeline config (default: %(default)s)")
    p.add_argument("--command", default="all", help="pipeline.run sub-command (default: %(default)s)")
    p.add_argument("--entrypoint", help="run this shell-quoted command instead of the pipeline")
    p.add_argument("--working-dir", default=".", help="uploaded as the job's working dir (default: %(default)s)")
    p.add_argument("--submission-id", help="job id (default: smarttrim-<UTC time>-<random>)")
    p.add_argument("--runtime-env-json", help="extra runtime_env (JSON), e.g. env_vars")
    p.add_argument("--entrypoint-num-cpus", type=float, help="CPUs reserved for the driver (default: 0)")
    p.add_argument("--entrypoint-num-gpus", type=float, help="GPUs reserved for the driver (default: 0)")
    p.add_argument("--no-wait", action="store_true", help="submit and return (exit 0 once submitted)")
    p.add_argument("--dry-run", action="store_true", help="print the `ray job submit` command and exit")
    args = p.parse_args(argv)
    for kv in args.overrides:
        if "=" not in kv or kv.startswith("="):
            p.error(f"override {kv!r} is not key=value")
    return args


def resolve_address(args: argparse.Namespace) -> str:
    if args.address:
        return args.address
    if os.environ.get("RAY_API_SERVER_ADDRESS"):
        return os.environ["RAY_API_SERVER_ADDRESS"]
    if os.environ.get("RAY_ADDRESS", "").startswith(("http://", "https://")):
        return os.environ["RAY_ADDRESS"]
    return DEFAULT_ADDRESS


def entrypoint(args: argparse.Namespace) -> list[str]:
    if args.entrypoint:
        base = shlex.split(args.entrypoint)
    else:
        base = ["python", "-m", "pipeline.run", args.command, "--config", args.config]
    return base + list(args.overrides)


def client_env(args: argparse.Namespace) -> dict[str, str] | None:
    """Environment for the Ray client with the token (None: a token file was named but is missing/empty)."""
    env = dict(os.environ)
    if args.token_file is not None:
        env.pop(_auth.TOKEN_ENV, None)
        env[_auth.TOKEN_PATH_ENV] = str(args.token_file.expanduser().resolve())
    source = _auth.find_token(env)
    if source.kind == "path" and not source.found:  # Ray would abort on this; say it plainly instead
        print(f"error: no token in {source.path} (RAY_AUTH_TOKEN_PATH); create it with a token, or unset it",
              file=sys.stderr)
        return None
    if source.found:
        env.setdefault(_auth.MODE_ENV, "token")
        if source.path is not None:
            _auth.warn_if_readable_by_others(source.path)
        print(f"token: {source.describe()}", file=sys.stderr)
    else:
        print("warning: no Ray auth token found ($RAY_AUTH_TOKEN, $RAY_AUTH_TOKEN_PATH, ~/.ray/auth_token); "
              "submitting without one: a cluster with token authentication will refuse", file=sys.stderr)
    return env


def job_status(address: str, submission_id: str, env: dict[str, str]) -> str | None:
    """The job's status from the job REST API (GET /api/jobs/<id>, with the token if there is one); None if the
    job does not exist or the request is refused or fails."""
    source = _auth.find_token(env)
    token = env[_auth.TOKEN_ENV].strip() if source.kind == "env" else (
        _auth.read_token(source.path) if source.path is not None else "")
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    req = urllib.request.Request(f"{address.rstrip('/')}/api/jobs/{urllib.parse.quote(submission_id)}",
                                 headers=headers)
    try:
        with urllib.request.urlopen(req, timeout=30) as r:
            return json.load(r).get("status")
    except (urllib.error.URLError, OSError, ValueError):
        return None


def git_env(root: Path) -> dict[str, str]:
    """The commit of the checkout being submitted (the uploaded working directory has no ``.git``), as the variables
    ``pipeline.tracking.git_tags`` reads on the cluster to tag the job's MLflow runs; empty outside a checkout."""
    sys.path.insert(0, str(root.resolve()))
    try:
        from pipeline import tracking
    except ImportError:  # not the repository root: nothing to tag with
        return {}
    tags = tracking.git_tags(root.resolve())
    if tracking.GIT_COMMIT_TAG not in tags:
        return {}
    return {tracking.GIT_COMMIT_ENV: tags[tracking.GIT_COMMIT_TAG],
            tracking.GIT_DIRTY_ENV: tags.get(tracking.GIT_DIRTY_TAG, "unknown")}


def runtime_env(args: argparse.Namespace) -> dict:
    """The job's runtime_env: ``--runtime-env-json`` with the submitted commit added to its ``env_vars``."""
    env = json.loads(args.runtime_env_json) if args.runtime_env_json else {}
    env["env_vars"] = {**git_env(Path(args.working_dir)), **(env.get("env_vars") or {})}
    return env


def config_problem(args: argparse.Namespace) -> str | None:
    """Why the pipeline's config with its overrides does not load (None: it does), checked before submitting."""
    if args.entrypoint:
        return None
    sys.path.insert(0, str(Path(args.working_dir).resolve()))
    try:
        from pipeline.config import load_config
    except ImportError as err:  # not the repository root: the cluster will say
        print(f"warning: config not checked before submitting ({err})", file=sys.stderr)
        return None
    try:
        load_config(Path(args.working_dir) / args.config, list(args.overrides))
    except (ValueError, FileNotFoundError) as err:
        return str(err)
    return None


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    problem = config_problem(args)
    if problem:
        print(f"error: {problem} (nothing submitted)", file=sys.stderr)
        return EXIT_NOT_SUBMITTED
    address = resolve_address(args)
    submission_id = args.submission_id or f"smarttrim-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-" \
                                          f"{uuid.uuid4().hex[:6]}"
    cmd = [_auth.ray_executable(), "job", "submit", "--address", address, "--submission-id", submission_id,
           "--working-dir", args.working_dir]
    cmd += ["--runtime-env-json", json.dumps(runtime_env(args))]
    if args.entrypoint_num_cpus is not None:
        cmd += ["--entrypoint-num-cpus", str(args.entrypoint_num_cpus)]
    if args.entrypoint_num_gpus is not None:
        cmd += ["--entrypoint-num-gpus", str(args.entrypoint_num_gpus)]
    if args.no_wait:
        cmd.append("--no-wait")
    cmd += ["--", *entrypoint(args)]
    print("+ " + shlex.join(cmd), file=sys.stderr, flush=True)
    if args.dry_run:
        return 0
    env = client_env(args)
    if env is None:
        return EXIT_NOT_SUBMITTED
    try:
        rc = subprocess.run(cmd, env=env).returncode
    except KeyboardInterrupt:
        rc = None
        print(f"\ninterrupted: job {submission_id} keeps running; `ray job stop {submission_id}` stops it",
              file=sys.stderr)
    status = job_status(address, submission_id, env)
    if status is None:
        print(f"job {submission_id}: not submitted or status unknown (`ray job submit` exit code {rc})",
              file=sys.stderr)
        return EXIT_NOT_SUBMITTED
    print(f"job {submission_id}: {status}", file=sys.stderr)
    if args.no_wait:
        return 0
    return EXIT_CODES.get(status, EXIT_RUNNING)


if __name__ == "__main__":
    sys.exit(main())
