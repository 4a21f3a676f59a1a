"""Pages of memory-mapped checkpoint files: which tensors live in them, and handing pages back.

A weight assigned straight from a safetensors mapping costs no copy, but once read its pages count
in the process's RSS for as long as the mapping lives, which is as long as any tensor of that file
does. When a weight is replaced by a copy (converted to another dtype while loading, quantized, or
re-laid out by ``models.linear``), the old pages are dropped with ``madvise(MADV_DONTNEED)``: the mapping is private and never written to
the file, so a later read of those addresses simply reads the file again.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import sys
import threading
import weakref

import torch

_PAGE = mmap.PAGESIZE
_MADV_DONTNEED = 4
_lock = threading.Lock()
_mappings: dict[int, int] = {}  # start address -> length, of live file mappings registered by the loader
_libc = None


def map_file(fileno: int) -> torch.Tensor:
    """The whole file as a copy-on-write ``uint8`` tensor, registered as releasable."""
    buf = mmap.mmap(fileno, 0, access=mmap.ACCESS_COPY)
    base = torch.frombuffer(buf, dtype=torch.uint8)
    start = base.data_ptr()
    with _lock:
        _mappings[start] = base.numel()
    weakref.finalize(buf, _forget, start)  # the tensors' storage holds the mmap; gone with the last view
    return base


def _forget(start: int) -> None:
    with _lock:
        _mappings.pop(start, None)


def _c():
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        _libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return _libc


def _madvise():
    return _c().madvise


def trim() -> bool:
    """Hand the C allocator's free memory back to the system (glibc's ``malloc_trim(0)``).

    Why: glibc raises its mmap threshold after the first large free, so later multi-MB temporaries
    (e.g. a layer's float32 copy while it is quantized) come from the heap, and freed heap memory
    stuck between live blocks stays in the RSS. ``malloc_trim`` releases every free page, not just
    the heap's top. Returns whether memory was released (False where there is no glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    fn = getattr(_c(), "malloc_trim", None)  # glibc only (not musl)
    return bool(fn(0)) if fn is not None else False


def release_pages(t: torch.Tensor) -> int:
    """Drop the resident pages that hold only ``t``'s bytes, if ``t`` lives in a registered file mapping.

    Call it only for a tensor about to be discarded whose values live on elsewhere. Returns the
    number of bytes handed back (0 when ``t`` is not in a registered mapping).
    """
    if t.device.type != "cpu" or not t.is_contiguous() or t.is_mkldnn:
        return 0
    begin = t.data_ptr()
    end = begin + t.numel() * t.element_size()
    with _lock:
        inside = any(s <= begin and end <= s + n for s, n in _mappings.items())
    first, last = -(-begin // _PAGE) * _PAGE, end // _PAGE * _PAGE  # whole pages inside t only
    if not inside or last <= first or not sys.platform.startswith("linux"):  # elsewhere: keep the pages
        return 0
    if _madvise()(first, last - first, _MADV_DONTNEED) != 0:
        return 0
    return last - first
