"""Connecting to Ray with a bound: a dead address fails in seconds with what to do, never retries forever.

``ray.init()`` without an address connects to ``RAY_ADDRESS`` when set, else to the address that the last
``ray start`` wrote to ``ray_current_cluster`` in Ray's temporary directory, else starts a local instance. Two of
those can hang: a ``RAY_ADDRESS`` nobody listens on, and a ``ray_current_cluster`` file left behind by a
``ray start --head`` whose processes died (Ray keeps trying to reach the GCS it names). ``connect`` first tries a
TCP connection to the address, within ``timeout_s``:

- ``RAY_ADDRESS`` given and not answering: ``RayConnectError`` naming it and saying what to do;
- the address came from a stale ``ray_current_cluster``: a warning naming the file, and a local instance starts
  (the same as when there is no file); ``ray stop`` removes it;
- ``RAY_ADDRESS=auto`` and a stale file: ``RayConnectError``;
- ``RAY_ADDRESS=local`` (or unset with no file): a local instance; ``ray://`` client addresses are passed to Ray.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from pathlib import Path

LOG = logging.getLogger("smarttrim.ray")
CONNECT_TIMEOUT_S = 30.0


class RayConnectError(ConnectionError):
    """The Ray address to use does not answer (raised before any work, never retried)."""


def _answers(address: str, timeout_s: float) -> bool:
    """Whether something accepts TCP connections at ``host:port`` within ``timeout_s`` (retried each second: a
    head that is just starting gets the whole bound)."""
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit():
        return True  # not host:port (e.g. a name Ray resolves itself): leave it to Ray
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host.strip("[]"), int(port)), timeout=min(5.0, timeout_s)):
                return True
        except OSError:
            if time.monotonic() >= deadline:
                return False
            time.sleep(1.0)


def _recorded_address() -> tuple[str | None, str]:
    """The address the last ``ray start`` recorded, and the file it is in (Ray's own lookup)."""
    try:
        from ray._common.utils import get_ray_address_file
    except ImportError:  # a Ray that keeps it elsewhere: let ray.init() decide
        return None, "ray_current_cluster"
    where = get_ray_address_file(None)
    try:
        return Path(where).read_text().strip() or None, where
    except OSError:
        return None, where


def connect(timeout_s: float = CONNECT_TIMEOUT_S) -> str:
    """Initialise Ray in this process (no-op when it is); returns what happened, for the log: ``connected to
    ADDRESS`` or ``started a local instance``."""
    import ray

    if ray.is_initialized():
        return "already connected"
    address = os.environ.get("RAY_ADDRESS", "").strip()
    if address == "local":
        ray.init()
        return "started a local instance (RAY_ADDRESS=local)"
    if address.startswith("ray://"):
        ray.init()
        return f"connected to {address} (Ray Client)"
    if address and address != "auto":
        if not _answers(address, timeout_s):
            raise RayConnectError(
                f"RAY_ADDRESS={address}: nothing answers there within {timeout_s:.0f} s. Start the cluster "
                f"(`ray start --head` on that machine), correct RAY_ADDRESS, or set RAY_ADDRESS=local to run on a "
                f"local Ray instance of this machine")
        ray.init()
        return f"connected to {address}"
    recorded, where = _recorded_address()
    if recorded is not None and not _answers(recorded, min(timeout_s, 5.0)):
        if address == "auto":  # "connect to the running cluster": there is none
            raise RayConnectError(f"RAY_ADDRESS=auto: {where} names {recorded}, which does not answer; start the "
                                  "cluster, or run `ray stop` (removes the stale file) or set RAY_ADDRESS=local")
        LOG.warning("%s names %s, which does not answer (a `ray start` whose processes have died; `ray stop` "
                    "removes the file): starting a local Ray instance instead", where, recorded)
        ray.init(address="local")
        return f"started a local instance ({where} was stale)"
    ray.init(address=address or None)
    return f"connected to {recorded}" if recorded is not None else "started a local instance"


__all__ = ["CONNECT_TIMEOUT_S", "RayConnectError", "connect"]
