"""Ray token authentication: where Ray finds the token, and how the helpers here make one.

Ray (2.60; C++ ``AuthenticationTokenLoader::TryLoadTokenFromSources``, used by every Ray process and by the
Python clients) reads the token from the first of:

1. ``RAY_AUTH_TOKEN``: the token itself (non-empty);
2. ``RAY_AUTH_TOKEN_PATH``: a file whose first line is the token; set but missing/empty is an error, with no
   fallback to 3;
3. ``$HOME/.ray/auth_token``, where ``ray get-auth-token --generate`` writes.

Token authentication is on for a process when ``RAY_AUTH_MODE=token`` is in its environment; every node's
``ray start`` and every client (``ray job submit``, ``ray.init``) needs it.
"""

from __future__ import annotations

import os
import secrets
import sys
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"
TOKEN_PATH_ENV = "RAY_AUTH_TOKEN_PATH"


def default_token_path(env: Mapping[str, str]) -> Path:
    """``$HOME/.ray/auth_token`` as Ray resolves it (HOME of the given environment)."""
    return Path(env.get("HOME") or Path.home()) / ".ray" / "auth_token"


@dataclass(frozen=True)
class TokenSource:
    """Where the token comes from: ``kind`` is ``env`` (RAY_AUTH_TOKEN), ``path`` (RAY_AUTH_TOKEN_PATH),
    ``default`` (~/.ray/auth_token) or ``none``; ``path`` is the file for the last three."""

    kind: str
    path: Path | None = None

    @property
    def found(self) -> bool:
        if self.kind == "env":
            return True
        return self.path is not None and bool(read_token(self.path))

    def describe(self) -> str:
        if self.kind == "env":
            return f"${TOKEN_ENV}"
        if self.kind == "path":
            return f"{self.path} (${TOKEN_PATH_ENV})"
        return f"{self.path} (default path)"


def find_token(env: Mapping[str, str]) -> TokenSource:
    """The source Ray would use in this environment, with Ray's precedence (the file may not exist yet)."""
    if env.get(TOKEN_ENV, "").strip():
        return TokenSource("env")
    if env.get(TOKEN_PATH_ENV, ""):
        return TokenSource("path", Path(env[TOKEN_PATH_ENV]).expanduser().absolute())
    return TokenSource("default", default_token_path(env))


def read_token(path: Path) -> str:
    """The token in ``path`` (first line, stripped, as Ray reads it), or "" if the file is missing or empty."""
    try:
        with open(path) as f:
            return f.readline().strip()
    except OSError:
        return ""


def generate_token_file(path: Path) -> str:
    """Write a new random token (256 bits, hex, as ``ray get-auth-token --generate``) to ``path``, readable by
    the owner only; the file appears atomically. Returns the token."""
    token = secrets.token_hex(32)
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(token)
    os.replace(tmp, path)
    return token


def warn_if_readable_by_others(path: Path) -> None:
    """A token file readable by group/others lets other local users run code on the cluster."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return
    if mode & 0o077:
        print(f"warning: token file {path} is readable by other users (mode {mode & 0o777:o}); "
              f"run: chmod 600 {path}", file=sys.stderr)


def ray_executable() -> str:
    """The ``ray`` CLI of the running interpreter's environment (a venv's bin/), else the one on PATH."""
    candidate = Path(sys.executable).parent / "ray"
    return str(candidate) if candidate.exists() else "ray"
