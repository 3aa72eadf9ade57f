"""The numba kernel that assembles JSONL lines from a columnar batch (the Recorder's hot path).

It knows no schema: :func:`telemetry.jsonl_format.format_batch` hands it the pre-escaped
pieces and string tables of the event schema.

Building one dict per event and serialising it costs microseconds per event in Python.
Here the per-event work runs in one ``nogil`` numba kernel: it copies pre-escaped string
pieces and writes integers digit by digit. Floats are rendered by orjson in one call per
value column (shortest round-trip form, the same text orjson gives inside a dict), and the
kernel splices the pieces. Parameter snapshots and GPU reasons are per-batch string
tables like names. Rows with the rare sparse fields (notes, anomaly) are re-rendered
through orjson afterwards.

"""

from __future__ import annotations

from numba import njit

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
def format_rows(
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
