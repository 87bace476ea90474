"""Cluster pieces: ray_cluster.yaml passes the Ray launcher's own validation (and a broken copy does not), and a
local head started by cluster/local_head.py with token authentication runs a job submitted by cluster/submit.py
with the token, refuses one without it or with a wrong one, and serves its dashboard on 127.0.0.1 only.

The head is isolated: free ports, its own --temp-dir, its token in a temporary file named by
RAY_AUTH_TOKEN_PATH (~/.ray/auth_token, which other tests' ray.init() use, is never touched), and teardown
stops exactly the processes of this head (never `ray stop`, which would kill every Ray on the machine).
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
import json
import os
import re
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import tomllib
import urllib.request
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from conftest import TINY_PIPELINE

ROOT = Path(__file__).resolve().parents[1]
CLUSTER_YAML = ROOT / "ray_cluster.yaml"
LOCAL_HEAD = ROOT / "cluster" / "local_head.py"
SUBMIT = ROOT / "cluster" / "submit.py"
HEAD_CPUS = 0
"""As ``ray_cluster.yaml``'s head: no CPU, so every stage runs on the worker node (started separately)."""
WORKER_CPUS = 2

# What the test job runs: connect to the cluster from the job's driver and print its resources. Switch to the
# pipeline once it exists, e.g. "python -m pipeline.run all --config pipeline/configs/quickstart.yaml", and
# update check_entrypoint_output with it.
ENTRYPOINT = ("python -c 'import json, ray; ray.init(); "
              "print(\"RESOURCES\", json.dumps(ray.cluster_resources()))'")


def check_entrypoint_output(output: str) -> None:
    """The job's driver reached THIS cluster: it reports its CPU count (the worker node's: the head has none)."""
    m = re.search(r"^RESOURCES (\{.*\})$", output, re.M)
    assert m, output[-3000:]
    assert json.loads(m.group(1))["CPU"] == HEAD_CPUS + WORKER_CPUS


# ------------------------------------------------------------------------------------------ ray_cluster.yaml

def load_cluster_config() -> dict:
    return yaml.safe_load(CLUSTER_YAML.read_text())


def ray_validate(config: dict) -> dict:
    """What `ray up` does to a config before touching the cloud (commands._bootstrap_config): prepare_config
    (defaults merged, docker config checked, per-type worker bounds) then validate_config (ray-schema.json and
    the cross-field checks). Only the provider's bootstrap, which needs AWS credentials, is left out."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    prepared = prepare_config(copy.deepcopy(config))
    validate_config(prepared)
    return prepared


def test_cluster_yaml_passes_ray_validation() -> None:
    config = load_cluster_config()
    prepared = ray_validate(config)
    assert prepared["provider"]["type"] == "aws"
    workers = {k: v for k, v in prepared["available_node_types"].items() if k != prepared["head_node_type"]}
    assert workers and all(v["resources"].get("GPU", 0) > 0 for v in workers.values())
    assert sum(v["max_workers"] for v in workers.values()) <= prepared["max_workers"]


def _unknown_field(c: dict) -> None:
    c["available_node_types"]["gpu.a10g.x4"]["max_wrokers"] = 4


def _bad_type(c: dict) -> None:
    c["max_workers"] = "six"


def _unknown_head(c: dict) -> None:
    c["head_node_type"] = "ray.head.gpu"


def _min_over_max(c: dict) -> None:
    c["available_node_types"]["gpu.a10g.x4"]["min_workers"] = c["max_workers"] + 1


@pytest.mark.parametrize("breakage", [_unknown_field, _bad_type, _unknown_head, _min_over_max])
def test_broken_cluster_yaml_fails_ray_validation(breakage) -> None:
    import jsonschema

    config = load_cluster_config()
    breakage(config)
    with pytest.raises((jsonschema.ValidationError, ValueError)):
        ray_validate(config)


def test_cluster_yaml_token_auth_loopback_dashboard_and_pins() -> None:
    config = load_cluster_config()
    starts = [c for c in config["head_start_ray_commands"] + config["worker_start_ray_commands"]
              if "ray start" in c]
    assert len(starts) == 2
    for cmd in starts:
        assert re.search(r"\bRAY_AUTH_MODE=token ray start\b", cmd), cmd
        assert "0.0.0.0" not in cmd
    assert "--dashboard-host=127.0.0.1" in config["head_start_ray_commands"][-1]
    # the token reaches every node at Ray's default token path (the head re-syncs file_mounts to workers)
    assert config["file_mounts"]["~/.ray/auth_token"] == "~/.ray/auth_token"
    assert config["file_mounts"]["~/smarttrim"] == "."
    assert any("pip install" in c and "-e ~/smarttrim" in c for c in config["setup_commands"])
    # the image's Ray and Python are the versions pyproject.toml pins
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    ray_pin = next(d for d in project["dependencies"] if d.startswith("ray[")).split("==")[1]
    assert project["requires-python"] == ">=3.11,<3.12"
    assert config["docker"]["image"] == f"rayproject/ray:{ray_pin}-py311-gpu"
    assert any(f"ray.__version__ == '{ray_pin}'" in c for c in config["setup_commands"])
    # every command is valid shell
    commands = [c for key in ("initialization_commands", "setup_commands", "head_setup_commands",
                              "worker_setup_commands", "head_start_ray_commands", "worker_start_ray_commands")
                for c in config[key]]
    for cmd in commands:
        out = subprocess.run(["bash", "-n", "-c", cmd], capture_output=True, text=True)
        assert out.returncode == 0, (cmd, out.stderr)


# ------------------------------------------------------------------------------- a local head with token auth

@dataclass(frozen=True)
class Head:
    state: dict         # what local_head.py printed after RAY_HEAD_READY
    env: dict           # environment with this head's token (RAY_AUTH_TOKEN_PATH)
    token_file: Path
    default_token_before: tuple | None
    shared: Path        # SMARTTRIM_RUNS_ROOT of both nodes: the "shared mount" a relative runs_dir resolves under
    worker_cwd: Path    # the worker node's working directory (not the head's, not the repository)
    worker_node: str    # its Ray node id


def _file_fingerprint(path: Path) -> tuple | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return None
    return st.st_mtime_ns, st.st_mode, hashlib.sha256(path.read_bytes()).hexdigest()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _start_worker(gcs: str, env: dict, cwd: Path, temp_dir: Path, log_path: Path) -> tuple[subprocess.Popen, str]:
    """A second node: ``ray start --address`` in its own process group, working directory and Ray temp dir (as on
    another machine: a node sharing the head's would unpack jobs into the directory the head's driver runs in),
    with the worker CPUs and ports of its own (two raylets on one machine), waiting until the cluster counts its
    CPUs."""
    ports = [f"--{flag}={_free_port()}" for flag in ("node-manager-port", "object-manager-port",
                                                     "dashboard-agent-listen-port", "dashboard-agent-grpc-port",
                                                     "runtime-env-agent-port", "metrics-export-port")]
    ray_bin = str(Path(sys.executable).parent / "ray")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([ray_bin, "start", f"--address={gcs}", f"--num-cpus={WORKER_CPUS}", "--block",
                                 "--disable-usage-stats", f"--temp-dir={temp_dir}", *ports], cwd=cwd,
                                env={**env, "RAY_AUTH_MODE": "token"}, stdout=log, stderr=subprocess.STDOUT,
                                start_new_session=True)
    probe = (f"import json, ray, time; ray.init(address={gcs!r}); t = time.time()\n"
             f"while ray.cluster_resources().get('CPU', 0) < {WORKER_CPUS} and time.time() - t < 90: time.sleep(1)\n"
             "print(json.dumps([n['NodeID'] for n in ray.nodes() if n['Alive'] and n['Resources'].get('CPU')]))\n"
             "print(json.dumps(ray.cluster_resources()))")
    out = subprocess.run([sys.executable, "-c", probe], env={**env, "RAY_AUTH_MODE": "token"}, cwd=cwd,
                         capture_output=True, text=True, timeout=180)
    if out.returncode != 0 or json.loads(out.stdout.splitlines()[-1]).get("CPU", 0) < WORKER_CPUS:
        _stop_worker(proc)
        raise AssertionError(f"the worker node did not join: {out.stdout[-2000:]}{out.stderr[-2000:]}"
                             + log_path.read_text(errors="replace")[-2000:])
    (node,) = json.loads(out.stdout.splitlines()[-2])  # the only node with CPUs
    return proc, node


def _stop_worker(proc: subprocess.Popen) -> None:
    """SIGTERM to the worker's `ray start --block` (it stops its raylet), then SIGKILL its process group."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(timeout=60)
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def _wait_ready(log_path: Path, proc: subprocess.Popen, timeout: float) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in log_path.read_text(errors="replace").splitlines():
            if line.startswith("RAY_HEAD_READY "):
                return json.loads(line.split(" ", 1)[1])
        if proc.poll() is not None:
            break
        time.sleep(0.5)
    raise AssertionError(f"the local head did not come up (exit code {proc.poll()}):\n"
                         + log_path.read_text(errors="replace")[-4000:])


def _stop(proc: subprocess.Popen, temp_dir: Path) -> None:
    """Stop this head only: SIGTERM to the helper (it stops its `ray start --block` in order), then SIGKILL
    whatever of this head is left, i.e. the processes descended from the helper (snapshot taken first: Ray's
    workers run in process groups of their own) and any process naming this head's temp dir."""
    ours: dict[int, psutil.Process] = {}
    try:
        helper = psutil.Process(proc.pid)
        ours = {p.pid: p for p in [helper, *helper.children(recursive=True)]}
    except psutil.NoSuchProcess:
        pass
    for p in psutil.process_iter(["cmdline"]):
        if str(temp_dir) in " ".join(p.info["cmdline"] or []):
            ours.setdefault(p.pid, p)
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # the helper's own session (start_new_session)
        proc.wait()

    def running(p: psutil.Process) -> bool:
        try:
            return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return False

    deadline = time.monotonic() + 15
    while any(running(p) for p in ours.values()) and time.monotonic() < deadline:
        time.sleep(0.2)
    left = [p for p in ours.values() if running(p)]
    for p in left:
        with contextlib.suppress(psutil.NoSuchProcess):
            p.kill()
    psutil.wait_procs(left, timeout=10)
    assert not [p for p in left if running(p)], "processes of the test's head survived SIGKILL"
    if left:
        warnings.warn(f"the test's Ray head did not stop gracefully; killed {[p.pid for p in left]}", stacklevel=1)
    shutil.rmtree(temp_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def head(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Head]:
    work = tmp_path_factory.mktemp("cluster")
    # Ray's temp dir holds Unix sockets (paths < 108 bytes): short, under /tmp
    temp_dir = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    worker_temp = Path(tempfile.mkdtemp(prefix="rw-", dir="/tmp"))
    token_file = work / "token" / "auth_token"  # does not exist yet: local_head.py creates it
    default_token = Path.home() / ".ray" / "auth_token"
    default_before = _file_fingerprint(default_token)
    # no RAY_* from the caller (a ray.init() earlier in this process may have set RAY_AUTH_MODE, RAY_ADDRESS...)
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    env["RAY_AUTH_TOKEN_PATH"] = str(token_file)
    shared = work / "shared"
    env["SMARTTRIM_RUNS_ROOT"] = str(shared)  # as ray_cluster.yaml sets it on every node
    head_cwd, worker_cwd = work / "head-cwd", work / "worker-cwd"
    head_cwd.mkdir()
    worker_cwd.mkdir()
    log_path = work / "head.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, str(LOCAL_HEAD), "--free-ports", "--temp-dir", str(temp_dir),
                                 "--num-cpus", str(HEAD_CPUS)], cwd=head_cwd, env=env, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True)
    worker = None
    try:
        state = _wait_ready(log_path, proc, timeout=120)
        worker, worker_node = _start_worker(state["gcs_address"], env, worker_cwd, worker_temp, work / "worker.log")
        yield Head(state, env, token_file, default_before, shared, worker_cwd, worker_node)
    finally:
        if worker is not None:
            _stop_worker(worker)
        shutil.rmtree(worker_temp, ignore_errors=True)
        _stop(proc, temp_dir)
        assert _file_fingerprint(default_token) == default_before, f"{default_token} was modified"


def _submit_cmd(address: str, *extra: str) -> list[str]:
    return [sys.executable, str(SUBMIT), "--address", address, *extra]


def _submit(env: dict, address: str, *extra: str, timeout: float = 180) -> tuple[int, str]:
    out = subprocess.run(_submit_cmd(address, *extra), cwd=ROOT, env=env, capture_output=True, text=True,
                         timeout=timeout)
    return out.returncode, out.stdout + out.stderr


@pytest.mark.slow
def test_local_head_token_file_and_auth_mode(head: Head) -> None:
    assert head.state["auth_mode"] == "token"
    token = head.token_file.read_text().strip()
    assert re.fullmatch(r"[0-9a-f]{64}", token)
    assert head.token_file.stat().st_mode & 0o777 == 0o600
    assert head.state["token"].startswith(str(head.token_file))


@pytest.mark.slow
def test_job_with_token_succeeds(head: Head) -> None:
    """A small job's driver connects to THIS cluster through token auth."""
    rc, out = _submit(head.env, head.state["dashboard"], "--entrypoint", ENTRYPOINT)
    assert rc == 0, out[-4000:]
    assert re.search(r"job smarttrim-\S+: SUCCEEDED", out), out[-4000:]
    check_entrypoint_output(out)


@pytest.mark.slow
def test_pipeline_job_runs_all_stages(head: Head) -> None:
    """``ray job submit -- python -m pipeline.run all`` (tiny settings) on a two-node token-auth cluster: the driver
    runs on the head (no CPUs), every stage on the worker node (its own working directory), and the report the
    driver writes sees every stage. ``runs_dir`` is the default, relative ``runs``: it resolves under the nodes'
    shared root, not in Ray's job directory (deleted with the job) or a node's working directory."""
    overrides = [*TINY_PIPELINE, "ablations.target=null", "baselines.target=null",
                 "targets=[{name: 2x, token_target_vision: 0.3, token_target_text: 0.5, head_target: 0.4}]"]
    rc, out = _submit(head.env, head.state["dashboard"], "--config", "pipeline/configs/quickstart.yaml",
                      *overrides, timeout=900)
    assert rc == 0, out[-4000:]
    assert re.search(r"job smarttrim-\S+: SUCCEEDED", out), out[-4000:]
    run_dir = head.shared / "runs" / "quickstart"
    report = json.loads((run_dir / "results.json").read_text())
    assert {e["name"] for e in report["results"]} == {"shapes-vqa/backbone", "shapes-vqa/smarttrim-2x",
                                                      "shapes-vqa/majority", "shapes-vqa/text_only"}
    assert "[pipeline] all finished" in out
    markers = [json.loads(m.read_text()) for m in run_dir.glob("*/*.done.json")]
    assert len(markers) == 7  # shard, 2 fine-tunings, 2 evaluations, 2 profiles
    nodes = {m["id"]: m["node"] for m in markers if not m["id"].startswith("finetune/")}  # (0-CPU driver tasks)
    assert set(nodes.values()) == {head.worker_node}, nodes
    assert not list(head.worker_cwd.iterdir()), "nothing lands in the worker node's working directory"


@pytest.mark.slow
def test_job_without_or_with_wrong_token_is_refused(head: Head, tmp_path: Path) -> None:
    empty_home = tmp_path / "home"
    empty_home.mkdir()
    no_token = {k: v for k, v in head.env.items() if k not in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH",
                                                                "RAY_AUTH_MODE")}
    no_token["HOME"] = str(empty_home)  # no ~/.ray/auth_token to fall back on
    wrong = {**no_token, "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    runs = {name: subprocess.Popen(_submit_cmd(head.state["dashboard"], "--submission-id", f"refused-{name}",
                                               "--entrypoint", ENTRYPOINT),
                                   cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            for name, env in (("no-token", no_token), ("wrong-token", wrong))}  # both at once: saves a CLI start
    results = {name: (p.communicate(timeout=180)[0], p.returncode) for name, p in runs.items()}

    out, rc = results["no-token"]
    assert rc == 3, out[-4000:]
    assert "Unauthorized: Missing authentication token" in out, out[-4000:]
    out, rc = results["wrong-token"]
    assert rc == 3, out[-4000:]
    assert "Forbidden: Invalid authentication token" in out, out[-4000:]

    # neither reached the job manager (asked with the right token)
    req = urllib.request.Request(f"{head.state['dashboard']}/api/jobs/",
                                 headers={"Authorization": f"Bearer {head.token_file.read_text().strip()}"})
    with urllib.request.urlopen(req, timeout=30) as r:
        ids = [job.get("submission_id") for job in json.load(r)]
    assert not [i for i in ids if i and i.startswith("refused-")], ids  # (None: drivers not submitted as jobs)


@pytest.mark.slow
def test_dashboard_listens_on_loopback_only(head: Head) -> None:
    port = head.state["ports"]["dashboard_port"]
    listening = [c.laddr.ip for c in psutil.net_connections(kind="inet")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening == ["127.0.0.1"], listening
    node_ip = head.state["gcs_address"].rsplit(":", 1)[0]
    if node_ip.startswith("127."):
        pytest.skip("no non-loopback address to try the dashboard port on")
    with pytest.raises(ConnectionRefusedError), socket.create_connection((node_ip, port), timeout=5):
        pass


def test_helpers_have_usage() -> None:
    for script in (LOCAL_HEAD, SUBMIT):
        out = subprocess.run([sys.executable, str(script), "--help"], capture_output=True, text=True, cwd=ROOT)
        assert out.returncode == 0 and "usage" in out.stdout.lower(), out.stderr
    out = subprocess.run([sys.executable, str(SUBMIT), "--dry-run", "--config", "pipeline/configs/quickstart.yaml",
                          "tasks.0.backbone.max_steps=10"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 0, out.stderr
    cmd = shlex.split(out.stderr.splitlines()[0].removeprefix("+ "))
    assert cmd[1:3] == ["job", "submit"] and "--working-dir" in cmd
    assert cmd[cmd.index("--") + 1:] == ["python", "-m", "pipeline.run", "all", "--config",
                                         "pipeline/configs/quickstart.yaml", "tasks.0.backbone.max_steps=10"]
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    env_vars = json.loads(cmd[cmd.index("--runtime-env-json") + 1])["env_vars"]
    assert env_vars["SMARTTRIM_GIT_COMMIT"] == head, "the job's MLflow runs get the submitted commit"
    # a config the pipeline would refuse is refused before submitting (this was the --help's own example)
    out = subprocess.run([sys.executable, str(SUBMIT), "--dry-run", "--config", "pipeline/configs/quickstart.yaml",
                          "train.max_steps=10"], capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 3 and "train: unknown key" in out.stderr and "nothing submitted" in out.stderr, out.stderr
    help_text = subprocess.run([sys.executable, str(SUBMIT), "--help"], capture_output=True, text=True).stdout
    joined = re.sub(r"\\\n\s*", " ", help_text.split("Examples:", 1)[1])  # continuation lines joined
    examples = [shlex.split(line)[2:] for line in joined.splitlines() if line.strip().startswith("python cluster/")]
    assert len(examples) >= 3, help_text
    for example in examples:  # every example of --help passes the same check
        out = subprocess.run([sys.executable, str(SUBMIT), "--dry-run", *example], capture_output=True, text=True,
                             cwd=ROOT)
        assert out.returncode == 0, (example, out.stderr)
    missing = ROOT / "no-such-dir" / "auth_token"
    out = subprocess.run([sys.executable, str(SUBMIT), "--token-file", str(missing), "--entrypoint", "true"],
                         capture_output=True, text=True, cwd=ROOT)
    assert out.returncode == 3 and f"no token in {missing}" in out.stderr, out.stderr


def test_local_head_refuses_busy_ports(tmp_path: Path) -> None:
    """A port another process (e.g. another Ray's dashboard) listens on is refused before anything starts."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        out = subprocess.run([sys.executable, str(LOCAL_HEAD), "--free-ports", "--dashboard-port", str(port),
                              "--temp-dir", str(tmp_path / "ray"), "--token-file", str(tmp_path / "token")],
                             capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert out.returncode == 1 and f"--dashboard-port {port}" in out.stderr, out.stderr
