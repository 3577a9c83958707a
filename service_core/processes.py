"""Process plumbing both the API's `serve` command and the worker need: a child that dies
with its parent (the API starts the worker this way; the worker starts each job so)."""

from __future__ import annotations

import ctypes
import sys

PR_SET_PDEATHSIG = 1


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent (the thread that
    started it) dies; it survives ``execve``. Linux only: False elsewhere."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_PDEATHSIG, int(sig), 0, 0, 0) == 0
    except (OSError, AttributeError):  # pragma: no cover - no prctl: the watcher remains
        return False
