"""Give freed memory back to the OS after a burst (glibc keeps freed heap pages otherwise).

Decoded tensors and batches of a few MB come from malloc's heap once glibc has raised its
mmap threshold; after an attack or a burst those pages stay in the worker's RSS although
nothing uses them. ``malloc_trim(0)`` returns them. No-op where glibc is not the libc.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging

log = logging.getLogger(__name__)

__all__ = ["release_free_memory"]

_libc: ctypes.CDLL | None = None
try:
    _name = ctypes.util.find_library("c")
    _libc = ctypes.CDLL(_name) if _name else None
    if _libc is not None and not hasattr(_libc, "malloc_trim"):
        _libc = None
except OSError:  # not glibc, or no libc to load
    _libc = None


def release_free_memory() -> bool:
    """Return free heap pages to the OS; True if any were released (blocking: call off the loop)."""
    if _libc is None:
        return False
    return bool(_libc.malloc_trim(0))
