"""The ``latency`` workload: times real calls, Crucible-style.

``target`` is either a Python callable given by import path (``"package.module:function"``)
or an ``http://`` / ``https://`` URL fetched with GET. Each call is timed with
``time.perf_counter``; the event carries ``latency_ms`` and ``success`` (an exception, an
HTTP status >= 400 or a timeout is a failure, with the error in ``notes``), and, when the
callable returns a dict, each of its numeric fields (``cost_usd``, ``tokens_prompt``, a
``loss``...) as a value of its own, up to :data:`MAX_FIELDS` fields. A field that cannot be
a value (text, a bool, ``latency_ms`` itself, a name that is not a field name, one past the
bound) is left out and said once: a log warning and the ``notes`` of the call that first
returned it. Nothing is simulated: the numbers are the calls' own.

``concurrency`` is the load the target is measured under: with 1 (the default) the calls of
a step run one after another on the phase's thread; with N they run on N threads at once,
each call timed on its own thread, and the events follow in the order the calls were made.
It is a control hook too (``set_param("concurrency", N)``), and hypertune's arms
(``concurrency_up``, ``concurrency_down``) double or halve it. The objective is the lowest
``latency_ms`` of a successful call; the instance family is the target.
"""

from __future__ import annotations

import asyncio
import importlib
import re
import threading
import time
import urllib.error
import urllib.request
from collections import deque
from collections.abc import Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, ClassVar

from actors.log import get_logger
from experiments.validate import Num
from experiments.workloads.base import Arm, Control, Objective
from telemetry.emitter import Emitter

log = get_logger("experiments.workloads.latency")

PASSED_THROUGH = ("cost_usd", "tokens_prompt", "tokens_completion")
"""The fields the metrics total (``actors.streaming_metrics.TOTAL_FIELDS``); they pass as any
other numeric field a callable returns does (this list no longer bounds what passes)."""
MAX_FIELDS = 32
"""The most distinct fields a callable's results add to a run: each is a column of every batch
and a metric of every window, so a target returning a new key per call must not grow them
without end. Past it a new field is left out (and said once)."""
RESERVED = ("latency_ms",)
"""The workload's own measurement: a field of that name in a result never replaces it."""
FIELD_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.-]{0,63}$")
"""What a passed-through field's name must look like: an alert or a ``--metric`` can name it."""
MAX_CONCURRENCY = 256
TUNABLE = ("calls_per_step", "concurrency", "timeout_s")
DEFAULTS: dict[str, Any] = {
    "target": "experiments.workloads.latency:checksum_work",
    "calls": 0,
    "calls_per_step": 20,
    "concurrency": 1,
    "timeout_s": 10.0,
    "args": [],
    "kwargs": {},
}
RANGES = {
    "calls": Num(0, 10**12, integer=True),
    "calls_per_step": Num(1, 100_000, integer=True),
    "concurrency": Num(1, MAX_CONCURRENCY, integer=True),
    "timeout_s": Num(0.001, 3600),
}
"""The documented range of each numeric parameter (0 calls = until the time budget)."""


CHECKSUM_MAX_BYTES = 64 * 2**20  # a lab daemon allows this target to anyone with its token
CHECKSUM_BUDGET_BYTES = 256 * 2**20
"""The bytes all :func:`checksum_work` calls of a process hold at once: a call past it waits
for room. Without it, ``concurrency`` (up to 256, and steerable) times the per-call cap, times
the experiments of a daemon, is tens of GB: the kernel's OOM killer would end the daemon and
every run in it, and its recovery would resume the same run into the same end."""
CHECKSUM_WAIT_S = 5.0
"""How long a call waits for room before it fails (``TimeoutError``, recorded as a failed call):
calls queued behind the budget would otherwise hold a stop (a step ends when its calls have)
for as long as all of them take."""
_checksum_room = threading.Condition()
_checksum_in_use = 0


def checksum_work(size: int = 262_144) -> dict[str, Any]:
    """A real, deterministic CPU task for the default experiment: hash and compress a buffer.
    Calls share :data:`CHECKSUM_BUDGET_BYTES`: one that would go past it waits for room (its
    latency counts the wait, as a call to a saturated service does), at most
    :data:`CHECKSUM_WAIT_S`, and then fails.

    Raises:
        ValueError: ``size`` is not a whole number of bytes from 0 to :data:`CHECKSUM_MAX_BYTES`.
    """
    import hashlib
    import zlib

    global _checksum_in_use
    if isinstance(size, bool) or not isinstance(size, int) or not 0 <= size <= CHECKSUM_MAX_BYTES:
        raise ValueError(
            f"checksum_work: size must be a whole number of bytes from 0 to {CHECKSUM_MAX_BYTES}, got {size!r}"
        )
    held = size * 2  # the buffer, and its compressed copy at worst as large
    with _checksum_room:
        if not _checksum_room.wait_for(
            lambda: _checksum_in_use == 0 or _checksum_in_use + held <= CHECKSUM_BUDGET_BYTES, CHECKSUM_WAIT_S
        ):
            raise TimeoutError(
                f"checksum_work: no room for {size:,} bytes within {CHECKSUM_WAIT_S:g} s "
                f"(the calls of this process hold at most {CHECKSUM_BUDGET_BYTES:,} at once)"
            )
        _checksum_in_use += held
    try:
        data = hashlib.sha256(str(size).encode()).digest() * (size // 32)
        packed = zlib.compress(data, 6)
        return {"bytes": size, "compressed": len(packed)}
    finally:
        with _checksum_room:
            _checksum_in_use -= held
            _checksum_room.notify_all()


def resolve(target: str) -> Callable[..., Any]:
    """Import ``module:function``; ValueError naming what is missing."""
    if ":" not in target:
        raise ValueError(f"target {target!r} must be 'module:function' or an http(s) URL")
    mod_name, fn_name = target.split(":", 1)
    try:
        mod = importlib.import_module(mod_name)
    except ImportError as exc:
        raise ValueError(f"target {target!r}: cannot import {mod_name!r} ({exc})") from None
    fn = getattr(mod, fn_name, None)
    if not callable(fn):
        raise ValueError(f"target {target!r}: {mod_name!r} has no callable {fn_name!r}")
    return fn


class LatencyWorkload:
    """Times calls to a callable or a URL; see the module docs."""

    name: ClassVar[str] = "latency"
    objective: ClassVar[Objective] = Objective("latency_ms", "min", "latency_ms")
    arms: ClassVar[tuple[Arm, ...]] = (
        Arm("concurrency_up", "concurrency", param="concurrency", default=1, scale=2, hi=64, integer=True),
        Arm("concurrency_down", "concurrency", param="concurrency", default=1, scale=0.5, lo=1, integer=True),
    )
    takeover: ClassVar[tuple[Control, ...]] = ()
    search_space: ClassVar[dict[str, tuple[float, float, str]]] = {"calls_per_step": (1, 200, "logint")}
    phase: ClassVar[str] = "calls"
    """Its one phase: every event's, those the Phase actor emits before :meth:`start` included."""

    @classmethod
    def family(cls, params: dict[str, Any]) -> str:
        """The target: its host for a URL, else its ``module.function`` (a file name's characters)."""
        target = str((params or {}).get("target", DEFAULTS["target"]))
        if target.startswith(("http://", "https://")):
            target = target.split("://", 1)[1].split("/", 1)[0]
        return re.sub(r"[^A-Za-z0-9._-]+", "_", target.replace(":", "."))[:80] or cls.name

    @classmethod
    def targets(cls, params: dict[str, Any]) -> list[str]:
        """The callable or URL these parameters time: code a lab daemon must allow first."""
        return [str((params or {}).get("target", DEFAULTS["target"]))]

    @classmethod
    def check_params(cls, params: dict[str, Any]) -> dict[str, Any]:
        unknown = set(params) - set(DEFAULTS)
        if unknown:
            raise ValueError(f"unknown latency parameter(s) {', '.join(sorted(unknown))}; known: {', '.join(DEFAULTS)}")
        p = {**DEFAULTS, **params}
        if not isinstance(p["target"], str):
            raise ValueError(f"target must be a string, got {p['target']!r}")
        if not p["target"].startswith(("http://", "https://")):
            resolve(p["target"])
        for k, rule in RANGES.items():
            rule.check(k, p[k])
        if not isinstance(p["args"], list) or not isinstance(p["kwargs"], dict):
            raise ValueError("args must be a list and kwargs a table")
        return p

    def __init__(self, params: dict[str, Any], seed: int = 0) -> None:
        self.p = dict(params)
        self.seed = seed
        self.done = 0
        self.failures = 0
        self.best_ms: float | None = None
        self._fn: Callable[[], Any] | None = None
        self._should_yield: Callable[[], bool] = lambda: False
        self._fields: set[str] = set()  # the fields passed through so far (at most MAX_FIELDS)
        self._dropped: set[str] = set()  # the fields left out and said so, once each (at most MAX_FIELDS)
        # a callable's dict is its own results; a URL's is the workload's (the target is no control)
        self._fn_is_callable = not str(self.p["target"]).startswith(("http://", "https://"))

    def _caller(self) -> Callable[[], Any]:
        target = self.p["target"]
        if target.startswith(("http://", "https://")):
            timeout = float(self.p["timeout_s"])

            def get() -> dict[str, Any]:
                with urllib.request.urlopen(target, timeout=timeout) as resp:
                    body = resp.read()
                    return {"status": resp.status, "bytes": len(body)}

            return get
        fn = resolve(target)
        args, kwargs = list(self.p["args"]), dict(self.p["kwargs"])
        return lambda: fn(*args, **kwargs)

    def start(self, emitter: Emitter) -> None:
        self._fn = self._caller()
        emitter.set_context(phase=self.phase)
        emitter.emit(
            "start",
            {"calls_done": float(self.done)},
            parameters=self.params(),
            notes=f"latency workload on {self.p['target']}",
        )

    def _timed(self) -> tuple[float, Any, bool, str | None]:
        """One call: (milliseconds, result, success, error note)."""
        fn = self._fn
        assert fn is not None
        t0 = time.perf_counter()
        notes = None
        try:
            result = fn()
            ok = True
        except urllib.error.HTTPError as exc:
            result, ok, notes = {"status": exc.code}, False, f"HTTP {exc.code}"
        except (Exception, asyncio.CancelledError) as exc:  # noqa: BLE001 - a failed call is a measurement,
            # not a crash; an async client's cancelled task too (a BaseException since Python 3.8)
            result, ok, notes = None, False, f"{type(exc).__name__}: {exc}"
        return (time.perf_counter() - t0) * 1000.0, result, ok, notes

    def use_interrupt(self, check: Callable[[], bool]) -> None:
        """Between two calls of a step, end it when ``check()`` says so (a pause or a stop waits,
        the budget is used): a step of many slow calls never holds them up."""
        self._should_yield = check

    def _concurrent(self, n: int, workers: int) -> list[tuple[float, Any, bool, str | None]]:
        """``n`` calls, ``workers`` at a time, in order. A call is queued only as one ends (two
        per worker wait at most), so a step of many calls is cut at its next call too: the
        calls in flight finish and are recorded, no more start."""
        timed: list[tuple[float, Any, bool, str | None]] = []
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="latency-call") as pool:
            pending: deque[Future[tuple[float, Any, bool, str | None]]] = deque()
            left = n
            while left and len(pending) < 2 * workers:
                pending.append(pool.submit(self._timed))
                left -= 1
            while pending:
                timed.append(pending.popleft().result())
                if left and self._should_yield():
                    left = 0
                elif left:
                    pending.append(pool.submit(self._timed))
                    left -= 1
        return timed

    def _sequential(self, n: int) -> Iterator[tuple[float, Any, bool, str | None]]:
        for i in range(n):
            if i and self._should_yield():  # at least one call per step
                return
            yield self._timed()

    def step(self, emitter: Emitter) -> bool:
        limit = self.p["calls"]
        n = self.p["calls_per_step"]
        if limit:
            n = max(0, min(n, limit - self.done))
        workers = min(self.p["concurrency"], n)
        if workers > 1:  # N calls in flight at once: the target measured under that load
            timed = self._concurrent(n, workers)
        else:
            timed = self._sequential(n)
        for ms, result, ok, notes in timed:
            values = {"latency_ms": ms}
            if isinstance(result, dict) and self._fn_is_callable:
                dropped = self._pass_through(result, values)
                if dropped:
                    notes = f"{notes}; {dropped}" if notes else dropped
            self.done += 1
            if not ok:
                self.failures += 1
            elif self.best_ms is None or ms < self.best_ms:
                self.best_ms = ms
            emitter.emit("call", values, step=self.done, success=ok, notes=notes)
        return bool(limit and self.done >= limit)

    def _pass_through(self, result: dict[Any, Any], values: dict[str, Any]) -> str | None:
        """Add the callable's numeric fields to ``values``; what was first left out now, said
        once per field (a warning and the call's notes), or None."""
        new: list[str] = []
        for k, v in result.items():
            numeric = isinstance(v, (int, float)) and not isinstance(v, bool)
            if numeric and isinstance(k, str) and k in self._fields:
                values[k] = v  # the emitter makes it a float (one past float64: an infinity, marked)
                continue
            if not isinstance(k, str) or not FIELD_NAME.match(k):
                why = "its name is not a field name (a letter or _, then letters, digits, _ . -; 64 at most)"
            elif k in RESERVED:
                why = "it is the workload's own measurement"
            elif not numeric:
                why = f"it is not a number ({type(v).__name__})"
            elif len(self._fields) >= MAX_FIELDS:
                why = f"the target already gave {MAX_FIELDS} fields, the most a run records (MAX_FIELDS)"
            else:
                self._fields.add(k)
                values[k] = v
                continue
            shown = f"{k!r:.80}"
            if shown not in self._dropped and len(self._dropped) < MAX_FIELDS:  # a new bad key per call: said 32 times
                self._dropped.add(shown)
                last = len(self._dropped) == MAX_FIELDS
                log.warning("target field not recorded", target=self.p["target"], field=shown, why=why, last=last)
                new.append(f"{shown} ({why})" + ("; fields left out after this one are not said" if last else ""))
        return f"target field(s) not recorded: {', '.join(new)}" if new else None

    def checkpoint(self) -> dict[str, Any]:
        return {"done": self.done, "failures": self.failures, "best_ms": self.best_ms, "params": self.params()}

    def restore(self, state: dict[str, Any]) -> None:
        self.done = int(state.get("done", 0))
        self.failures = int(state.get("failures", 0))
        self.best_ms = state.get("best_ms")
        for k, v in (state.get("params") or {}).items():
            if k in self.p:
                self.p[k] = v

    def params(self) -> dict[str, Any]:
        return {
            "target": self.p["target"],
            "calls_per_step": self.p["calls_per_step"],
            "concurrency": self.p["concurrency"],
            "timeout_s": self.p["timeout_s"],
        }

    def set_param(self, key: str, value: Any) -> tuple[Any, Any]:
        if key in ("restart_pass", "skip_phase"):  # the colouring pipeline's actions: say why, not "unknown"
            raise ValueError(f"the latency workload has no passes or phases ({key} is the colouring pipeline's)")
        if key not in TUNABLE:
            raise ValueError(f"latency workload has no tunable parameter {key!r} ({', '.join(TUNABLE)})")
        check = self.check_params({**{k: v for k, v in self.p.items() if k in DEFAULTS}, key: value})
        before = self.p[key]
        self.p[key] = check[key]
        if key == "timeout_s":
            self._fn = self._caller()
        return before, self.p[key]
