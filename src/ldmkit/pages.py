"""Giving memory-mapped weights' pages back to the kernel (Linux ``madvise(MADV_PAGEOUT)``).

Weights read from a ``.safetensors`` file are views into a private mapping of the file: the
pages a network touched stay resident (and count in the process's RSS) until the mapping goes,
even when that network is idle. ``MADV_PAGEOUT`` (Linux >= 5.4) asks the kernel to reclaim them
now; clean file pages are simply dropped and read back from the file (or the page cache) on the
next access. It is safe on any memory: pages that were written to (copy-on-write, anonymous)
cannot be dropped without swap and are left alone, so no data is ever lost, unlike
``MADV_DONTNEED``, which would zero written pages. Elsewhere (other systems) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys
from collections.abc import Iterable

from torch import Tensor

_MADV_PAGEOUT = 21
_PAGE = 4096
_libc = None


def _madvise():
    global _libc
    if _libc is None:
        lib = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        lib.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        lib.madvise.restype = ctypes.c_int
        _libc = lib
    return _libc.madvise


def page_out(tensors: Iterable[Tensor]) -> int:
    """Ask the kernel to reclaim the whole pages inside these CPU tensors; returns the bytes advised.

    Only pages entirely inside a tensor are advised (a neighbour sharing the edge page may be in use).
    """
    if not sys.platform.startswith("linux"):
        return 0
    madvise, done = _madvise(), 0
    for t in tensors:
        if t.device.type != "cpu" or t.numel() == 0 or not t.is_contiguous():
            continue
        start = (t.data_ptr() + _PAGE - 1) // _PAGE * _PAGE
        end = (t.data_ptr() + t.numel() * t.element_size()) // _PAGE * _PAGE
        if end > start and madvise(start, end - start, _MADV_PAGEOUT) == 0:
            done += end - start
    return done


def file_backed_ranges() -> list[tuple[int, int]]:
    """Address ranges of this process's file mappings (from /proc/self/maps; empty elsewhere)."""
    ranges = []
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                fields = line.split(maxsplit=5)
                # fields: address perms offset dev inode [path]; inode 0 means anonymous memory
                if len(fields) == 6 and fields[4] != "0" and fields[5].startswith("/"):
                    lo, hi = fields[0].split("-")
                    ranges.append((int(lo, 16), int(hi, 16)))
    except OSError:
        pass
    return ranges


def is_file_backed(t: Tensor, ranges: list[tuple[int, int]]) -> bool:
    """Whether ``t``'s memory lies in one of ``ranges`` (see ``file_backed_ranges``)."""
    p = t.data_ptr()
    return any(lo <= p < hi for lo, hi in ranges)
