"""The server's temporary /explain pages, bounded (issue 15, hardening 10).

Each distinct /explain request writes a page folder (~2.7 MB of attention maps and images for the
built-in model); kept until shutdown, a client could fill /tmp by varying the prompt. The temporary
folder keeps the most recently used pages only: at most ``MAX_PAGES`` folders and ``MAX_BYTES`` in
all, the oldest (by last use) removed first. A folder the user chose (``explain_dir``) is never pruned.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

MAX_PAGES = 64
MAX_BYTES = 256 << 20


def touch(page_dir: Path) -> None:
    """Mark a page folder as just used (a cache hit), so pruning keeps it longer."""
    try:
        os.utime(page_dir)
    except OSError:
        pass


def _size(folder: Path) -> int:
    total = 0
    for dirpath, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except OSError:
                pass
    return total


def prune(root: Path, keep: Path | None = None) -> list[Path]:
    """Remove the least recently used page folders of ``root`` beyond the limits; never ``keep`` (the page
    just made). Returns the removed folders."""
    try:
        dirs = [d for d in root.iterdir() if d.is_dir() and not d.is_symlink()]
    except OSError:
        return []
    dirs.sort(key=lambda d: d.stat().st_mtime, reverse=True)  # newest first
    if keep is not None:
        dirs.sort(key=lambda d: d != keep)  # stable: keep first, the rest newest first
    removed, total = [], 0
    for i, d in enumerate(dirs):
        total += _size(d)
        if d != keep and (i >= MAX_PAGES or total > MAX_BYTES):
            shutil.rmtree(d, ignore_errors=True)
            removed.append(d)
    return removed
