"""Start (or stop) a LOCAL Ray head with token authentication; the dashboard/job API binds to 127.0.0.1.

Usage:
  python cluster/local_head.py [start] [options] [-- extra `ray start` arguments]
  python cluster/local_head.py stop --temp-dir DIR

`start` runs `ray start --head --block` in the foreground (Ctrl-C stops this head, and only this head: no
global `ray stop`); with --background it detaches and `stop` ends it later. Once the dashboard answers, it
prints the dashboard address and how to submit the pipeline, plus one machine-readable line
`RAY_HEAD_READY {json}` (also written to <temp-dir>/local_head.json).

Token: $RAY_AUTH_TOKEN if set, else the file in --token-file / $RAY_AUTH_TOKEN_PATH / ~/.ray/auth_token
(Ray's own order); a missing file is created with a new random token (mode 600). Ray processes get
RAY_AUTH_MODE=token and the token location through their environment.

Examples:
  python cluster/local_head.py                                  # ports 6379/8265, temp dir /tmp/ray
  python cluster/local_head.py --free-ports --temp-dir /tmp/rh1 --token-file /tmp/rh1.token --background
  python cluster/local_head.py stop --temp-dir /tmp/rh1
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _auth  # noqa: E402  (sibling module; this directory is not a package)

STATE_FILE = "local_head.json"
LOG_FILE = "local_head.log"
READY_PREFIX = "RAY_HEAD_READY "
# `ray start` port flags that --free-ports fills (any not given explicitly); the head's own ports, so that
# several heads (e.g. parallel tests) can run on one machine.
PORT_FLAGS = ("port", "dashboard_port", "node_manager_port", "object_manager_port", "ray_client_server_port",
              "dashboard_agent_listen_port", "dashboard_agent_grpc_port", "runtime_env_agent_port",
              "metrics_export_port")
DEFAULT_PORTS = {"port": 6379, "dashboard_port": 8265}


def parse_args(argv: list[str]) -> tuple[argparse.Namespace, list[str]]:
    extra: list[str] = []
    if "--" in argv:
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                usage="%(prog)s [start|stop] [options] [-- ray start args]")
    p.add_argument("action", nargs="?", choices=("start", "stop"), default="start")
    p.add_argument("--temp-dir", type=Path, default=Path(tempfile.gettempdir()) / "ray",
                   help="Ray's --temp-dir (sessions, logs, sockets); keep it short (<~60 chars: socket paths) "
                        "(default: %(default)s)")
    p.add_argument("--port", type=int, help="GCS port (default 6379, or a free one with --free-ports)")
    p.add_argument("--dashboard-port", type=int,
                   help="dashboard / job API port on 127.0.0.1 (default 8265, or a free one with --free-ports)")
    p.add_argument("--free-ports", action="store_true",
                   help="pick free ports for every head port not given (GCS, dashboard, agents, client server)")
    p.add_argument("--node-ip-address", help="this node's IP (default: Ray detects it; Ray never uses 127.0.0.1)")
    p.add_argument("--num-cpus", type=int, help="CPUs to advertise (default: all)")
    p.add_argument("--num-gpus", type=int, help="GPUs to advertise (default: detected)")
    p.add_argument("--token-file", type=Path,
                   help="token file (default: $RAY_AUTH_TOKEN_PATH, else ~/.ray/auth_token; created if missing)")
    p.add_argument("--background", action="store_true", help="detach; log to <temp-dir>/local_head.log")
    p.add_argument("--timeout", type=float, default=120.0, help="seconds to wait for the dashboard (default: 120)")
    p.add_argument("--stop-timeout", type=float, default=30.0,
                   help="seconds a graceful stop may take before the head's processes are killed (default: 30)")
    return p.parse_args(argv), extra


def free_ports(n: int) -> list[int]:
    """n distinct ports free right now on all interfaces (kept bound until all are chosen)."""
    socks = []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("", 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def choose_ports(args: argparse.Namespace) -> dict[str, int]:
    given = {k: getattr(args, k) for k in ("port", "dashboard_port") if getattr(args, k) is not None}
    if not args.free_ports:
        return {**DEFAULT_PORTS, **given}
    missing = [k for k in PORT_FLAGS if k not in given]
    return {**given, **dict(zip(missing, free_ports(len(missing)), strict=True))}


def ports_in_use(ports: dict[str, int]) -> list[str]:
    """The chosen ports something else already listens on (e.g. another Ray's 6379/8265): starting there would
    fail, or worse, the readiness check would talk to the other instance."""
    busy = []
    for key, port in ports.items():
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind(("", port))
            except OSError:
                busy.append(f"--{key.replace('_', '-')} {port}")
    return busy


def token_env(args: argparse.Namespace) -> tuple[dict[str, str], _auth.TokenSource, str]:
    """The environment for Ray processes (token mode + token location) and the token itself; creates the
    token file if it does not exist."""
    env = dict(os.environ)
    if args.token_file is not None:
        env.pop(_auth.TOKEN_ENV, None)
        env[_auth.TOKEN_PATH_ENV] = str(args.token_file.expanduser().resolve())
    source = _auth.find_token(env)
    if source.kind == "env":
        token = env[_auth.TOKEN_ENV].strip()
    else:
        assert source.path is not None
        token = _auth.read_token(source.path)
        if not token:
            token = _auth.generate_token_file(source.path)
            print(f"Generated a new Ray auth token in {source.path}", file=sys.stderr)
        _auth.warn_if_readable_by_others(source.path)
        if source.kind == "path":
            env[_auth.TOKEN_PATH_ENV] = str(source.path)
    env[_auth.MODE_ENV] = "token"
    env["RAY_USAGE_STATS_ENABLED"] = "0"
    # job entrypoints run `python ...` from PATH: make that this interpreter's environment (e.g. the venv)
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    return env, source, token


def ray_start_command(args: argparse.Namespace, ports: dict[str, int], extra: list[str]) -> list[str]:
    cmd = [_auth.ray_executable(), "start", "--head", "--block", "--temp-dir", str(args.temp_dir),
           "--include-dashboard", "true", "--dashboard-host", "127.0.0.1", "--disable-usage-stats"]
    if args.node_ip_address:
        cmd += ["--node-ip-address", args.node_ip_address]
    for key, value in ports.items():
        cmd += [f"--{key.replace('_', '-')}", str(value)]
    if args.num_cpus is not None:
        cmd += ["--num-cpus", str(args.num_cpus)]
    if args.num_gpus is not None:
        cmd += ["--num-gpus", str(args.num_gpus)]
    return cmd + extra


def wait_for_dashboard(url: str, token: str, proc: subprocess.Popen, timeout: float,
                       stop_requested: Callable[[], bool]) -> str | None:
    """Poll the job API until it answers an authenticated request; returns the cluster's auth mode (None if a
    stop was requested meanwhile)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if stop_requested():
            return None
        if proc.poll() is not None:
            raise RuntimeError(f"`ray start` exited with code {proc.returncode} before the dashboard came up")
        try:
            req = urllib.request.Request(f"{url}/api/version", headers={"Authorization": f"Bearer {token}"})
            with urllib.request.urlopen(req, timeout=2):
                pass
            with urllib.request.urlopen(f"{url}/api/authentication_mode", timeout=2) as r:
                return json.load(r).get("authentication_mode", "?")
        except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
            time.sleep(0.5)
    raise TimeoutError(f"the dashboard at {url} did not answer within {timeout:.0f} s")


def gcs_address(temp_dir: Path, port: int, proc: subprocess.Popen, timeout: float = 30.0) -> str:
    """The GCS address (node IP: port) that `ray start` records in <temp-dir>/ray_current_cluster, once it is
    this head's (the file may still hold an earlier head's address)."""
    path = temp_dir / "ray_current_cluster"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        with contextlib.suppress(OSError):
            address = path.read_text().strip()
            if address.endswith(f":{port}"):
                return address
        time.sleep(0.2)
    return f"<this node's IP>:{port}"


def _proc_state(pid: int) -> str | None:
    """Linux process state letter ('Z' = zombie), None if there is no such process."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2:].split()[0]


def alive(pid: int) -> bool:
    if Path("/proc").is_dir():
        return _proc_state(pid) not in (None, "Z")
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) members of a process group."""
    if not Path("/proc").is_dir():
        try:
            os.killpg(pgid, 0)
            return [pgid]
        except ProcessLookupError:
            return []
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                stat = (d / "stat").read_text()
            except OSError:
                continue
            state, _ppid, pgrp = stat[stat.rindex(")") + 2:].split()[:3]
            if int(pgrp) == pgid and state != "Z":
                pids.append(int(d.name))
    return pids


def _wait(condition: Callable[[], bool], timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.2)
    return True


def _ray_start_preexec() -> None:
    """For `ray start`: its own process group (a terminal's Ctrl-C reaches only this helper, which stops Ray in
    order; signalling all Ray processes at once can hang the raylet) and, on Linux, SIGTERM when this helper
    dies, so no head is left orphaned."""
    os.setpgid(0, 0)
    if sys.platform.startswith("linux"):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG


def stop_head(proc: subprocess.Popen, timeout: float) -> int:
    """SIGTERM `ray start --block` (it stops its Ray processes in order); if it or any process of its group is
    still there after ``timeout`` seconds, SIGKILL the group. Workers (own groups) exit with their raylet."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        rc = proc.wait(timeout)
    except subprocess.TimeoutExpired:
        rc = None
    if rc is None or not _wait(lambda: not group_members(proc.pid), 10):
        print(f"warning: the head did not stop within {timeout:.0f} s; killing process group {proc.pid}",
              file=sys.stderr)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        rc = proc.wait()
        _wait(lambda: not group_members(proc.pid), 10)
    return rc


def print_summary(state: dict) -> None:
    url, token_hint = state["dashboard"], state["token_env"]
    print(f"""
Ray head is up, token authentication: {state['auth_mode']}
  dashboard / job API  {url}   (bound to 127.0.0.1 only)
  GCS address          {state['gcs_address']}
  token                {state['token']}
  temp dir             {state['temp_dir']}
Submit the pipeline:
  {token_hint}python cluster/submit.py --address {url} --config pipeline/configs/quickstart.yaml
or with Ray's CLI:
  {token_hint}RAY_AUTH_MODE=token ray job submit --address {url} --working-dir . -- \\
      python -m pipeline.run all --config pipeline/configs/quickstart.yaml
Stop: {'Ctrl-C' if not state['background'] else f"python cluster/local_head.py stop --temp-dir {state['temp_dir']}"}
""", flush=True)


def start(args: argparse.Namespace, extra: list[str]) -> int:
    args.temp_dir = args.temp_dir.expanduser().resolve()
    args.temp_dir.mkdir(parents=True, exist_ok=True)
    if args.background:
        return start_background(args)
    env, source, token = token_env(args)
    ports = choose_ports(args)
    busy = ports_in_use(ports)
    if busy:
        print(f"error: port(s) in use: {', '.join(busy)} (another Ray instance?); pick others or use --free-ports",
              file=sys.stderr)
        return 1
    cmd = ray_start_command(args, ports, extra)
    stop_requested = False

    def on_signal(_signum: int, _frame: object) -> None:
        nonlocal stop_requested
        stop_requested = True

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    print("+ " + " ".join(cmd), file=sys.stderr, flush=True)
    proc = subprocess.Popen(cmd, env=env, preexec_fn=_ray_start_preexec)
    state_path = args.temp_dir / STATE_FILE
    try:
        url = f"http://127.0.0.1:{ports['dashboard_port']}"
        try:
            mode = wait_for_dashboard(url, token, proc, args.timeout, lambda: stop_requested)
        except (RuntimeError, TimeoutError) as e:
            print(f"error: {e}", file=sys.stderr)
            stop_head(proc, args.stop_timeout)
            return 1
        if mode is None:  # asked to stop while starting
            stop_head(proc, args.stop_timeout)
            return 0
        gcs = gcs_address(args.temp_dir, ports["port"], proc)
        state = {"pid": os.getpid(), "ray_pgid": proc.pid, "dashboard": url, "gcs_address": gcs, "ports": ports,
                 "temp_dir": str(args.temp_dir), "token": source.describe(),
                 "token_env": f"RAY_AUTH_TOKEN_PATH={source.path} " if source.kind == "path" else "",
                 "auth_mode": mode, "background": os.environ.get("_LOCAL_HEAD_BACKGROUND") == "1"}
        tmp = state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state))
        tmp.replace(state_path)
        print_summary(state)
        print(READY_PREFIX + json.dumps(state), flush=True)
        while proc.poll() is None and not stop_requested:
            time.sleep(0.2)
        if stop_requested:
            stop_head(proc, args.stop_timeout)
            return 0
        print(f"error: `ray start` exited with code {proc.returncode}", file=sys.stderr)
        stop_head(proc, args.stop_timeout)  # whatever it left behind
        return proc.returncode or 1
    finally:
        if proc.poll() is None:
            stop_head(proc, args.stop_timeout)
        with contextlib.suppress(OSError, ValueError):
            if json.loads(state_path.read_text()).get("pid") == os.getpid():
                state_path.unlink()


def start_background(args: argparse.Namespace) -> int:
    """Re-run this script detached (own session, output to <temp-dir>/local_head.log); `stop` ends it."""
    argv = sys.argv[1:]
    extra = argv[argv.index("--"):] if "--" in argv else []
    argv = [a for a in argv[: len(argv) - len(extra)] if a != "--background"]
    argv += ["--temp-dir", str(args.temp_dir), *extra]  # resolved; the last --temp-dir wins
    log_path = args.temp_dir / LOG_FILE
    state_path = args.temp_dir / STATE_FILE
    state_path.unlink(missing_ok=True)
    with open(log_path, "ab") as log:
        proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), *argv], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, "_LOCAL_HEAD_BACKGROUND": "1"})
    deadline = time.monotonic() + args.timeout + 10
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            print(f"error: the head exited (code {proc.returncode}); log: {log_path}", file=sys.stderr)
            print(log_path.read_text()[-3000:], file=sys.stderr)
            return 1
        try:
            state = json.loads(state_path.read_text())
        except (OSError, ValueError):
            state = {}
        if state.get("pid") == proc.pid:
            print_summary(state)
            print(f"log: {log_path}")
            print(READY_PREFIX + json.dumps(state), flush=True)
            return 0
        time.sleep(0.5)
    print(f"error: the head did not come up in time; log: {log_path}", file=sys.stderr)
    proc.send_signal(signal.SIGTERM)
    return 1


def stop(args: argparse.Namespace) -> int:
    """Stop the head that `start --background` left in --temp-dir (that head's processes only)."""
    state_path = args.temp_dir.expanduser().resolve() / STATE_FILE
    try:
        state = json.loads(state_path.read_text())
    except (OSError, ValueError):
        print(f"error: no running head recorded in {state_path}", file=sys.stderr)
        return 1
    pid, ray_pgid = state["pid"], state["ray_pgid"]
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().decode(errors="replace")
    except OSError:
        cmdline = "local_head.py" if alive(pid) else ""  # no /proc: trust the state file
    if "local_head.py" not in cmdline or not alive(pid):  # gone, or the pid now belongs to something else
        print(f"no head running (pid {pid}); removing {state_path}", file=sys.stderr)
        state_path.unlink(missing_ok=True)
        return 0
    os.kill(pid, signal.SIGTERM)  # the helper stops `ray start` gracefully, then kills what is left
    if not _wait(lambda: not alive(pid), args.stop_timeout + 20):
        for target in (lambda: os.killpg(ray_pgid, signal.SIGKILL), lambda: os.kill(pid, signal.SIGKILL)):
            with contextlib.suppress(ProcessLookupError):
                target()
        _wait(lambda: not alive(pid) and not group_members(ray_pgid), 10)
    state_path.unlink(missing_ok=True)
    print(f"stopped the head in {state['temp_dir']}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args, extra = parse_args(sys.argv[1:] if argv is None else argv)
    return stop(args) if args.action == "stop" else start(args, extra)


if __name__ == "__main__":
    sys.exit(main())
