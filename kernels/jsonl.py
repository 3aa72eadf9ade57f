"""JSONL lines for a columnar event batch, assembled by a numba kernel (the Recorder's hot path).

Building one dict per event and serialising it costs microseconds per event in Python.
Here the per-event work runs in one ``nogil`` numba kernel: it copies pre-escaped string
pieces and writes integers digit by digit. Floats are rendered by orjson in one call per
value column (shortest round-trip form, the same text orjson gives inside a dict), and the
kernel splices the pieces. Parameter snapshots and GPU reasons are per-batch string
tables like names. Rows with the rare sparse fields (notes, anomaly) are re-rendered
through orjson afterwards.

The output parses to exactly what :func:`telemetry.schema.batch_rows` gives.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import orjson
from numba import njit

from telemetry.schema import GPU_MODES, SCHEMA_VERSION, SPARSE_FIELDS

_COMMA = ord(",")


@njit(cache=True, nogil=True)
def _put(out, pos, src, a, b):  # pragma: no cover - compiled
    for i in range(a, b):
        out[pos] = src[i]
        pos += 1
    return pos


@njit(cache=True, nogil=True)
def _put_int(out, pos, x):  # pragma: no cover - compiled
    if x < 0:
        out[pos] = 45  # '-'
        pos += 1
        x = -x
    if x == 0:
        out[pos] = 48
        return pos + 1
    start = pos
    while x > 0:
        out[pos] = 48 + x % 10
        x //= 10
        pos += 1
    i, j = start, pos - 1
    while i < j:
        out[i], out[j] = out[j], out[i]
        i += 1
        j -= 1
    return pos


@njit(cache=True, nogil=True)
def _format(
    out,
    ends,
    seq,
    ts,
    pas,
    step,
    name_c,
    phase_c,
    succ,
    gpu,
    reason_c,  # pragma: no cover
    param_c,
    pieces,
    poff,
    names,
    noff,
    phases,
    phoff,
    gpus,
    goff,
    reasons,
    roff,
    params,
    pmoff,
    keys,
    koff,
    vtxt,
    vstart,
    vend,
    present,
):
    # pieces: 0 '{"v":1,"seq":'  1 ',"ts":'  2 ',"experiment_id":E,"run_id":R,"pass":'  3 ',"name":'
    #         4 ',"phase":'  5 ',"success":true'  6 ',"success":false'  7 ',"gpu_mode":'  8 ',"step":'
    #         9 ',"values":{'  10 '}}\n'  11 ',"gpu_reason":'  12 ',"parameters":'
    pos = 0
    nk = koff.shape[0] - 1
    for i in range(seq.shape[0]):
        pos = _put(out, pos, pieces, poff[0], poff[1])
        pos = _put_int(out, pos, seq[i])
        pos = _put(out, pos, pieces, poff[1], poff[2])
        pos = _put_int(out, pos, ts[i])
        pos = _put(out, pos, pieces, poff[2], poff[3])
        pos = _put_int(out, pos, pas[i])
        pos = _put(out, pos, pieces, poff[3], poff[4])
        c = name_c[i]
        pos = _put(out, pos, names, noff[c], noff[c + 1])
        c = phase_c[i]
        if c >= 0:
            pos = _put(out, pos, pieces, poff[4], poff[5])
            pos = _put(out, pos, phases, phoff[c], phoff[c + 1])
        if succ[i] == 1:
            pos = _put(out, pos, pieces, poff[5], poff[6])
        elif succ[i] == 0:
            pos = _put(out, pos, pieces, poff[6], poff[7])
        c = gpu[i]
        if c >= 0:
            pos = _put(out, pos, pieces, poff[7], poff[8])
            pos = _put(out, pos, gpus, goff[c], goff[c + 1])
        c = reason_c[i]
        if c >= 0:
            pos = _put(out, pos, pieces, poff[11], poff[12])
            pos = _put(out, pos, reasons, roff[c], roff[c + 1])
        if step[i] >= 0:
            pos = _put(out, pos, pieces, poff[8], poff[9])
            pos = _put_int(out, pos, step[i])
        c = param_c[i]
        if c >= 0:
            pos = _put(out, pos, pieces, poff[12], poff[13])
            pos = _put(out, pos, params, pmoff[c], pmoff[c + 1])
        pos = _put(out, pos, pieces, poff[9], poff[10])
        first = True
        for k in range(nk):
            if present[k, i]:
                if not first:
                    out[pos] = _COMMA
                    pos += 1
                first = False
                pos = _put(out, pos, keys, koff[k], koff[k + 1])
                pos = _put(out, pos, vtxt, vstart[k, i], vend[k, i])
        pos = _put(out, pos, pieces, poff[10], poff[11])
        ends[i] = pos
    return pos


def _table(strings: list[bytes]) -> tuple[np.ndarray, np.ndarray]:
    off = np.zeros(len(strings) + 1, dtype=np.int64)
    off[1:] = np.cumsum([len(s) for s in strings]) if strings else []
    buf = np.frombuffer(b"".join(strings), dtype=np.uint8) if strings else np.zeros(0, np.uint8)
    return buf, off


def _json(s: str) -> bytes:
    return orjson.dumps(s)


def format_batch(batch: dict[str, Any]) -> bytes:
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

    used = _format(
        out,
        ends,
        col("seq"),
        col("ts"),
        col("pass"),
        col("step"),
        col("name"),
        col("phase"),
        col("success"),
        col("gpu"),
        col("reason"),
        col("params"),
        pbuf,
        poff,
        names,
        noff,
        phases,
        phoff,
        gpus,
        goff,
        reasons,
        roff,
        params,
        pmoff,
        keys,
        koff,
        vtxt,
        vstart,
        vend,
        present,
    )
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
