"""Atomic writes: write a temporary file beside the target, then rename it over the target."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path


def temp_beside(path: Path) -> str:
    """A new empty file next to ``path``: same filesystem, so :func:`commit` renames atomically."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    return tmp


def commit(tmp: str | os.PathLike, path: Path) -> None:
    """Give ``tmp`` the permissions an ordinary ``open(path, "w")`` would (mkstemp's 0600 would leave
    models and images unreadable to other users), then rename it over ``path``."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)
