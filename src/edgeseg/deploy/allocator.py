"""Keep freed tensor memory in the process (glibc malloc), so repeated forward passes stop page-faulting.

Why: glibc serves large allocations (a 512×512 SegFormer forward has dozens of 4–64 MB activations) with ``mmap`` and
gives them back to the OS on ``free``, and it trims the top of its heap the same way. The next forward then maps the
same sizes again, and the kernel must fault in and zero every page before PyTorch writes it. On the 2-core CPU here
that is a fifth to a quarter of a fused SegFormer-B0 forward (``benchmarks/allocator.py``). Telling malloc never to
``mmap`` and never to trim makes freed activations reusable, as jemalloc/tcmalloc (which PyTorch's CPU tuning guides
recommend preloading) would, without preloading anything.

The cost: the process keeps its peak memory until it exits, which is what a process that runs inference or training
repeatedly wants. The setting is process-wide, so the library never applies it on import; the ``edgeseg`` command
applies it (``EDGESEG_KEEP_FREED_MEMORY=0`` turns that off), and API users call :func:`keep_freed_memory`.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import sys

# glibc <malloc.h> parameter numbers
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
ENV_SWITCH = "EDGESEG_KEEP_FREED_MEMORY"


def keep_freed_memory() -> bool:
    """Make glibc malloc keep freed memory for reuse (no ``mmap`` for large blocks, no heap trimming).

    Returns True when applied; False where it does not apply (not Linux/glibc) — then nothing changed.
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and other libcs have no mallopt
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return bool(mallopt(_M_MMAP_MAX, 0)) and bool(mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))


def keep_freed_memory_unless_disabled() -> bool:
    """:func:`keep_freed_memory` unless the environment sets ``EDGESEG_KEEP_FREED_MEMORY=0`` (the CLI's default)."""
    from ..models.native import env_switch

    return keep_freed_memory() if env_switch(ENV_SWITCH) else False


__all__ = ["ENV_SWITCH", "keep_freed_memory", "keep_freed_memory_unless_disabled"]
