"""The live, time-ordered columnar index of a run's recent events (bounded memory).

Columns are numpy arrays that grow by doubling; ``ts`` stays sorted, so a time window
is two binary searches (``np.searchsorted``), never a scan; filters are column masks, and
only the selected events become dicts. Past ``limit`` rows the oldest half is dropped (the
SQLite history keeps everything); a query asked with ``complete=True`` that would need
dropped events raises :class:`IndexIncomplete`, and the Recorder then asks the history.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import orjson

from telemetry.query import (
    MAX_ROWS,
    MAX_WINDOWS,
    Window,
    check_filters,
    check_rows,
    check_step,
    code_mask,
    param_filters,
    param_mask,
    plan_windows,
    present_fields,
    windowed_metrics_arrays,
)
from telemetry.schema import CODED_COLUMNS, GPU_MODES, SCHEMA_VERSION, SPARSE_FIELDS

_INT_COLS = {
    "ts": np.int64,
    "seq": np.int64,
    "step": np.int64,
    "pass": np.int32,
    "name": np.int32,
    "phase": np.int32,
    "success": np.int8,
    "gpu": np.int8,
    "reason": np.int32,
    "params": np.int32,
}


class IndexIncomplete(LookupError):
    """The index has dropped events that the answer could need: ask the history instead."""


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
        """Add a decoded ``events`` batch (kept sorted by ``ts``: a batch out of order is merged in)."""
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
        if (a > 0 and c["ts"][a] < c["ts"][a - 1]) or (m > 1 and bool(np.any(c["ts"][a + 1 : z] < c["ts"][a : z - 1]))):
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
            self.cols[name][: self.n - k] = self.cols[name][k : self.n]
        for name in self.values:
            self.values[name][: self.n - k] = self.values[name][k : self.n]
        self.run_c[: self.n - k] = self.run_c[k : self.n]
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
        for j, (i, sq, t, ps, nc, pc, su, gp, rc, stp, prc, rn) in enumerate(
            zip(
                idx.tolist(),
                *(
                    c[k][idx].tolist()
                    for k in ("seq", "ts", "pass", "name", "phase", "success", "gpu", "reason", "step", "params")
                ),
                self.run_c[idx].tolist(),
                strict=True,
            )
        ):
            key = (ps, nc, pc, su, gp, rc, prc, rn)
            tmpl = templates.get(key)
            if tmpl is None:
                tmpl = templates[key] = {
                    "v": SCHEMA_VERSION,
                    "seq": 0,
                    "ts": 0,
                    "experiment_id": self.experiment_id,
                    "run_id": self.run_ids[rn],
                    "pass": ps,
                    "name": names[nc],
                    "phase": phases[pc] if pc >= 0 else None,
                    "success": None if su < 0 else bool(su),
                    "gpu_mode": GPU_MODES[gp] if gp >= 0 else None,
                    "gpu_reason": reasons[rc] if rc >= 0 else None,
                    "step": None,
                    "parameters": self._params(prc),
                    "values": None,
                    "notes": None,
                    "anomaly": None,
                    "nonfinite": None,
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

    def _matching(self, a: int, b: int, filters: dict[str, Any]) -> np.ndarray:
        """Row positions in ``[a, b)`` that pass the filters (column masks; no row is built)."""
        pos = np.arange(a, b)
        if not filters:
            return pos
        mask = np.ones(b - a, dtype=bool)
        c = self.cols
        for k, want in filters.items():
            if k in ("name", "phase"):
                mask &= code_mask(c[k][a:b], self.tables[k], want)
            elif k == "success":
                mask &= c["success"][a:b] == (-1 if want is None else int(bool(want)))
            elif k == "run_id":
                mask &= code_mask(self.run_c[a:b], self.run_ids, want)
        pf = param_filters(filters)
        if pf and mask.any():
            mask[mask] &= param_mask(c["params"][a:b][mask], self._params, pf)
        return pos[mask]

    def query(
        self,
        spec: Any,
        filters: dict[str, Any] | None = None,
        now_us: int | None = None,
        *,
        max_rows: int = MAX_ROWS,
        max_windows: int = MAX_WINDOWS,
        complete: bool = False,
    ) -> list[Any]:
        """Events matching a window spec (see :mod:`telemetry.query`), oldest first.

        With ``complete``, raises :class:`IndexIncomplete` when the answer could miss events
        this bounded index has already dropped (the caller then asks the history).
        Raises :class:`~telemetry.query.QueryError` for a bad spec and
        :class:`~telemetry.query.QueryLimitError` past the limits.
        """
        if now_us is None and self.n:  # "now" is never before the newest event (the wall clock stepped back)
            now_us = max(int(time.time() * 1e6), int(self.ts[self.n - 1]))
        w = Window(spec, now_us)
        filters = check_filters(filters)
        ts = self.ts
        dropped = complete and self.base > 0
        if w.kind == "sliding":
            if dropped:
                raise IndexIncomplete("sliding windows start at the run's first event")
            idx = self._matching(0, self.n, filters)
            check_rows(idx.size, max_rows)
            starts, lo, hi = plan_windows(ts[idx], w.size_us, w.step_us, max_windows, max_rows)
            return [
                {"window_start": s, "window_end": s + w.size_us, "events": self.rows(idx[a:b])}
                for s, a, b in zip(starts.tolist(), lo.tolist(), hi.tolist(), strict=True)
            ]
        if w.last_n is not None:
            idx = self._last_n(w.last_n, filters)
            if dropped and idx.size < w.last_n:
                raise IndexIncomplete("fewer matching events than asked for are left in the index")
            check_rows(idx.size, max_rows)
            return self.rows(idx)
        if dropped and (w.lo is None or self.n == 0 or w.lo <= int(ts[0])):
            raise IndexIncomplete("the window reaches back before the oldest event in the index")
        a = 0 if w.lo is None else int(np.searchsorted(ts, w.lo, "left"))
        b = self.n if w.hi is None else int(np.searchsorted(ts, w.hi, "left"))
        idx = self._matching(a, max(a, b), filters)
        check_rows(idx.size, max_rows)
        return self.rows(idx)

    def _last_n(self, n: int, filters: dict[str, Any]) -> np.ndarray:
        """Positions of the last ``n`` matching rows, searched backwards in growing chunks."""
        if n == 0:
            return np.empty(0, dtype=np.int64)
        parts: list[np.ndarray] = []
        got, b, chunk = 0, self.n, max(n, 256)
        while b > 0 and got < n:
            a = max(0, b - chunk)
            part = self._matching(a, b, filters)
            parts.append(part)
            got += part.size
            b, chunk = a, chunk * 2
        idx = np.concatenate(parts[::-1]) if parts else np.empty(0, dtype=np.int64)
        return idx[-n:]

    def windowed_metrics(
        self,
        window_s: float,
        step_s: float,
        fields: list[str] | None = None,
        filters: dict[str, Any] | None = None,
        *,
        max_windows: int = MAX_WINDOWS,
        complete: bool = False,
    ) -> list[dict[str, Any]]:
        """Per-window metrics of the value fields (see :func:`telemetry.query.windowed_metrics_arrays`)."""
        check_step(window_s, "window_s")
        check_step(step_s, "step_s")
        filters = check_filters(filters)
        if complete and self.base > 0:
            raise IndexIncomplete("windowed metrics start at the run's first event")
        idx = self._matching(0, self.n, filters)
        cols = {k: v[: self.n][idx] for k, v in self.values.items()}
        keys = present_fields(cols, fields)
        cols = {k: cols.get(k, np.full(idx.size, np.nan)) for k in keys}
        return windowed_metrics_arrays(self.ts[idx], cols, window_s, step_s, max_windows=max_windows)
