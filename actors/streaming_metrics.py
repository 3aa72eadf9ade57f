"""StreamingMetrics: online statistics of every numeric field, whole-run and over sliding windows.

Per numeric field: count / mean / std / min / max (mergeable moments) and p50 / p90 / p95 /
p99 (t-digest), over the whole run and over sliding time windows (default 1 min, 5 min,
1 h). Each window keeps a ring of ``buckets`` sub-digests of width ``window / buckets``
seconds and merges the live ones on query, so memory is bounded whatever the run length;
a window therefore covers ``[now - window, now]`` to within one bucket width. Also: success
rate and SLA flags (99 / 99.9 / 99.99 %), event counts per name, cost and token totals,
non-finite values refused. ``get`` answers at any time; a snapshot is published on the
``metrics`` topic every ``publish_interval`` seconds (default 1 Hz).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from actors.consumer import EventConsumer
from actors.timers import Timer, check_delay
from actors.topics import Topics
from kernels.moments import Moments
from kernels.tdigest import TDigest
from telemetry.schema import EventBatch

QUANTILES = (0.5, 0.9, 0.95, 0.99)
SLA_LEVELS = (0.99, 0.999, 0.9999)
TOTAL_FIELDS = ("cost_usd", "tokens_prompt", "tokens_completion")
# the defaults, here once: the experiment spec's defaults (experiments/spec.py) read them
WINDOWS_S = (60.0, 300.0, 3600.0)
COMPRESSION = 1000.0
PUBLISH_INTERVAL_S = 1.0


class _Window:
    """A ring of per-bucket (moments, digest) pairs for one field and one window length."""

    __slots__ = ("buckets", "compression", "nb", "width")

    def __init__(self, seconds: float, nb: int, compression: float) -> None:
        self.width = seconds / nb
        self.nb = nb
        self.compression = compression
        self.buckets: dict[int, tuple[Moments, TDigest]] = {}

    def add(self, bucket: int, values: np.ndarray) -> None:
        b = self.buckets.get(bucket)
        if b is None:
            b = self.buckets[bucket] = (Moments(), TDigest(self.compression, max_discrete=32, buffer_size=256))
            for old in [k for k in self.buckets if k <= bucket - self.nb]:
                del self.buckets[old]
        b[0].add_batch(values)
        b[1].add_batch(values)

    def summary(self, now_s: float) -> dict[str, Any]:
        current = int(now_s // self.width)
        m, d = Moments(), TDigest(self.compression, max_discrete=32)
        for k, (bm, bd) in self.buckets.items():
            if k > current - self.nb:
                m.merge(bm)
                d.merge(bd)
        return _stats(m, d)


def _stats(m: Moments, d: TDigest) -> dict[str, Any]:
    out = m.as_dict()
    for q in QUANTILES:
        v = d.quantile(q) if m.count else math.nan
        out[f"p{round(q * 100)}"] = None if math.isnan(v) else v
    return out


class StreamingMetrics(EventConsumer):
    """Folds every event batch into running statistics; see the module docs."""

    def __init__(
        self,
        experiment_id: str,
        topics: Topics | None = None,
        *,
        windows: tuple[float, ...] | list[float] = WINDOWS_S,
        buckets: int = 30,
        compression: float = COMPRESSION,
        window_compression: float = 100.0,
        publish_interval: float = PUBLISH_INTERVAL_S,
        clock: Callable[[], float] = time.time,
    ) -> None:
        super().__init__()
        if not windows or any(not (isinstance(w, (int, float)) and w > 0) for w in windows):
            raise ValueError(f"windows must be positive numbers of seconds, got {windows!r}")
        if not isinstance(buckets, int) or buckets < 1:
            raise ValueError(f"buckets must be an int >= 1, got {buckets!r}")
        publish_interval = check_delay(publish_interval, "publish_interval (0 = never)")
        self.experiment_id = experiment_id
        self.topics = topics
        self.windows = tuple(float(w) for w in windows)
        self.nb = buckets
        self.compression = compression
        self.window_compression = window_compression
        self.publish_interval = publish_interval
        self.clock = clock
        self.moments: dict[str, Moments] = {}
        self.digests: dict[str, TDigest] = {}
        self.win: dict[str, list[_Window]] = {}
        self.by_name: dict[str, int] = {}
        self.nonfinite: dict[str, int] = {}  # values given as NaN or an infinity (the events' nonfinite marks)
        self.events = 0
        self.success = 0
        self.failure = 0
        self.last_ts: int | None = None
        self._timer: Timer | None = None
        self._stopped = False
        self.snapshots_published = 0

    def on_start(self) -> None:
        self._schedule()

    def _schedule(self) -> None:
        if self.publish_interval > 0 and self.topics is not None and not self._stopped:
            self._timer = self.ref.tell_later(self.publish_interval, {"kind": "publish"})

    def terminate(self, reason: str) -> None:
        self._stopped = True
        if self._timer is not None:
            self._timer.cancel()

    # --- folding -------------------------------------------------------------------------------

    def on_events(self, msg: EventBatch) -> None:
        n = int(msg["n"])
        if n == 0:
            return
        self.events += n
        names = msg["names"]
        counts = np.bincount(msg["name"], minlength=len(names))
        for i, c in enumerate(counts.tolist()):
            if c:
                self.by_name[names[i]] = self.by_name.get(names[i], 0) + c
        succ = msg["success"]
        self.success += int((succ == 1).sum())
        self.failure += int((succ == 0).sum())
        ts = msg["ts"]
        self.last_ts = int(ts[-1])
        t_lo, t_hi = int(ts.min()), int(ts.max())  # a batch may step back in time (a restarted emitter)
        # bucket numbers per window, computed once per batch (usually one bucket for all rows)
        spans: list[tuple[int, int] | np.ndarray] = []
        for w in self.windows:
            width = w / self.nb
            first, last = int(t_lo / 1e6 // width), int(t_hi / 1e6 // width)
            spans.append((first, last) if first == last else (ts / 1e6 // width).astype(np.int64))
        for _, marks in msg.get("sparse", {}).get("nonfinite", ()):
            for field in marks:
                self.nonfinite[field] = self.nonfinite.get(field, 0) + 1
        for field, col in msg["values"].items():
            m = self.moments.get(field)
            if m is None:
                m = self.moments[field] = Moments()
                self.digests[field] = TDigest(self.compression)
                self.win[field] = [_Window(w, self.nb, self.window_compression) for w in self.windows]
            present = ~np.isnan(col)  # NaN = the event does not carry this field
            m.add_batch(col[present])  # infinities are refused (and counted) by the folds
            self.digests[field].add_batch(col[present])
            vals = col[present]
            for w, span in zip(self.win[field], spans, strict=True):
                if isinstance(span, tuple):
                    w.add(span[0], vals)
                else:
                    for k in np.unique(span).tolist():
                        w.add(k, col[(span == k) & present])

    def handle_counters(self, msg: dict[str, Any]) -> None:
        """Emitter counters travel on the same topic; nothing to fold."""

    # --- answering ------------------------------------------------------------------------------

    def snapshot(self) -> dict[str, Any]:
        now = self.clock()
        judged = self.success + self.failure
        rate = self.success / judged if judged else None
        fields = {f: _stats(self.moments[f], self.digests[f]) for f in self.moments}
        windows = {f"{w:g}s": {f: self.win[f][i].summary(now) for f in self.win} for i, w in enumerate(self.windows)}
        totals = {k: self.moments[k].total for k in TOTAL_FIELDS if k in self.moments}
        return {
            "kind": "metrics",
            "experiment_id": self.experiment_id,
            "at": now,
            "last_ts": self.last_ts,
            "events": self.events,
            "by_name": dict(self.by_name),
            "success": self.success,
            "failure": self.failure,
            "success_rate": rate,
            "sla": {f"{lvl * 100:g}": (rate is not None and rate >= lvl) for lvl in SLA_LEVELS},
            "fields": fields,
            "windows": windows,
            "totals": totals,
            "rejected_values": sum(m.rejected for m in self.moments.values()) + sum(self.nonfinite.values()),
            "nonfinite_values": dict(self.nonfinite),
            "bad_batches": self.bad_batches,
        }

    def handle_get(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self.snapshot()

    def handle_publish(self, msg: dict[str, Any]) -> None:
        if self.topics is not None:
            self.topics.publish("metrics", self.snapshot())
            self.snapshots_published += 1
        self._schedule()


def get_streaming_metrics(metrics_ref: Any, timeout: float | None = 5.0) -> dict[str, Any]:
    """The current snapshot of a StreamingMetrics actor (any time, also mid-run)."""
    return metrics_ref.ask({"kind": "get"}, timeout=timeout)
