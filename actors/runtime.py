"""Process-level tuning for long-running actor hosts.

CPython's cyclic garbage collector periodically rescans every container object in the
process. After numpy, numba, pyarrow and friends are imported that is hundreds of
thousands of objects, and an emitting workload allocates fast enough to trigger a full
rescan every few tens of milliseconds: measured here, the collector took about 40 % of
the telemetry hot path. :func:`freeze_startup_heap` moves everything allocated so far
into the permanent generation (``gc.freeze()``, meant for exactly this), so later
collections only look at objects created afterwards, and raises the young-generation
threshold so that short-lived event rows (freed at each flush) are mostly gone before a
collection would scan them. Collection itself stays on.
"""

from __future__ import annotations

import ctypes
import gc
from typing import Any

_frozen = False
YOUNG_THRESHOLD = 50_000  # CPython's default is 700 allocations


def freeze_startup_heap() -> bool:
    """Freeze the current heap once per process (after imports); True if it did now."""
    global _frozen
    if _frozen:
        return False
    gc.collect()
    gc.freeze()
    _, g1, g2 = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, g1, g2)
    _frozen = True
    return True


_libc_trim: Any = None


def trim_heap() -> bool:
    """Hand the C heap's free pages back to the system (glibc's ``malloc_trim``); True if it did.

    Why: a long-lived process whose threads come and go (a lab daemon: a dozen threads per
    experiment) leaves freed memory scattered over its malloc arenas; glibc returns it only
    from the top of the main heap on its own. Cheap enough (milliseconds) to call after each
    batch of forgotten experiments. A no-op off glibc.
    """
    global _libc_trim
    if _libc_trim is None:
        try:
            libc = ctypes.CDLL(None)
            libc.gnu_get_libc_version  # noqa: B018 - glibc only
            _libc_trim = libc.malloc_trim
            _libc_trim.argtypes, _libc_trim.restype = (ctypes.c_size_t,), ctypes.c_int
        except (OSError, AttributeError):
            _libc_trim = False
    return bool(_libc_trim and _libc_trim(0))
