"""The live, time-ordered columnar index of a run's recent events (bounded memory).

Columns are numpy arrays that grow by doubling; ``ts`` stays sorted, so a time window
is two binary searches (``np.searchsorted``), never a scan. Past ``limit`` rows the
oldest half is dropped (the SQLite history keeps everything).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from telemetry.query import Window, check_filters, row_matches, windowed_metrics_arrays
from telemetry.schema import CODED_COLUMNS, GPU_MODES, SCHEMA_VERSION, SPARSE_FIELDS

_INT_COLS = {"ts": np.int64, "seq": np.int64, "step": np.int64, "pass": np.int32, "name": np.int32,
             "phase": np.int32, "success": np.int8, "gpu": np.int8, "reason": np.int32, "params": np.int32}


class LiveIndex:
    """Columnar events of one experiment, sorted by ``ts``."""

    def __init__(self, experiment_id: str, limit: int = 1_000_000) -> None:
        self.experiment_id = experiment_id
        self.limit = max(16, limit)
        self.n = 0
        self.cap = 1024
        self.cols = {k: np.zeros(self.cap, dtype=t) for k, t in _INT_COLS.items()}
        self.values: dict[str, np.ndarray] = {}
        self.sparse: dict[int, dict[str, Any]] = {}  # absolute row number -> sparse fields
        self.run_ids: list[str] = []
        self.run_c = np.zeros(self.cap, dtype=np.int16)
        self.base = 0  # absolute row number of row 0 (rows dropped so far)
        # global string tables for the coded columns (name, phase, reason, params)
        self.tables: dict[str, list[Any]] = {c: [] for c in CODED_COLUMNS}
        self.codes: dict[str, dict[Any, int]] = {c: {} for c in CODED_COLUMNS}
        self._parsed_params: dict[int, Any] = {}

    # --- appending ---------------------------------------------------------------------

    def _grow(self, need: int) -> None:
        if need <= self.cap:
            return
        cap = self.cap
        while cap < need:
            cap *= 2
        for k in self.cols:
            self.cols[k] = np.resize(self.cols[k], cap)
        for k in self.values:
            self.values[k] = np.resize(self.values[k], cap)
        self.run_c = np.resize(self.run_c, cap)
        self.cap = cap

    @staticmethod
    def _recode(local: list[str], table: list[str], codes: dict[str, int], col: np.ndarray) -> np.ndarray:
        """Map a batch's local string codes to this index's global codes (-1 stays -1)."""
        mapping = np.empty(len(local) + 1, dtype=np.int32)
        for j, s in enumerate(local):
            code = codes.get(s)
            if code is None:
                code = codes[s] = len(table)
                table.append(s)
            mapping[j] = code
        mapping[-1] = -1
        return mapping[col]

    def append_batch(self, b: dict[str, Any]) -> None:
        """Add a decoded ``events`` batch (rows sorted by ``ts`` within the batch)."""
        m = int(b["n"])
        if m == 0:
            return
        if self.n + m > self.limit:
            self._drop_oldest(max(self.n // 2, self.n + m - self.limit))
        self._grow(self.n + m)
        a, z = self.n, self.n + m
        c = self.cols
        for k in ("ts", "seq", "step", "pass", "success", "gpu"):
            c[k][a:z] = b[k]
        for col, table in CODED_COLUMNS.items():
            if col in b:
                c[col][a:z] = self._recode(b[table], self.tables[col], self.codes[col], b[col])
            else:
                c[col][a:z] = -1
        if b["run_id"] not in self.run_ids:
            self.run_ids.append(b["run_id"])
        self.run_c[a:z] = self.run_ids.index(b["run_id"])
        for k, col in b["values"].items():
            if k not in self.values:
                self.values[k] = np.full(self.cap, np.nan)
            self.values[k][a:z] = col
        for k in self.values:
            if k not in b["values"]:
                self.values[k][a:z] = np.nan
        for f in SPARSE_FIELDS:
            for i, x in b.get("sparse", {}).get(f, ()):
                self.sparse.setdefault(self.base + a + i, {})[f] = x
        if a > 0 and c["ts"][a] < c["ts"][a - 1]:
            self._resort(z)
        self.n = z

    def _resort(self, n: int) -> None:
        # Rare: a batch from a restarted emitter whose clock stepped back. Stable re-sort.
        order = np.argsort(self.cols["ts"][:n], kind="stable")
        for k in self.cols:
            self.cols[k][:n] = self.cols[k][:n][order]
        for k in self.values:
            self.values[k][:n] = self.values[k][:n][order]
        self.run_c[:n] = self.run_c[:n][order]
        old_to_new = np.empty(n, dtype=np.int64)
        old_to_new[order] = np.arange(n)
        self.sparse = {self.base + int(old_to_new[r - self.base]): v for r, v in self.sparse.items()}

    def _drop_oldest(self, k: int) -> None:
        k = min(k, self.n)
        for name in self.cols:
            self.cols[name][: self.n - k] = self.cols[name][k: self.n]
        for name in self.values:
            self.values[name][: self.n - k] = self.values[name][k: self.n]
        self.run_c[: self.n - k] = self.run_c[k: self.n]
        self.base += k
        self.sparse = {r: v for r, v in self.sparse.items() if r >= self.base}
        self.n -= k

    # --- reading -------------------------------------------------------------------------

    @property
    def ts(self) -> np.ndarray:
        return self.cols["ts"][: self.n]

    def _params(self, code: int) -> Any:
        if code < 0:
            return None
        p = self._parsed_params.get(code)
        if p is None:
            p = self._parsed_params[code] = orjson.loads(self.tables["params"][code])
        return p

    def rows(self, idx: np.ndarray) -> list[dict[str, Any]]:
        """Full event dicts (every optional field present) for the given row positions."""
        c = self.cols
        vals = [(k, v[idx].tolist()) for k, v in self.values.items()]
        names, phases, reasons = self.tables["name"], self.tables["phase"], self.tables["reason"]
        templates: dict[tuple[int, ...], dict[str, Any]] = {}
        out = []
        sparse, base = self.sparse, self.base
        for j, (i, sq, t, ps, nc, pc, su, gp, rc, stp, prc, rn) in enumerate(zip(
                idx.tolist(), *(c[k][idx].tolist() for k in ("seq", "ts", "pass", "name", "phase", "success", "gpu",
                                                             "reason", "step", "params")),
                self.run_c[idx].tolist(), strict=True)):
            key = (ps, nc, pc, su, gp, rc, prc, rn)
            tmpl = templates.get(key)
            if tmpl is None:
                tmpl = templates[key] = {
                    "v": SCHEMA_VERSION, "seq": 0, "ts": 0, "experiment_id": self.experiment_id,
                    "run_id": self.run_ids[rn], "pass": ps, "name": names[nc],
                    "phase": phases[pc] if pc >= 0 else None, "success": None if su < 0 else bool(su),
                    "gpu_mode": GPU_MODES[gp] if gp >= 0 else None, "gpu_reason": reasons[rc] if rc >= 0 else None,
                    "step": None, "parameters": self._params(prc), "values": None, "notes": None, "anomaly": None,
                }
            r = tmpl.copy()
            r["seq"] = sq
            r["ts"] = t
            if stp >= 0:
                r["step"] = stp
            v = {}
            for k, col in vals:
                x = col[j]
                if x == x:  # NaN = absent
                    v[k] = x
            r["values"] = v
            sp = sparse.get(base + i)
            if sp:
                r.update(sp)
            out.append(r)
        return out

    def _mask(self, a: int, b: int, filters: dict[str, Any]) -> np.ndarray:
        mask = np.ones(b - a, dtype=bool)
        c = self.cols
        for k, want in filters.items():
            if k in ("name", "phase"):
                code = -1 if want is None else self.codes[k].get(want, -2)
                mask &= c[k][a:b] == code
            elif k == "success":
                mask &= c["success"][a:b] == (-1 if want is None else int(bool(want)))
            elif k == "run_id":
                code = self.run_ids.index(want) if want in self.run_ids else -2
                mask &= self.run_c[a:b] == code
        return mask

    def query(self, spec: Any, filters: dict[str, Any] | None = None, now_us: int | None = None) -> list[Any]:
        """Events matching a window spec (see :mod:`telemetry.query`), oldest first."""
        w = Window(spec, now_us)
        filters = check_filters(filters)
        ts = self.ts
        if w.kind == "sliding":
            if self.n == 0:
                return []
            out = []
            for s in range(int(ts[0]), int(ts[-1]) + 1, w.step_us):
                out.append({"window_start": s, "window_end": s + w.size_us,
                            "events": self._select(int(np.searchsorted(ts, s)),
                                                   int(np.searchsorted(ts, s + w.size_us)), filters)})
            return out
        if w.last_n is not None:
            return self._select_last_n(w.last_n, filters)
        a = 0 if w.lo is None else int(np.searchsorted(ts, w.lo, "left"))
        b = self.n if w.hi is None else int(np.searchsorted(ts, w.hi, "left"))
        return self._select(a, b, filters)

    def _select(self, a: int, b: int, filters: dict[str, Any]) -> list[dict[str, Any]]:
        idx = np.arange(a, b)[self._mask(a, b, filters)] if filters else np.arange(a, b)
        rows = self.rows(idx)
        param_f = {k: v for k, v in filters.items() if k.startswith(("parameters.", "metadata."))}
        return [r for r in rows if row_matches(r, param_f)] if param_f else rows

    def _select_last_n(self, n: int, filters: dict[str, Any]) -> list[dict[str, Any]]:
        if n == 0:
            return []
        out: list[dict[str, Any]] = []
        b, chunk = self.n, max(n, 256)
        while b > 0 and len(out) < n:
            a = max(0, b - chunk)
            out = self._select(a, b, filters) + out
            b, chunk = a, chunk * 2
        return out[-n:]

    def windowed_metrics(self, window_s: float, step_s: float, fields: list[str] | None = None,
                         filters: dict[str, Any] | None = None) -> list[dict[str, Any]]:
        filters = check_filters(filters)
        ts = self.ts
        keys = fields if fields is not None else list(self.values)
        if filters:
            idx = np.arange(self.n)[self._mask(0, self.n, filters)]
            cols = {k: self.values[k][: self.n][idx] for k in keys if k in self.values}
            return windowed_metrics_arrays(ts[idx], cols, window_s, step_s)
        return windowed_metrics_arrays(ts, {k: self.values[k][: self.n] for k in keys if k in self.values},
                                       window_s, step_s)
