"""The Sampler actor: decides which events the Recorder persists.

Strategies (``sampling_strategy`` + ``sampling_config``, as in the experiment spec):

* ``all`` (default): keep everything.
* ``uniform``: keep each event with probability ``rate``.
* ``reservoir``: exactly ``k`` events over the whole run, uniformly (Vitter's Algorithm R).
  The reservoir lives in the Sampler and goes to the Recorder when the run ends (``flush``
  or stop), since a persisted event cannot be taken back. With ``min_samples`` the events it
  guarantees are kept beside the ``k``, which are drawn from the others; all of it goes out
  together, in order (the Recorder never takes an event older than one it has written).
* ``stratified``: a rate per stratum (``by`` = ``name`` | ``success`` | ``phase``), e.g.
  ``{"by": "success", "rates": {"false": 1.0, "true": 0.1}, "default_rate": 1.0}``.
* ``adaptive``: ``base_rate`` normally, ``anomaly_rate`` while an anomaly period is open
  (announced on the ``anomalies`` topic, or seen as flagged events in a batch), and for
  ``cooldown_s`` seconds of event time after the last flagged event.
* ``importance``: every event whose ``field`` exceeds the running ``quantile`` (p99 by
  default) of that field, plus ``base_rate`` of the others.

``min_samples`` (any strategy): the first ``min_samples`` events of each stratum are kept
whatever the rate (by ``reservoir`` too: beside its ``k``, which are drawn from the rest).
Events flagged by the anomaly detector with action ``sample_more`` are
always kept (except by ``reservoir``, whose size is exact). The events of the run's record
(``record_names``: :data:`telemetry.schema.RECORD_EVENTS`, a phase's start and end, control
actions, pauses, plus the workload's ``record_events``) are never sampled out, by any
strategy (``reservoir`` keeps them outside its ``k`` and sends them with its sample, in
order). Kept / dropped counts are kept
per stratum (the event name unless stratified), and cumulative ``sampled_out`` / ``held``
figures travel to the Recorder so the run's accounting stays exact: with every batch it
forwards, or, when it keeps nothing of a batch, in a ``sampling`` message that also carries
the batch's emitter counters (an empty batch is never forwarded), and once more when it
stops or crashes. The figures name the incarnation that counted them (``source``, the
actor's urn): a restarted Sampler counts from zero, and the Recorder adds up the latest
figure of each incarnation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from actors.consumer import EventConsumer
from actors.log import get_logger
from actors.messages import BytesReceiver, encode
from kernels.tdigest import TDigest
from telemetry.schema import (
    RECORD_EVENTS,
    SAMPLING,
    EventBatch,
    batch_extremes,
    batch_rows,
    rows_to_batch,
    select_rows,
)

log = get_logger("actors.sampler")

STRATEGIES = ("all", "uniform", "reservoir", "stratified", "adaptive", "importance")
_CONFIG_KEYS = {
    "all": set(),
    "uniform": {"rate"},
    "reservoir": {"k"},
    "stratified": {"by", "rates", "default_rate"},
    "adaptive": {"base_rate", "anomaly_rate", "cooldown_s"},
    "importance": {"field", "quantile", "base_rate"},
}


def _rate(cfg: dict[str, Any], key: str, default: float | None = None) -> float:
    v = cfg.get(key, default)
    if v is None:
        raise ValueError(f"sampling.config.{key} is required")
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
        raise ValueError(f"sampling.config.{key} must be a rate in [0, 1], got {v!r}")
    return float(v)


MAX_COOLDOWN_S = 31_536_000  # a year: the adaptive strategy counts its cooldown in microseconds


def _int_in(cfg: dict[str, Any], key: str, lo: int, hi: int, default: int | None = None) -> int:
    v = cfg.setdefault(key, default) if default is not None else cfg[key]
    if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
        raise ValueError(f"sampling.config.{key} must be an integer in [{lo}, {hi}], got {v!r}")
    return v


def check_sampling(strategy: str, config: dict[str, Any] | None) -> dict[str, Any]:
    """Validate a sampling strategy and its config; return the config with defaults filled in."""
    cfg = dict(config or {})
    if strategy not in STRATEGIES:
        raise ValueError(f"sampling.strategy: unknown strategy {strategy!r}; expected one of {', '.join(STRATEGIES)}")
    allowed = _CONFIG_KEYS[strategy] | {"min_samples", "seed"}
    unknown = set(cfg) - allowed
    if unknown:
        raise ValueError(
            f"sampling.config: unknown key(s) {', '.join(sorted(unknown))} for strategy {strategy!r}; "
            f"allowed: {', '.join(sorted(allowed))}"
        )
    _int_in(cfg, "min_samples", 0, 2**63 - 1, 0)
    if "seed" in cfg:  # the sampler's own random stream (default: the run's seed)
        _int_in(cfg, "seed", 0, 2**32 - 1)
    if strategy == "uniform":
        cfg["rate"] = _rate(cfg, "rate")
    elif strategy == "reservoir":
        k = cfg.get("k")
        if isinstance(k, bool) or not isinstance(k, int) or k <= 0:
            raise ValueError(f"sampling.config.k must be an int > 0, got {k!r}")
    elif strategy == "stratified":
        by = cfg.setdefault("by", "name")
        if by not in ("name", "success", "phase"):
            raise ValueError(f"sampling.config.by must be name, success or phase, got {by!r}")
        rates = cfg.get("rates")
        if not isinstance(rates, dict) or not rates:
            raise ValueError("sampling.config.rates must be a non-empty table of stratum = rate")
        cfg["rates"] = {str(k).lower() if by == "success" else str(k): _rate(rates, k) for k in rates}
        cfg["default_rate"] = _rate(cfg, "default_rate", 1.0)
    elif strategy == "adaptive":
        cfg["base_rate"] = _rate(cfg, "base_rate")
        cfg["anomaly_rate"] = _rate(cfg, "anomaly_rate", 1.0)
        cd = cfg.setdefault("cooldown_s", 10.0)
        if isinstance(cd, bool) or not isinstance(cd, (int, float)) or not 0 <= cd <= MAX_COOLDOWN_S:
            raise ValueError(f"sampling.config.cooldown_s must be in [0, {MAX_COOLDOWN_S}] seconds, got {cd!r}")
    elif strategy == "importance":
        if not isinstance(cfg.get("field"), str):
            raise ValueError("sampling.config.field must name a numeric field")
        q = cfg.setdefault("quantile", 0.99)
        if isinstance(q, bool) or not isinstance(q, (int, float)) or not 0.0 < q < 1.0:
            raise ValueError(f"sampling.config.quantile must be in (0, 1), got {q!r}")
        cfg["base_rate"] = _rate(cfg, "base_rate", 0.0)
    return cfg


class Sampler(EventConsumer):
    """Receives (anomaly-annotated) event batches, forwards the kept rows downstream."""

    def __init__(
        self,
        experiment_id: str,
        downstream: BytesReceiver | None = None,
        strategy: str = "all",
        config: dict[str, Any] | None = None,
        seed: int | None = None,
        record_names: tuple[str, ...] | list[str] = RECORD_EVENTS,
    ) -> None:
        super().__init__()
        self.experiment_id = experiment_id
        self.record_names = frozenset(record_names)  # the run's record: never sampled out
        self.downstream = downstream
        self.strategy = strategy
        self.config = check_sampling(strategy, config)
        self.rng = np.random.default_rng(self.config.get("seed", seed))
        self.kept: dict[str, int] = {}
        self.dropped: dict[str, int] = {}
        self.sampled_out = 0
        self.seen = 0
        self.anomaly_open = False
        self.anomaly_until_ts = -1
        self.reservoir: list[dict[str, Any]] = []
        # reservoir: what it keeps beside its k (min_samples' guarantees, the run's record), sent
        # with the sample when the run ends, all in seq order (the Recorder takes no seq twice)
        self.records: list[dict[str, Any]] = []
        self._pool_seen = 0  # reservoir: events that competed for it (all but those min_samples kept)
        self._stratum_seen: dict[str, int] = {}  # reservoir: events seen per stratum (for min_samples)
        self.digest = TDigest(200.0) if strategy == "importance" else None
        self._reservoir_flushed = False

    # --- deciding ------------------------------------------------------------------------------

    def _strata(self, b: dict[str, Any]) -> tuple[list[str], np.ndarray]:
        by = self.config.get("by", "name") if self.strategy == "stratified" else "name"
        if by == "success":
            labels = ["none", "false", "true"]
            return labels, (b["success"].astype(np.int64) + 1)
        table = b["names"] if by == "name" else b["phases"]
        codes = b["name"] if by == "name" else b["phase"]
        if by == "phase":
            return [*table, "none"], np.where(codes < 0, len(table), codes)
        return list(table), codes.astype(np.int64)

    def _decide(self, b: dict[str, Any]) -> np.ndarray:
        n = int(b["n"])
        cfg = self.config
        s = self.strategy
        if s == "all":
            return np.ones(n, dtype=bool)
        u = self.rng.random(n)
        if s == "uniform":
            return u < cfg["rate"]
        if s == "stratified":
            labels, codes = self._strata(b)
            rates = np.array([cfg["rates"].get(lbl, cfg["default_rate"]) for lbl in labels])
            return u < rates[codes]
        if s == "adaptive":
            flagged = self._flagged(b)
            ts = b["ts"]
            rate = np.full(n, cfg["base_rate"])
            cool = int(cfg["cooldown_s"] * 1e6)
            hot = (ts <= self.anomaly_until_ts) | self.anomaly_open  # a cooldown carried over
            if flagged.any():
                last_flag = np.maximum.accumulate(np.where(flagged, ts, np.iinfo(np.int64).min))
                hot |= flagged | ((last_flag > np.iinfo(np.int64).min) & (ts - last_flag <= cool))
                self.anomaly_until_ts = max(self.anomaly_until_ts, int(ts[np.flatnonzero(flagged)[-1]]) + cool)
            rate[hot] = cfg["anomaly_rate"]
            return u < rate
        # importance
        col = b["values"].get(cfg["field"])
        keep = u < cfg["base_rate"]
        if col is not None:
            if self.digest.count >= 100:
                thr = self.digest.quantile(cfg["quantile"])
                keep |= np.nan_to_num(col, nan=-np.inf) > thr
            else:
                keep |= ~np.isnan(col)  # until the threshold is known, keep what carries the field
            self.digest.add_batch(col)
        return keep

    @staticmethod
    def _flagged(b: dict[str, Any], sample_more_only: bool = False) -> np.ndarray:
        out = np.zeros(int(b["n"]), dtype=bool)
        for i, a in b.get("sparse", {}).get("anomaly", ()):
            if isinstance(a, dict) and a.get("flag") and (not sample_more_only or a.get("action") == "sample_more"):
                out[i] = True
        return out

    def _min_samples(self, b: dict[str, Any], keep: np.ndarray) -> None:
        need = self.config["min_samples"]
        if not need:
            return
        labels, codes = self._strata(b)
        for c in np.unique(codes).tolist():
            label = labels[c]
            have = self.kept.get(label, 0) + self.dropped.get(label, 0)
            if have < need:
                idx = np.flatnonzero(codes == c)[: need - have]
                keep[idx] = True

    def _count(self, b: dict[str, Any], keep: np.ndarray) -> None:
        labels, codes = self._strata(b)
        k = np.bincount(codes[keep], minlength=len(labels))
        d = np.bincount(codes[~keep], minlength=len(labels))
        for i, lbl in enumerate(labels):
            if k[i]:
                self.kept[lbl] = self.kept.get(lbl, 0) + int(k[i])
            if d[i]:
                self.dropped[lbl] = self.dropped.get(lbl, 0) + int(d[i])

    def on_events(self, msg: EventBatch) -> None:
        n = int(msg["n"])
        if n == 0:
            self._send_figures(msg)
            return
        if self.strategy == "reservoir":
            self._reservoir(msg)
            return
        keep = self._decide(msg)
        keep |= self._flagged(msg, sample_more_only=True)
        keep |= self._records(msg)
        self._min_samples(msg, keep)
        self._count(msg, keep)
        self.seen += n
        self.sampled_out += int(n - keep.sum())
        extremes = batch_extremes(msg, ~keep)  # what is dropped still counts in the run's figures
        if not keep.any():
            self._send_figures(msg, extremes)
            return
        out = msg if keep.all() else select_rows(msg, keep)
        out["sampling"] = self._figures(held=0, extremes=extremes)
        if self.downstream is not None:
            self.downstream.tell_bytes(encode(out))

    def _records(self, b: dict[str, Any]) -> np.ndarray:
        """The rows that are the run's record (a phase's start and end, a control, a pause): kept."""
        codes = [i for i, name in enumerate(b["names"]) if name in self.record_names]
        if not codes:
            return np.zeros(int(b["n"]), dtype=bool)
        return np.isin(b["name"], codes)

    def _figures(self, held: int, extremes: list[list[Any]] | None = None) -> dict[str, Any]:
        """The cumulative figures, named by this incarnation (see the module docs), and the
        ``extremes`` of the rows this batch drops or holds (per phase and field: the run's
        min, max and best stay the run's, not its sample's)."""
        return {"sampled_out": self.sampled_out, "held": held, "source": self.actor_urn} | (
            {"extremes": extremes} if extremes else {}
        )

    def _send_figures(self, msg: dict[str, Any], extremes: list[list[Any]] | None = None) -> None:
        """Nothing of this batch goes on: send the figures (and the batch's emitter counters) alone."""
        if self.downstream is not None:
            self.downstream.tell_bytes(
                encode(
                    {"kind": SAMPLING, **self._figures(self._held(), extremes), "counters": msg.get("counters") or {}}
                )
            )

    def _held(self) -> int:
        if self.strategy == "reservoir" and not self._reservoir_flushed:
            return len(self.reservoir) + len(self.records)
        return 0

    def _guaranteed(self, b: dict[str, Any]) -> np.ndarray:
        """Reservoir: the rows among the first ``min_samples`` events of their stratum in the run."""
        n = int(b["n"])
        sure = np.zeros(n, dtype=bool)
        need = self.config["min_samples"]
        if not need:
            return sure
        labels, codes = self._strata(b)
        for c in np.unique(codes).tolist():
            idx = np.flatnonzero(codes == c)
            have = self._stratum_seen.get(labels[c], 0)
            if have < need:
                sure[idx[: need - have]] = True
            self._stratum_seen[labels[c]] = have + idx.size
        return sure

    def _reservoir(self, b: dict[str, Any]) -> None:
        k = self.config["k"]
        n = int(b["n"])
        if self._reservoir_flushed:  # the run's sample has gone out already: later events are sampled out
            self.seen += n
            self.sampled_out += n
            self._send_figures(b)
            return
        sure = self._guaranteed(b) | self._records(b)  # kept beside the k: held, sent with the sample
        if sure.any():
            rows = batch_rows(b)
            self.records += [rows[i] for i in np.flatnonzero(sure).tolist()]
        pool = np.flatnonzero(~sure)  # the rows that compete for the reservoir
        m = pool.size
        t0 = self._pool_seen
        slots: dict[int, int] = {}  # reservoir slot -> row of this batch (last writer wins)
        fill = max(0, min(m, k - t0))
        for i in range(fill):
            slots[t0 + i] = int(pool[i])
        if fill < m:
            t = np.arange(t0 + fill, t0 + m)
            j = (self.rng.random(t.size) * (t + 1)).astype(np.int64)  # uniform in [0, t]
            for i, slot in zip((np.flatnonzero(j < k) + fill).tolist(), j[j < k].tolist(), strict=True):
                slots[slot] = int(pool[i])
        if slots:
            rows = batch_rows(b)
            for slot, row in slots.items():
                if slot < len(self.reservoir):
                    self.reservoir[slot] = rows[row]
                else:
                    self.reservoir.append(rows[row])
        self._pool_seen += m
        self.seen += n
        # the sample is forwarded when the run ends: keep the Recorder's accounting current
        self.sampled_out = self.seen - len(self.reservoir) - len(self.records)
        self._send_figures(b, batch_extremes(b, ~sure))  # the pool's rows: most never reach the disk

    def handle_flush(self, msg: dict[str, Any]) -> dict[str, Any]:
        """End of run: send the reservoir (if any) downstream; answer the counts."""
        if self.strategy == "reservoir" and not self._reservoir_flushed and (self.reservoir or self.records):
            rows = sorted(self.reservoir + self.records, key=lambda r: r["seq"])
            batch = rows_to_batch(rows, self.experiment_id, rows[0]["run_id"])
            self._reservoir_flushed = True
            self.sampled_out = self.seen - len(rows)
            self.reservoir, self.records = [], []
            batch["sampling"] = self._figures(held=0)
            self._count(batch, np.ones(len(rows), dtype=bool))
            if self.downstream is not None:
                self.downstream.tell_bytes(encode(batch))
        return self.counts()

    def counts(self) -> dict[str, Any]:
        return {
            "strategy": self.strategy,
            "seen": self.seen,
            "sampled_out": self.sampled_out,
            "kept": dict(self.kept),
            "dropped": dict(self.dropped),
            "held": self._held(),
            "bad_batches": self.bad_batches,
        }

    def handle_counts(self, msg: dict[str, Any]) -> dict[str, Any]:
        return self.counts()

    def handle_counters(self, msg: dict[str, Any]) -> None:
        if self.counters_ok(msg) and self.downstream is not None:
            self.downstream.tell_bytes(encode(msg))

    def handle_anomaly_period(self, msg: dict[str, Any]) -> None:
        self.anomaly_open = msg.get("state") == "start"

    def handle_anomalies(self, msg: dict[str, Any]) -> None:
        """Per-batch anomaly summaries on the anomalies topic: the flags already came with the events."""

    def terminate(self, reason: str) -> None:
        """The reservoir goes out; the last figures too (a restarted Recorder may not have them)."""
        if self.strategy == "reservoir" and not self._reservoir_flushed:
            self.handle_flush({})
        self._send_figures({})
