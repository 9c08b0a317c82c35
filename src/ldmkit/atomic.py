"""Atomic writes: write a temporary file beside the target, then rename it over the target."""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name beside ``path`` (same filesystem, so the rename is atomic). When the
    block succeeds the file gets the permissions an ordinary ``open(path, "w")`` would (mkstemp's 0600
    would leave models and images unreadable to other users) and replaces ``path``; when it fails the
    file is removed and ``path`` keeps its previous complete content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
