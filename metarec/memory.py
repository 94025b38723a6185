"""Where freed heap memory goes: kept for reuse while tensors churn, handed back once it piles up.

Two settings of glibc's malloc, both no-ops elsewhere, neither of which can change a result:

- `keep_freed_memory`: keep freed blocks of up to 1 GiB in the heap instead of unmapping them. A
  meta-batch allocates and frees hundreds of sub-megabyte tensors; by default glibc serves each with
  a fresh mmap and page-faults it in again, which doubled the time of a MeLU meta-batch on a 2-core
  VM.
- `FreedMemoryLimit`: give free heap pages back to the OS (`malloc_trim(0)`) whenever the resident
  set has grown by more than a slack past its level after the last trim. Why: long streaming loops
  (catalogue scoring, the counterfactual's blocks) allocate tensors whose sizes change from chunk to
  chunk between small objects that live on (each chunk's lists). Freed blocks then sit in holes
  that the next, slightly larger request cannot use, and the heap only grows. Measured on the MeLU
  cell at 10M ratings (docs/PERFORMANCE.md): 47,508 users x 10,677 items in chunks of 64 users left
  1.1 to 1.7 GiB of free but resident heap, about as much with glibc's default thresholds as with
  `keep_freed_memory`; only a trim returns holes in the middle of the heap. Trimming after every
  chunk cost a quarter of the scoring time (every chunk faults its memory in again), so it is
  rationed by the resident growth.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools
import os
import sys
from typing import Callable, Iterable, Iterator, TypeVar

_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_KEEP_BYTES = 1 << 30
DEFAULT_SLACK = 256 << 20          # resident growth (bytes) tolerated between trims

T = TypeVar("T")


@functools.cache
def _libc() -> ctypes.CDLL | None:
    """glibc, or None where there is none (macOS, musl without these symbols)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt.argtypes, libc.mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
        libc.malloc_trim.argtypes, libc.malloc_trim.restype = [ctypes.c_size_t], ctypes.c_int
    except (OSError, AttributeError):
        return None
    return libc


@functools.cache
def keep_freed_memory() -> bool:
    """Ask glibc's malloc to keep freed blocks of up to 1 GiB for reuse instead of unmapping them
    (see the module docstring). Set once per process; returns whether it applied."""
    libc = _libc()
    if libc is None:
        return False
    return (bool(libc.mallopt(_M_MMAP_THRESHOLD, _KEEP_BYTES))
            and bool(libc.mallopt(_M_TRIM_THRESHOLD, _KEEP_BYTES)))


def release_freed_memory() -> bool:
    """Hand every free heap page back to the OS now (`malloc_trim(0)`, which also releases whole
    pages inside free chunks in the middle of the heap). Returns whether anything was released."""
    libc = _libc()
    return bool(libc.malloc_trim(0)) if libc is not None else False


def resident_bytes() -> int | None:
    """This process's resident set in bytes (Linux `/proc/self/statm`), or None where unknown."""
    try:
        with open("/proc/self/statm", "rb") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


class FreedMemoryLimit:
    """Trims the heap whenever the resident set has grown more than `slack` bytes past its level at
    the first check after the last trim (or after construction). `check()` after each chunk of a
    streaming loop bounds the freed-but-resident part of the loop's growth to about the slack plus
    one chunk's working set (live results still grow), at one trim per `slack` of growth. Why the
    level is taken at the check after a trim, not at the trim: a trim also hands back the free
    blocks the next chunk is about to reuse, and that chunk faults its working set in
    again; measured from just after the trim, a working set larger than the slack would alone pass
    it and trim every chunk (which cost a quarter of the scoring time at 10M). `resident` and `trim`
    are injectable for tests."""

    def __init__(self, slack: int = DEFAULT_SLACK, resident: Callable[[], int | None] = resident_bytes,
                 trim: Callable[[], bool] = release_freed_memory) -> None:
        self.slack, self._resident, self._trim = int(slack), resident, trim
        self.trims = 0
        self._base: int | None = None

    def check(self) -> None:
        now = self._resident()
        if now is None:
            return
        if self._base is None:                   # first check since construction or a trim
            self._base = now
        elif now - self._base > self.slack:
            self._trim()
            self.trims += 1
            self._base = None


def bounded(items: Iterable[T], slack: int | None = None) -> Iterator[T]:
    """`items`, with `FreedMemoryLimit.check()` after the caller is done with each one: the loop
    body runs between two checks, so what it freed can be returned before the next item. `slack`
    defaults to `DEFAULT_SLACK`, read at the call (benchmarks/prediction_memory.py varies it)."""
    limit = FreedMemoryLimit(DEFAULT_SLACK if slack is None else slack)
    for item in items:
        yield item
        limit.check()
