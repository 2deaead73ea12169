"""CPU memory that is freed goes back to the operating system.

A training step allocates and frees buffers of many sizes (activations, recomputed layers under gradient
checkpointing, gradients freed inside backward). glibc's malloc serves blocks below its mmap threshold from
the heap, and that threshold grows (up to 32 MiB) each time a larger block is freed; a heap with small live
blocks between freed large ones cannot give the space back, so the process's resident memory (what an OOM
killer and a shared machine see) climbs towards the sum of everything ever freed, not what is alive.
Measured at the SmolLM2-135M benchmark shape: 3.1 GB peak RSS with glibc's defaults, 2.3 GB with a fixed
1 MiB threshold (docs/performance.md, "Real shape"). The price is speed: every large tensor is a fresh mapping whose
pages the kernel zeroes on first touch, and the fastest real-shape row made 100 instead of 130 real tok/s with it.
`train.return_freed_memory` (default off; CPU only; meant for memory-bound runs) sets
glibc's ``M_MMAP_THRESHOLD`` and ``M_TRIM_THRESHOLD`` with ``mallopt`` so that blocks of 1 MiB and more are
mapped and unmapped directly. The same can be had for any process with the environment variables
``MALLOC_MMAP_THRESHOLD_=1048576 MALLOC_TRIM_THRESHOLD_=1048576``. Elsewhere (not glibc) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3  # glibc's malloc.h
THRESHOLD = 1 << 20


def return_freed_memory(threshold: int = THRESHOLD) -> bool:
    """Fixed mmap and trim thresholds for this process's glibc malloc; False where there is no glibc."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
        if not ctypes.CDLL(None).gnu_get_libc_version:  # musl and others have no gnu_get_libc_version
            return False
    except (OSError, AttributeError):
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    ok = mallopt(M_MMAP_THRESHOLD, threshold) == 1 and mallopt(M_TRIM_THRESHOLD, threshold) == 1
    log.debug("glibc malloc: blocks >= %d bytes mapped directly: %s", threshold, ok)
    return ok
