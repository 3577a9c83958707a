"""Browser sessions of the dashboard: an opaque random token in an HttpOnly cookie, and on
the server a small file per session naming the API key it stands for.

Why files under ``DAS_DATA_DIR``: every API process of a deployment shares that folder (the
checkpoints live there), so a session made by one process is seen by all, logout deletes it
for all, and no table (no migration) is needed. The file is named by the SHA-256 of the
token: the folder never holds a usable cookie, and the API key itself is never stored (only
its row id; the row is read on every request, so a revoked key ends its sessions at once).
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path

COOKIE = "das_session"
CSRF_HEADER = "X-CSRF-Token"
LIFETIME_S = 12 * 3600
_TOKEN = re.compile(r"[A-Za-z0-9_-]{43}")  # secrets.token_urlsafe(32)


@dataclass(frozen=True)
class BrowserSession:
    key_id: int
    owner: str
    csrf: str
    expires: float


def _folder(data_dir: Path) -> Path:
    return data_dir / "ui-sessions"


def _file(data_dir: Path, token: str) -> Path:
    return _folder(data_dir) / hashlib.sha256(token.encode("ascii")).hexdigest()


def _well_formed(token: str) -> bool:
    return _TOKEN.fullmatch(token) is not None


def open_session(data_dir: Path, key_id: int, owner: str) -> tuple[str, BrowserSession]:
    """A new session for the key: (the cookie's token, what the server keeps)."""
    token = secrets.token_urlsafe(32)
    session = BrowserSession(key_id, owner, secrets.token_urlsafe(32), time.time() + LIFETIME_S)
    folder = _folder(data_dir)
    folder.mkdir(parents=True, exist_ok=True)
    path = _file(data_dir, token)
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump(session.__dict__, fh)
    os.replace(tmp, path)
    _sweep(folder)
    return token, session


def read_session(data_dir: Path, token: str) -> BrowserSession | None:
    """The live session of a cookie's token, or None (unknown, malformed or expired)."""
    if not _well_formed(token):
        return None
    path = _file(data_dir, token)
    try:
        raw = json.loads(path.read_text())
        session = BrowserSession(
            int(raw["key_id"]), str(raw["owner"]), str(raw["csrf"]), float(raw["expires"])
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if session.expires < time.time():
        path.unlink(missing_ok=True)
        return None
    return session


def close_session(data_dir: Path, token: str) -> None:
    if _well_formed(token):
        _file(data_dir, token).unlink(missing_ok=True)


def csrf_ok(session: BrowserSession, sent: str | None) -> bool:
    return sent is not None and hmac.compare_digest(session.csrf.encode(), sent.encode())


def _sweep(folder: Path, every: int = 64) -> None:
    """Now and then (one login in ``every``), delete the expired sessions' files."""
    if secrets.randbelow(every):
        return
    now = time.time()
    for path in folder.iterdir():
        try:
            if json.loads(path.read_text()).get("expires", 0) < now:
                path.unlink(missing_ok=True)
        except (OSError, ValueError, AttributeError):
            continue
