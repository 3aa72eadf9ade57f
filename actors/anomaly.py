"""The AnomalyDetection actor: flags unusual events as they stream past.

Methods (``methods``), each per numeric field in ``metrics`` (all fields by default):

* ``z_score``: ``|x - mean| / std > threshold`` (3) against the running moments;
* ``modified_z``: ``|0.6745 (x - median) / MAD| > threshold`` (3.5) over the last ``window`` values;
* ``iqr``: outside ``[Q1 - k IQR, Q3 + k IQR]`` with ``k = threshold`` (1.5) over the last ``window`` values;
* ``ewma``: ``|x - ewma| / ewm_std > threshold`` (3) with weight ``ewma_lambda`` in (0, 1),
  ``ewm_std`` being the spread of the prediction error (``sqrt(ewm_var / (1 - lambda))``);
* ``isolation_forest``: multivariate over the ``metrics`` fields, scikit-learn's IsolationForest
  refitted every ``refit_every`` complete rows on the last ``window`` of them; flags what it
  predicts as outliers (its contamination, ``auto`` by default or (0, 0.5], is set only in a
  per-method threshold table: a single ``threshold`` number is the other methods' cut-off).

Each method judges a batch against the state *before* the batch, then learns from it. No
field is judged before ``warmup`` values (at least two); the values after them in the same
batch are. A
field with no spread (every value so far equal) makes any other value an anomaly (score
:data:`SCORE_MAX`); a robust spread of zero (MAD, IQR: most recent values equal) falls back
to the mean absolute deviation and the standard deviation. Flagged events get ``anomaly = {"flag", "score",
"methods", "fields", "action"}`` in the batch, which then goes on (``downstream``, the
Sampler); ``action`` is ``flag``, ``alert`` (also logged as a warning) or ``sample_more``
(the Sampler keeps those events whatever its rate). An event whose value of a watched field
was given as NaN or an infinity (its ``nonfinite`` mark: a diverged loss) is always flagged,
method ``nonfinite``, score :data:`SCORE_MAX`, whatever ``methods`` says. Anomalies close together in time
(``period_gap_s``) form anomaly periods (start, end, count, severity); a period ends when
the events' time passes ``period_gap_s`` beyond its last anomaly. On the ``anomalies`` topic
it publishes each batch's anomalies and ``anomaly_period`` start/end messages.

A field of ``metrics`` that none of the first :data:`UNSEEN_AFTER_BATCHES` batches carrying
values held (a misspelt name watches nothing) is said once: a warning, and a note the phase
records as an :data:`UNSEEN_EVENT` event (``notes_to``), naming the fields they held. A run
that ends sooner is judged on all its events, as they end (:meth:`handle_last_notes`).
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any

import numpy as np

from actors.consumer import EventConsumer
from actors.log import get_logger
from actors.messages import BytesReceiver, encode
from actors.topics import Topics
from kernels.moments import Ewma, Moments, pow2_scale
from telemetry.schema import EventBatch

log = get_logger("actors.anomaly")

METHODS = ("z_score", "modified_z", "iqr", "ewma", "isolation_forest")
DEFAULT_THRESHOLDS = {"z_score": 3.0, "modified_z": 3.5, "iqr": 1.5, "ewma": 3.0, "isolation_forest": "auto"}
ACTIONS = ("flag", "alert", "sample_more")
# the defaults, here once: the experiment spec's defaults (experiments/spec.py) read them
DEFAULT_METHODS = ("z_score", "ewma")
ACTION = "flag"
WINDOW = 1000
WARMUP = 30
EWMA_LAMBDA = 0.1
PERIOD_GAP_S = 5.0
UNSEEN_AFTER_BATCHES = 20
"""How many batches carrying values the detector sees before it says which of ``metrics`` none
of them held (a misspelt field is watched for nothing, silently otherwise)."""
UNSEEN_EVENT = "anomaly_unseen_metrics"
"""The run's event that says so (a record event: never sampled out)."""


THRESHOLD_MAX = 1_000_000.0
SCORE_MAX = 1e9
"""The highest score recorded: a value off a field that never varied is infinitely far,
which no event file can hold."""


def _scaled(deviation: np.ndarray, spread: float) -> np.ndarray:
    """``|deviation| / spread``; with no spread, infinite for any deviation and 0 for none."""
    d = np.abs(deviation)
    if spread > 0:
        return d / spread
    return np.where(d > 0, np.inf, 0.0)


def _std(r: np.ndarray) -> float:
    """The population standard deviation, computed at the values' scale (a power of two): the
    squares of values past 1e154 (or below 1e-154) would overflow (or vanish) unscaled."""
    k = pow2_scale(float(np.max(np.abs(r)))) if r.size else 1.0
    return float(np.std(r / k)) * k


def threshold_problem(threshold: Any) -> str | None:
    """What is wrong with an ``anomaly.threshold`` setting, or None.

    A number (finite, in (0, 1e6]) is the cut-off of the threshold methods (z_score,
    modified_z, iqr, ewma); a table sets them per method, and may give isolation_forest its
    contamination: ``"auto"`` or a share of outliers in (0, 0.5], as scikit-learn takes it."""
    if threshold is None:
        return None

    def number(v: Any, hi: float) -> bool:
        return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v) and 0 < v <= hi

    if not isinstance(threshold, dict):
        if number(threshold, THRESHOLD_MAX):
            return None
        return f"must be a number in (0, {THRESHOLD_MAX:g}] or a table per method, got {threshold!r:.80}"
    for k, v in threshold.items():
        if k not in METHODS:
            return f"threshold given for unknown method {k!r:.80}; expected some of {', '.join(METHODS)}"
        if k == "isolation_forest":
            if v != "auto" and not number(v, 0.5):
                return f'isolation_forest: the contamination must be "auto" or in (0, 0.5], got {v!r:.80}'
        elif not number(v, THRESHOLD_MAX):
            return f"{k}: must be a number in (0, {THRESHOLD_MAX:g}], got {v!r:.80}"
    return None


def check_anomaly_config(
    methods: Any, metrics: Any, threshold: Any, action: Any, window: Any, warmup: Any, ewma_lambda: Any
) -> None:
    """Validate the detector's settings with errors that name the setting."""
    if not isinstance(methods, (list, tuple)) or not methods:
        raise ValueError(f"anomaly.methods must be a non-empty list, got {methods!r}")
    for m in methods:
        if m not in METHODS:
            raise ValueError(f"anomaly.methods: unknown method {m!r}; expected some of {', '.join(METHODS)}")
    if metrics is not None and (not isinstance(metrics, (list, tuple)) or not all(isinstance(x, str) for x in metrics)):
        raise ValueError(f"anomaly.metrics must be a list of field names, got {metrics!r}")
    if action not in ACTIONS:
        raise ValueError(f"anomaly.action: unknown action {action!r}; expected one of {', '.join(ACTIONS)}")
    problem = threshold_problem(threshold)
    if problem is not None:
        raise ValueError(f"anomaly.threshold {problem}")
    for name, v, lo in (("window", window, 10), ("warmup", warmup, 0)):
        if isinstance(v, bool) or not isinstance(v, int) or v < lo:
            raise ValueError(f"anomaly.{name} must be an int >= {lo}, got {v!r}")
    if isinstance(ewma_lambda, bool) or not isinstance(ewma_lambda, (int, float)) or not 0 < ewma_lambda < 1:
        raise ValueError(
            f"anomaly.ewma_lambda must be in (0, 1) (at 1 the average is the last value, with no spread), "
            f"got {ewma_lambda!r}"
        )


class _FieldState:
    __slots__ = ("ewma", "moments", "pos", "ring", "seen")

    def __init__(self, window: int, ewma_lambda: float) -> None:
        self.moments = Moments()
        self.ewma = Ewma(ewma_lambda)
        self.ring = np.full(window, np.nan)
        self.pos = 0
        self.seen = 0

    def recent(self) -> np.ndarray:
        return self.ring[: self.seen] if self.seen < self.ring.size else self.ring

    def push(self, x: np.ndarray) -> None:
        w = self.ring.size
        if x.size >= w:
            self.ring[:] = x[-w:]
            self.pos = 0
        else:
            end = self.pos + x.size
            if end <= w:
                self.ring[self.pos : end] = x
            else:
                cut = w - self.pos
                self.ring[self.pos :] = x[:cut]
                self.ring[: x.size - cut] = x[cut:]
            self.pos = end % w
        self.seen = min(w, self.seen + x.size)


class AnomalyDetection(EventConsumer):
    """Scores every event batch; see the module docs."""

    def __init__(
        self,
        experiment_id: str,
        downstream: BytesReceiver | None = None,
        topics: Topics | None = None,
        *,
        methods: tuple[str, ...] | list[str] = DEFAULT_METHODS,
        metrics: list[str] | None = None,
        threshold: float | dict[str, Any] | None = None,
        action: str = ACTION,
        window: int = WINDOW,
        warmup: int = WARMUP,
        ewma_lambda: float = EWMA_LAMBDA,
        refit_every: int = 2000,
        period_gap_s: float = PERIOD_GAP_S,
        max_kept: int = 10_000,
        seed: int = 0,
        enabled: bool = True,
        notes_to: Any = None,
        unseen_after: int = UNSEEN_AFTER_BATCHES,
    ) -> None:
        super().__init__()
        self.enabled = enabled  # disabled: batches pass straight through to downstream
        check_anomaly_config(methods, metrics, threshold, action, window, warmup, ewma_lambda)
        self.experiment_id = experiment_id
        self.downstream = downstream
        self.topics = topics
        self.methods = tuple(methods)
        self.metrics = list(metrics) if metrics is not None else None
        self.thresholds = dict(DEFAULT_THRESHOLDS)
        if isinstance(threshold, dict):
            self.thresholds.update(threshold)
        elif threshold is not None:  # one cut-off for the threshold methods; isolation_forest keeps its own
            for m in self.methods:
                if m != "isolation_forest":
                    self.thresholds[m] = threshold
        self.action = action
        self.window, self.warmup, self.ewma_lambda = window, warmup, ewma_lambda
        self.refit_every, self.period_gap_us, self.seed = refit_every, int(period_gap_s * 1e6), seed
        self.fields: dict[str, _FieldState] = {}
        self.kept: deque[dict[str, Any]] = deque(maxlen=max_kept)
        self.total = 0
        self.events = 0
        self.by_method: dict[str, int] = {}
        self.by_field: dict[str, int] = {}
        self.periods: list[dict[str, Any]] = []
        self._open: dict[str, Any] | None = None
        self._forest: Any = None
        self._rows: deque[np.ndarray] = deque(maxlen=window)
        self._since_fit = 0
        self.notes_to = notes_to  # where the run's events are recorded (the phase): the unseen-metrics note
        self.unseen_after = unseen_after
        self.unseen_metrics: list[str] = []  # configured metrics no event has carried (said once)
        self._seen: set[str] = set()  # every field the events carried, until the check is made
        self._value_batches = 0

    # --- scoring ------------------------------------------------------------------------------------

    def _score_field(self, st: _FieldState, x: np.ndarray) -> dict[str, np.ndarray]:
        """Per-method scores (ratio to threshold: > 1 is anomalous, at most :data:`SCORE_MAX`)
        for finite values ``x``. The first ``warmup`` values of a field are learnt, never
        judged, wherever they fall in a batch: the rest of that batch is judged against them.
        Nothing is judged against fewer than two values (one value shows no spread)."""
        head = min(x.size, max(self.warmup, 2) - st.moments.count)
        if head > 0:
            self._learn(st, x[:head])
        out = {m: np.zeros(x.size) for m in self.methods if m != "isolation_forest"}
        rest = x[head:] if head > 0 else x
        if rest.size:
            for m, s in self._judge(st, rest).items():
                out[m][x.size - rest.size :] = np.minimum(s, SCORE_MAX)
        return out

    def _learn(self, st: _FieldState, x: np.ndarray) -> None:
        st.ewma.update(x)
        st.moments.add_batch(x)
        st.push(x)

    def _judge(self, st: _FieldState, x: np.ndarray) -> dict[str, np.ndarray]:
        """Score ``x`` against the state before it, then learn it. A spread of zero (every value
        so far equal) makes any other value infinitely far; a robust spread of zero (most of
        the recent values equal: a field that is mostly 0) falls back to a wider measure."""
        out: dict[str, np.ndarray] = {}
        z_ewma = st.ewma.update(x)  # learns as it scores, value by value
        # the window's methods work at the values' scale (a power of two: exact), where a median
        # of two values near the float limit, or their spread, does not overflow; scores are ratios
        r = st.recent()
        k = pow2_scale(max(float(np.max(np.abs(r))), float(np.max(np.abs(x)))))
        r, xk = r / k, x / k
        for m in self.methods:
            if m == "isolation_forest":
                continue
            thr = float(self.thresholds[m])
            if m == "ewma":
                s = np.abs(np.nan_to_num(z_ewma, nan=0.0, posinf=np.inf, neginf=-np.inf)) / thr
            elif m == "z_score":
                s = _scaled(xk - st.moments.mean / k, st.moments.std / k) / thr
            elif m == "modified_z":
                med = np.median(r)
                mad = np.median(np.abs(r - med))
                # MAD of zero: the mean absolute deviation instead (its scale to a normal's sd is 1.2533)
                scale = mad / 0.6745 if mad > 0 else 1.2533 * np.mean(np.abs(r - med))
                s = _scaled(xk - med, scale) / thr
            else:  # iqr
                q1, q3 = np.percentile(r, [25, 75])
                iqr = q3 - q1
                if iqr <= 0:  # the middle half is one value: fences a normal's IQR (1.349 sd) wide instead
                    iqr = 1.349 * _std(r)
                lo, hi = q1 - thr * iqr, q3 + thr * iqr
                out_by = np.where(xk < lo, lo - xk, np.where(xk > hi, xk - hi, 0.0))
                s = np.where(out_by > 0, 1.0 + _scaled(out_by, iqr), 0.0)
            out[m] = s
        st.moments.add_batch(x)
        st.push(x)
        return out

    def _forest_scores(self, b: dict[str, Any], fields: list[str]) -> np.ndarray | None:
        cols = [b["values"][f] for f in fields if f in b["values"]]
        if len(cols) != len(fields) or not cols:
            return None
        X = np.column_stack(cols)
        complete = ~np.isnan(X).any(axis=1)
        scores = np.zeros(X.shape[0])
        Xc = X[complete]
        if self._forest is not None and Xc.shape[0]:
            pred = self._forest.predict(Xc)
            raw = -self._forest.decision_function(Xc)  # > 0 for outliers
            scores[complete] = np.where(pred == -1, 1.0 + np.maximum(raw, 0.0), 0.0)
        for row in Xc:
            self._rows.append(row)
        self._since_fit += Xc.shape[0]
        if len(self._rows) >= max(self.warmup, 32) and (self._forest is None or self._since_fit >= self.refit_every):
            from sklearn.ensemble import IsolationForest

            self._forest = IsolationForest(
                n_estimators=100, contamination=self.thresholds["isolation_forest"], random_state=self.seed
            ).fit(np.array(self._rows))
            self._since_fit = 0
        return scores

    def on_events(self, msg: EventBatch) -> None:
        n = int(msg["n"])
        if n == 0:
            return
        if not self.enabled:
            if self.downstream is not None:
                self.downstream.tell_bytes(encode(msg))
            return
        self.events += n
        if self.metrics is not None and msg["values"]:
            self._check_seen(msg["values"])
        fields = self.metrics if self.metrics is not None else list(msg["values"])
        score = np.zeros(n)
        hits: dict[int, tuple[set[str], set[str]]] = {}
        for f in fields:
            col = msg["values"].get(f)
            if col is None:
                continue
            ok = np.isfinite(col)
            if not ok.any():
                continue
            st = self.fields.get(f)
            if st is None:
                st = self.fields[f] = _FieldState(self.window, self.ewma_lambda)
            idx = np.flatnonzero(ok)
            for m, s in self._score_field(st, col[ok]).items():
                bad = s > 1.0
                for i, sc in zip(idx[bad].tolist(), s[bad].tolist(), strict=True):
                    h = hits.setdefault(i, (set(), set()))
                    h[0].add(m)
                    h[1].add(f)
                    score[i] = max(score[i], sc)
        if "isolation_forest" in self.methods:
            forest_fields = self.metrics if self.metrics is not None else sorted(msg["values"])
            fs = self._forest_scores(msg, forest_fields)
            if fs is not None:
                for i in np.flatnonzero(fs > 1.0).tolist():
                    h = hits.setdefault(i, (set(), set()))
                    h[0].add("isolation_forest")
                    h[1].update(forest_fields)
                    score[i] = max(score[i], float(fs[i]))
        for i, marks in msg.get("sparse", {}).get("nonfinite", ()):  # a value given as NaN or infinite
            watched = [f for f in marks if self.metrics is None or f in self.metrics]
            if watched:
                h = hits.setdefault(i, (set(), set()))
                h[0].add("nonfinite")
                h[1].update(watched)
                score[i] = SCORE_MAX
        if hits:
            self._record(msg, hits, score)
        if self._open is not None and int(msg["ts"].max()) - self._open["end"] > self.period_gap_us:
            self._close_period()  # event time has passed the gap with no anomaly: the period is over
        if self.downstream is not None:
            self.downstream.tell_bytes(encode(msg))

    def _check_seen(self, values: dict[str, Any]) -> None:
        """After :attr:`unseen_after` batches carrying values, say once which of ``metrics``
        none of them held, with the fields they did hold: a warning in the log and an
        :data:`UNSEEN_EVENT` event in the run's record. A metric seen later leaves the list."""
        if self._value_batches >= self.unseen_after:
            if self.unseen_metrics:
                self.unseen_metrics = [m for m in self.unseen_metrics if m not in values]
            return
        self._seen.update(values)
        self._value_batches += 1
        if self._value_batches < self.unseen_after:
            return
        note = self._unseen_note("the first")
        if note is not None and self.notes_to is not None:
            self.notes_to.tell(note)

    def _unseen_note(self, which: str) -> dict[str, Any] | None:
        """Make the check now (once): log the warning and return the note for the run's record,
        or None when every metric was seen. ``which``: of what events the note speaks."""
        assert self.metrics is not None
        batches, self._value_batches = self._value_batches, max(self._value_batches, self.unseen_after)
        self.unseen_metrics = [m for m in self.metrics if m not in self._seen]
        seen, self._seen = sorted(self._seen), set()
        if not self.unseen_metrics:
            return None
        shown = ", ".join(seen[:30]) + (f" and {len(seen) - 30} more" if len(seen) > 30 else "")
        log.warning(
            "anomaly.metrics names fields no event has carried; nothing is watched for them",
            experiment=self.experiment_id,
            unseen=self.unseen_metrics,
            events=self.events,
            fields_seen=seen[:30],
        )
        return {
            "kind": "note",
            "name": UNSEEN_EVENT,
            "values": {"unseen_metrics": float(len(self.unseen_metrics))},
            "notes": f"anomaly.metrics: {', '.join(self.unseen_metrics)} in none of {which} "
            f"{self.events:,} events ({batches} batches), which carried {shown}",
        }

    def handle_last_notes(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        """The phase asks this as the run's events end (see ``PhaseActor(last_notes_from=)``):
        a run too short for :attr:`unseen_after` batches still hears of a misspelt metric,
        judged on every event it sent (they were all delivered before this ask)."""
        if not self.enabled or self.metrics is None or not 0 < self._value_batches < self.unseen_after:
            return []  # nothing to watch, already said, or no values came (nothing to judge by)
        note = self._unseen_note("the run's")
        return [] if note is None else [note]

    def _record(self, b: dict[str, Any], hits: dict[int, tuple[set[str], set[str]]], score: np.ndarray) -> None:
        items = []
        anno = b.setdefault("sparse", {}).setdefault("anomaly", [])
        names, phases = b["names"], b["phases"]
        for i in sorted(hits):
            methods, fields = sorted(hits[i][0]), sorted(hits[i][1])
            sc = float(score[i])
            severity = "high" if sc >= 3 else "medium" if sc >= 1.5 else "low"
            flag = {
                "flag": True,
                "score": round(sc, 4),
                "methods": methods,
                "fields": fields,
                "severity": severity,
                "action": self.action,
            }
            anno.append([i, flag])
            pc = int(b["phase"][i])
            item = {
                "seq": int(b["seq"][i]) if "seq" in b else None,
                "ts": int(b["ts"][i]),
                "run_id": b.get("run_id"),
                "name": names[int(b["name"][i])],
                "phase": phases[pc] if pc >= 0 else None,
                "values": {
                    f: float(b["values"][f][i])
                    for f in fields
                    if f in b["values"] and b["values"][f][i] == b["values"][f][i]
                },
                **flag,
            }
            items.append(item)
            self.kept.append(item)
            self.total += 1
            for m in methods:
                self.by_method[m] = self.by_method.get(m, 0) + 1
            for f in fields:
                self.by_field[f] = self.by_field.get(f, 0) + 1
            self._period(item)
        if self.action == "alert":
            log.warning(
                "anomalies detected",
                experiment=self.experiment_id,
                count=len(items),
                first=items[0]["values"],
                methods=items[0]["methods"],
            )
        if self.topics is not None:
            self.topics.publish("anomalies", {"kind": "anomalies", "experiment_id": self.experiment_id, "items": items})

    def _period(self, item: dict[str, Any]) -> None:
        rank = {"low": 0, "medium": 1, "high": 2}
        p = self._open
        if p is not None and item["ts"] - p["end"] <= self.period_gap_us:
            p["end"] = item["ts"]
            p["count"] += 1
            if rank[item["severity"]] > rank[p["severity"]]:
                p["severity"] = item["severity"]
            p["max_score"] = max(p["max_score"], item["score"])
            return
        if p is not None:
            self._close_period()
        self._open = {
            "start": item["ts"],
            "end": item["ts"],
            "count": 1,
            "severity": item["severity"],
            "max_score": item["score"],
        }
        self.periods.append(self._open)
        if self.topics is not None:
            self.topics.publish(
                "anomalies",
                {"kind": "anomaly_period", "state": "start", "experiment_id": self.experiment_id, **self._open},
            )

    def _close_period(self) -> None:
        if self._open is not None and self.topics is not None:
            self.topics.publish(
                "anomalies",
                {"kind": "anomaly_period", "state": "end", "experiment_id": self.experiment_id, **self._open},
            )
        self._open = None

    # --- answering ------------------------------------------------------------------------------

    def handle_get_anomalies(self, msg: dict[str, Any]) -> list[dict[str, Any]]:
        n = msg.get("n", len(self.kept))
        if isinstance(n, bool) or not isinstance(n, int):  # get_anomalies() refuses it first; never crash here
            log.warning("get_anomalies: n must be an integer; answering nothing", n=repr(n))
            return []
        return list(self.kept)[-n:] if n > 0 else []

    def handle_anomaly_metrics(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {
            "total": self.total,
            "events": self.events,
            "rate": self.total / self.events if self.events else 0.0,
            "by_type": dict(self.by_method),
            "by_field": dict(self.by_field),
            "periods": [dict(p) for p in self.periods],
            "bad_batches": self.bad_batches,
            "unseen_metrics": list(self.unseen_metrics),
        }

    def handle_counters(self, msg: dict[str, Any]) -> None:
        if self.counters_ok(msg) and self.downstream is not None:
            self.downstream.tell_bytes(encode(msg))

    def terminate(self, reason: str) -> None:
        self._close_period()


def get_anomalies(anomaly_ref: Any, n: int | None = None, timeout: float | None = 5.0) -> list[dict[str, Any]]:
    msg: dict[str, Any] = {"kind": "get_anomalies"}
    if n is not None:
        if isinstance(n, bool) or not isinstance(n, int):
            raise ValueError(f"get_anomalies: n must be an integer, got {n!r}")
        msg["n"] = n
    return anomaly_ref.ask(msg, timeout=timeout)


def anomaly_metrics(anomaly_ref: Any, timeout: float | None = 5.0) -> dict[str, Any]:
    return anomaly_ref.ask({"kind": "anomaly_metrics"}, timeout=timeout)
