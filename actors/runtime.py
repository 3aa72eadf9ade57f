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

import gc

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
