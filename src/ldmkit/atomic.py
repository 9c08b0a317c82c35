"""Atomic writes: write a temporary file beside the target, then rename it over the target."""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

TMP_SUFFIX = ".tmp"


@contextmanager
def replacing(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name beside ``path`` (same filesystem, so the rename is atomic). When the
    block succeeds the file gets the permissions an ordinary ``open(path, "w")`` would (mkstemp's 0600
    would leave models and images unreadable to other users) and replaces ``path``; when it fails the
    file is removed and ``path`` keeps its previous complete content."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=TMP_SUFFIX)
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


def remove_leftovers(folder: str | os.PathLike) -> list[Path]:
    """Delete the temporary files of ``replacing`` that a killed process (kill -9, power loss) left in
    ``folder``: ``.NAME.XXXXXXXX.tmp``. Call it only where no other process is writing (a run folder at
    its start). Returns what was removed."""
    removed = []
    for p in Path(folder).glob(f".*{TMP_SUFFIX}"):
        # ".{name}.{mkstemp's 8 random characters}.tmp": the target's name is in it, and it is a file
        stem = p.name[1:-len(TMP_SUFFIX)]
        name, _, rand = stem.rpartition(".")
        if name and len(rand) == 8 and p.is_file() and not p.is_symlink():
            p.unlink(missing_ok=True)
            removed.append(p)
    return removed


def cache_file(prefix: str, key: str, suffix: str) -> Path:
    """A file in the user's cache folder (``LDMKIT_CACHE_DIR``, else ``$XDG_CACHE_HOME/ldmkit`` or
    ``~/.cache/ldmkit``) named by a hash of ``key``: put into the key whatever invalidates the content
    (a source file's path, size and modification time)."""
    root = os.environ.get("LDMKIT_CACHE_DIR") or Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    sub = "" if os.environ.get("LDMKIT_CACHE_DIR") else "ldmkit"
    return Path(root) / sub / f"{prefix}-{hashlib.sha256(key.encode()).hexdigest()[:16]}{suffix}"
