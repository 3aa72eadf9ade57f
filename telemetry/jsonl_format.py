"""JSONL lines for a columnar event batch: the event schema's text, assembled by a numba kernel.

Building one dict per event and serialising it costs microseconds per event in Python.
Here the per-event work runs in one ``nogil`` kernel (:func:`kernels.jsonl.format_rows`):
it copies pre-escaped string pieces and writes integers digit by digit. Floats are rendered
by orjson in one call per value column (shortest round-trip form, the same text orjson
gives inside a dict), and the kernel splices the pieces. Parameter snapshots and GPU
reasons are per-batch string tables like names. Rows with the rare sparse fields (notes,
anomaly) are re-rendered through orjson afterwards.

The output parses to exactly what :func:`telemetry.schema.batch_rows` gives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson

from kernels.jsonl import format_rows
from telemetry.schema import GPU_MODES, SCHEMA_VERSION, SPARSE_FIELDS, EventBatch

_COMMA = ord(",")


def _table(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    off = np.zeros(len(strings) + 1, dtype=np.int64)
    off[1:] = np.cumsum([len(s) for s in strings]) if strings else []
    buf = np.frombuffer(b"".join(strings), dtype=np.uint8) if strings else np.zeros(0, np.uint8)
    return buf, off


def _json(s: str) -> bytes:
    return orjson.dumps(s)


def format_batch(batch: EventBatch) -> bytes:
    """The JSONL bytes (one line per event, each ending in a newline) of a decoded batch."""
    n = int(batch["n"])
    if n == 0:
        return b""
    pieces = [
        b'{"v":' + str(SCHEMA_VERSION).encode() + b',"seq":',
        b',"ts":',
        b',"experiment_id":' + _json(batch["experiment_id"]) + b',"run_id":' + _json(batch["run_id"]) + b',"pass":',
        b',"name":',
        b',"phase":',
        b',"success":true',
        b',"success":false',
        b',"gpu_mode":',
        b',"step":',
        b',"values":{',
        b"}}\n",
        b',"gpu_reason":',
        b',"parameters":',
    ]
    pbuf, poff = _table(pieces)
    names, noff = _table([_json(x) for x in batch["names"]])
    phases, phoff = _table([_json(x) for x in batch["phases"]])
    gpus, goff = _table([_json(x) for x in GPU_MODES])
    reasons, roff = _table([_json(x) for x in batch.get("reasons", [])])
    # parameter snapshots travel as JSON text; normalise through orjson so the bytes match it exactly
    params, pmoff = _table([orjson.dumps(orjson.loads(t)) for t in batch.get("param_texts", [])])
    vkeys = list(batch["values"])
    keys, koff = _table([_json(k) + b":" for k in vkeys])
    nk = len(vkeys)
    vstart = np.zeros((nk, n), dtype=np.int64)
    vend = np.zeros((nk, n), dtype=np.int64)
    present = np.zeros((nk, n), dtype=np.bool_)
    texts = []
    base = 0
    for k, key in enumerate(vkeys):
        col = np.asarray(batch["values"][key], dtype=np.float64)
        present[k] = np.isfinite(col)
        txt = orjson.dumps(col.tolist())[1:-1]  # "1.0,null,2.5"
        raw = np.frombuffer(txt, dtype=np.uint8)
        commas = np.flatnonzero(raw == _COMMA)
        vstart[k, 0] = base
        vstart[k, 1:] = base + commas + 1
        vend[k, :-1] = base + commas
        vend[k, -1] = base + len(txt)
        texts.append(txt)
        base += len(txt)
    vtxt = np.frombuffer(b"".join(texts), dtype=np.uint8) if texts else np.zeros(0, np.uint8)
    longest = max([len(x) for x in pieces])
    widest = sum(int(np.diff(o).max(initial=0)) for o in (noff, phoff, goff, roff, pmoff))
    bound = n * (sum(len(x) for x in pieces) + 4 * 21 + widest + longest) + int(vtxt.size) + n * int(koff[-1] + nk)
    out = np.empty(bound, dtype=np.uint8)
    ends = np.empty(n, dtype=np.int64)
    minus = np.full(n, -1, dtype=np.int64)

    def col(k: str) -> np.ndarray:
        return np.ascontiguousarray(batch[k], np.int64) if k in batch else minus

    columns = [col(k) for k in ("seq", "ts", "pass", "step", "name", "phase", "success", "gpu", "reason", "params")]
    tables = (pbuf, poff, names, noff, phases, phoff, gpus, goff, reasons, roff, params, pmoff, keys, koff)
    used = format_rows(out, ends, *columns, *tables, vtxt, vstart, vend, present)  # in the kernel's order
    data = out[:used].tobytes()
    sparse = {f: e for f, e in batch.get("sparse", {}).items() if f in SPARSE_FIELDS and e}
    if not sparse:
        return data
    extra: dict[int, dict[str, Any]] = {}
    for f, entries in sparse.items():
        for i, x in entries:
            extra.setdefault(int(i), {})[f] = x
    starts = np.concatenate(([0], ends[:-1]))
    lines = []
    prev = 0
    for i in sorted(extra):
        a, b = int(starts[i]), int(ends[i])
        lines.append(data[prev:a])
        row = orjson.loads(data[a:b])
        row.update(extra[i])
        lines.append(orjson.dumps(row, option=orjson.OPT_APPEND_NEWLINE))
        prev = b
    lines.append(data[prev:])
    return b"".join(lines)
