"""The Hypertune actor: telemetry-driven adaptive control with a learning policy.

It knows no workload. The experiment hands it the workload's declarations as plain data
(``experiments.workloads.base``): the *objective* (an event value ``field``, its
``direction``, and an optional ``progress`` value, lower is better, that shows progress
between two improvements), the *arms* (control actions: a ``set_param`` key, how the value
follows from the parameters in force, the phases where they apply) and the *takeover*
controls it sends once before it first steers, so that it is the only controller.

It watches the experiment's ``events`` (every event that carries the objective or the
progress value; a failed call never counts as an improvement), ``metrics`` and ``anomalies``
topics and keeps the run's best objective value and, per phase, the lowest progress value since
the objective last improved. A *stall* is ``window_s`` seconds of active time (event time
less the phase's pauses, which it marks with ``paused`` and ``unpaused`` events) without a
new best and without a new lowest progress value, and at least three times the median time
this run has needed between improvements. On a stall, once the objective has a value, it picks one of the arms of the
current phase that would move their parameter the way they are meant to (:func:`arm_move`)
with its policy (UCB1 by default, or epsilon-greedy) and sends it to the phase as
``set_param``; the phase applies it at its next safe point and answers in its events: a
``hypertune_action`` event whose notes say what changed, why, and the values before and
after, or a ``control_refused`` one. The outcome is measured over a window from when it was
applied, across a phase change if one comes (reward = improvement of the progress score per
second, the score being ``1000 * best + lowest progress`` with ``best`` negated for a ``max``
objective, so lower is always better) and recorded as a ``hypertune_outcome`` event; the
policy learns from it. Nothing is learned from a refused action.

The policy's statistics persist between runs in a JSON file per workload and instance
family (``state_file``), loaded at start; a corrupt file is ignored with a warning, and never
overwritten. Only a regular file of at most ``MAX_STATE_BYTES`` is read, opened without
blocking (a FIFO or device there is ignored with a warning: the file is read on the
supervisor's thread, which must never hang); a ``state_file`` naming a folder (``.``, ``/``)
is ignored with a warning and the run learns in memory. Several experiments of one family may
run at once and share the file: a save takes an exclusive lock (``flock`` on ``<file>.lock``,
waiting at most ``LOCK_WAIT_S``; a lock held longer skips the save with one warning, the
learning stays in memory and the next save tries again), reads what the others have saved,
adds this run's own new pulls to it (counts and reward sums are additive, so the merge
equals one pass over all the pulls), writes the result under a temporary name of its own and renames it into place;
the policy then continues from the merged statistics. Nobody's learning is lost and no
writer ever renames another's temporary file. With ``enabled = false`` the actor only
observes (the A/B's control arm).

Its ``events`` batches are checked like every consumer's (:mod:`actors.consumer`): a
malformed batch is counted in ``bad_batches`` and logged, never acted on, so no sender can
crash it. It is the last child of the experiment tree, so that under ``rest_for_one`` its
own crash restarts only itself and never the phase.
"""

from __future__ import annotations

import contextlib
import copy
import errno
import fcntl
import math
import os
import random
import secrets
import stat
import time
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import orjson

from actors.consumer import EventConsumer
from actors.files import atomic_write
from actors.log import get_logger

log = get_logger("actors.hypertune")

POLICIES = ("ucb", "epsilon_greedy")
SCORE_K = 1000.0
# The phase answers an action in its events: applied (``hypertune_action``) or refused. An answer
# that has not come after this many windows (and at least CONFIRM_MIN_US) is taken as lost.
_ANSWERS = ("hypertune_action", "control_refused")
_PAUSE_MARKS = ("paused", "unpaused")  # the phase's marks around a pause (see _pause_mark)
CONFIRM_WINDOWS = 10
CONFIRM_MIN_US = 60_000_000
# A state file holds one small entry per phase and arm (a few KiB); anything past this bound is
# not one, and reading it whole (``/dev/zero``, a huge log) would exhaust memory.
MAX_STATE_BYTES = 16 << 20
# How long a save waits for another writer's lock: others hold it for one read-merge-write
# (milliseconds); a lock held longer is stuck, and the actor must not stall behind it.
LOCK_WAIT_S = 1.0
# Never block in open(): O_NONBLOCK makes opening a FIFO return at once; O_NOCTTY keeps a
# terminal from becoming the controlling one.
_OPEN_FLAGS = os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0) | getattr(os, "O_NOCTTY", 0)


class StateLockBusy(BlockingIOError):
    """Another writer held the state file's lock past the wait (the save is skipped)."""


def _names_no_file(path: Path) -> bool:
    """True for a path that cannot name a file (``.``, ``/``, ``..``): no lock beside it."""
    return path.name in ("", ".", "..")


def _require_regular(mode: int, path: Path, what: str = "") -> None:
    if not stat.S_ISREG(mode):
        raise OSError(errno.EINVAL, f"{what}not a regular file", str(path))


def read_limited(path: Path, limit: int = MAX_STATE_BYTES) -> bytes:
    """The bytes of the regular file ``path``, at most ``limit`` of them; never blocks.

    The stat before opening keeps devices unopened; the fstat after opening (non-blocking)
    catches a swap between the two, so a FIFO put in place can never hang the caller.

    Raises:
        FileNotFoundError: when there is no file.
        OSError: when it is not a regular file, is larger than ``limit``, or cannot be read.
    """
    _require_regular(os.stat(path).st_mode, path)
    fd = os.open(path, os.O_RDONLY | _OPEN_FLAGS)
    try:
        st = os.fstat(fd)
        _require_regular(st.st_mode, path)
        if st.st_size > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        chunks: list[bytes] = []
        total = 0
        while total <= limit:  # the size may grow while it is read: the bound holds regardless
            chunk = os.read(fd, min(1 << 20, limit + 1 - total))
            if not chunk:
                break
            chunks.append(chunk)
            total += len(chunk)
        if total > limit:
            raise OSError(errno.EFBIG, f"larger than {limit} bytes", str(path))
        return b"".join(chunks)
    finally:
        os.close(fd)


@contextlib.contextmanager
def state_lock(path: Path, wait_s: float = LOCK_WAIT_S) -> Iterator[None]:
    """Hold the exclusive ``flock`` on ``<path>.lock`` (the one ``actors.files.locked`` takes),
    waiting at most ``wait_s``: a lock held for good must not stop the actor for good.

    Raises:
        StateLockBusy: when another holder kept it past ``wait_s``.
        OSError: when the lock file cannot be created or is not a regular file.
    """
    if _names_no_file(path):
        raise IsADirectoryError(errno.EISDIR, "names a folder, not a file", str(path))
    lock_path = path.with_name(path.name + ".lock")
    with contextlib.suppress(FileNotFoundError):
        _require_regular(os.stat(lock_path).st_mode, lock_path, "lock file is ")
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT | _OPEN_FLAGS, 0o644)
    try:
        _require_regular(os.fstat(fd).st_mode, lock_path, "lock file is ")
        deadline = time.monotonic() + wait_s
        delay = 0.002
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                left = deadline - time.monotonic()
                if left <= 0:
                    why = f"locked by another writer for {wait_s:g}s"
                    raise StateLockBusy(errno.EWOULDBLOCK, why, str(lock_path)) from None
                time.sleep(min(delay, left))
                delay = min(delay * 2, 0.05)
        yield
    finally:
        os.close(fd)  # closing releases the lock


def resolve_state_path(state_file: str | os.PathLike[str] | None) -> Path | None:
    """The file ``state_file`` names; None (with a warning) when it names none, or names a
    folder (``.``, ``/``, a trailing ``/``, an existing folder): the run learns in memory."""
    if not state_file:
        return None
    text = os.fspath(state_file)
    path = Path(text)
    seps = (os.sep, os.altsep) if os.altsep else (os.sep,)
    if _names_no_file(path) or text.endswith(seps) or path.is_dir():
        log.warning("hypertune state_file names a folder, not a file; learning in memory only", file=text)
        return None
    return path


def arm_value(arm: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
    """The value an arm (plain data, see ``experiments.workloads.base.Arm``) sends when
    ``params`` are in force: ``value`` when the arm names no ``param``, else
    ``params[param] * scale + shift`` (``default`` when the parameter is missing or not a
    number), to 12 significant digits (1.796, not 1.7960000000000003, in the records),
    clamped to ``[lo, hi]`` and made an int when ``integer``."""
    if arm.get("param") is None:
        return arm.get("value")
    x = params.get(arm["param"], arm.get("default", 0.0))
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        x = arm.get("default", 0.0)
    v = x * arm.get("scale", 1.0) + arm.get("shift", 0.0)
    if isinstance(v, float) and math.isfinite(v):
        v = float(f"{v:.12g}")
    if arm.get("hi") is not None:
        v = min(arm["hi"], v)
    if arm.get("lo") is not None:
        v = max(arm["lo"], v)
    return int(v) if arm.get("integer") else v


def arm_move(arm: Mapping[str, Any], params: Mapping[str, Any]) -> Any:
    """What the arm sends when ``params`` are in force, or None when it cannot move there.

    An arm that follows a parameter moves it one way (up when ``x * scale + shift > x``); its
    clamp may leave it where it is (a halving arm at its floor of 1) or even turn the move
    around (a doubling arm clamped at 64 while the parameter is 200): such an action would
    change nothing, or do the opposite of what the policy learns it as, so it is not offered
    (None). An arm with a fixed ``value`` always moves: only the workload can refuse it."""
    value = arm_value(arm, params)
    if arm.get("param") is None:
        return value
    x = params.get(arm["param"], arm.get("default", 0.0))
    if not isinstance(x, (int, float)) or isinstance(x, bool):
        x = arm.get("default", 0.0)
    way = x * arm.get("scale", 1.0) + arm.get("shift", 0.0) - x
    moved = value - x
    if not (math.isfinite(way) and math.isfinite(moved)) or way == 0 or moved == 0 or (way > 0) != (moved > 0):
        return None
    return value


def _check_declarations(objective: Mapping[str, Any] | None, arms: list[Mapping[str, Any]]) -> None:
    """Refuse declarations this actor cannot steer by (a programming error, caught at start)."""
    if objective is not None:
        if not isinstance(objective.get("field"), str) or objective.get("direction", "min") not in ("min", "max"):
            raise ValueError(f"hypertune objective needs a field and a direction min or max, got {objective!r}")
    for arm in arms:
        if not isinstance(arm.get("name"), str) or not isinstance(arm.get("key"), str):
            raise ValueError(f"hypertune arm needs a name and a key, got {arm!r}")


class Policy:
    """A bandit over the arms of each phase (UCB1, or epsilon-greedy), with JSON state."""

    def __init__(self, kind: str = "ucb", c: float = 1.0, epsilon: float = 0.1, seed: int = 0) -> None:
        if kind not in POLICIES:
            raise ValueError(f"hypertune policy must be one of {', '.join(POLICIES)}, got {kind!r}")
        self.kind, self.c, self.epsilon = kind, c, epsilon
        self.rng = random.Random(seed)
        self.stats: dict[str, dict[str, float]] = {}  # "phase/arm" -> {"n", "mean"}
        self._synced: dict[str, dict[str, float]] = {}  # the stats as last read from / written to the file

    def choose(self, phase: str, arms: list[str]) -> str:
        keys = [f"{phase}/{a}" for a in arms]
        for a, k in zip(arms, keys, strict=True):
            if self.stats.get(k, {}).get("n", 0) == 0:
                return a  # try every arm once
        if self.kind == "epsilon_greedy":
            if self.rng.random() < self.epsilon:
                return self.rng.choice(arms)
            return max(arms, key=lambda a: self.stats[f"{phase}/{a}"]["mean"])
        total = sum(self.stats[k]["n"] for k in keys)
        return max(
            arms,
            key=lambda a: (
                self.stats[f"{phase}/{a}"]["mean"]
                + self.c * math.sqrt(2 * math.log(total) / self.stats[f"{phase}/{a}"]["n"])
            ),
        )

    def update(self, phase: str, arm: str, reward: float) -> bool:
        """Count one pull of ``arm`` in ``phase`` with ``reward``; False (with a warning, nothing
        counted) for a reward that is not a finite number: a NaN mean would be saved as
        ``null``, and every later save would then refuse the family's state file."""
        if isinstance(reward, bool) or not isinstance(reward, (int, float)) or not math.isfinite(reward):
            log.warning("hypertune reward ignored: not a finite number", phase=phase, arm=arm, reward=repr(reward))
            return False
        s = self.stats.setdefault(f"{phase}/{arm}", {"n": 0, "mean": 0.0})
        s["n"] += 1
        s["mean"] += (reward - s["mean"]) / s["n"]
        return True

    def to_json(self) -> bytes:
        return orjson.dumps({"kind": self.kind, "stats": self.stats}, option=orjson.OPT_INDENT_2)

    @staticmethod
    def read_state(path: Path) -> dict[str, dict[str, float]] | None:
        """The statistics saved in ``path``; None (with a warning) when it is missing or corrupt."""
        stats, problem = Policy._read(path)
        if problem is not None:
            log.warning("hypertune policy state unreadable; ignoring it", file=str(path), error=problem)
        return stats

    @staticmethod
    def _read(path: Path) -> tuple[dict[str, dict[str, float]] | None, str | None]:
        """The statistics in ``path`` and, when it holds none, why (None: there is no file).
        Only a regular file of at most ``MAX_STATE_BYTES`` is read (:func:`read_limited`)."""
        try:
            data = orjson.loads(read_limited(path))
        except FileNotFoundError:
            return None, None
        except OSError as exc:
            return None, exc.strerror or str(exc)
        except orjson.JSONDecodeError as exc:
            return None, str(exc)
        stats = data.get("stats") if isinstance(data, dict) else None

        def good(v: object) -> bool:
            if not isinstance(v, dict):
                return False
            n, mean = v.get("n"), v.get("mean")
            return (
                all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in (n, mean))
                and n >= 0
            )  # type: ignore[operator]

        if not isinstance(stats, dict) or not all(isinstance(k, str) and good(v) for k, v in stats.items()):
            return None, "bad stats table"
        return {k: {"n": float(v["n"]), "mean": float(v["mean"])} for k, v in stats.items()}, None

    def load(self, path: Path) -> bool:
        """Load saved statistics; a missing or corrupt file leaves the policy fresh."""
        stats = self.read_state(path)
        if stats is None:
            return False
        self.stats, self._synced = stats, copy.deepcopy(stats)
        return True

    def merged_with(self, saved: dict[str, dict[str, float]]) -> dict[str, dict[str, float]]:
        """``saved`` plus the pulls this policy made since it last synced: counts and reward
        sums add, so the result is what one policy seeing every pull would hold."""
        out = copy.deepcopy(saved)
        for key, cur in self.stats.items():
            base = self._synced.get(key, {"n": 0.0, "mean": 0.0})
            dn = cur["n"] - base["n"]
            if dn <= 0:
                continue
            dsum = cur["n"] * cur["mean"] - base["n"] * base["mean"]
            s = out.setdefault(key, {"n": 0.0, "mean": 0.0})
            n = s["n"] + dn
            s["mean"], s["n"] = (s["n"] * s["mean"] + dsum) / n, n
        return out

    @staticmethod
    def _refuse_non_regular(path: Path) -> None:
        """Raise FileExistsError when ``path`` exists and is not a regular file (a FIFO, a device,
        a folder): such a thing is never replaced."""
        try:
            mode = os.stat(path).st_mode
        except (FileNotFoundError, NotADirectoryError):
            return
        if not stat.S_ISREG(mode):
            raise FileExistsError(
                errno.EEXIST, "not a hypertune state file (not a regular file); left as it is", str(path)
            )

    def save(self, path: Path, wait_s: float = LOCK_WAIT_S) -> None:
        """Merge this policy's new pulls into ``path`` under a lock (waiting at most
        ``wait_s`` for it), then continue from the merged statistics (see the module docs).
        The new file is written beside ``path`` and renamed into place: nothing is ever
        written through ``path``, so a FIFO or device there can neither block nor take it.

        Raises:
            StateLockBusy: when another writer held the lock past ``wait_s`` (nothing changed).
            OSError: when the folder cannot take the file, or ``path`` holds something that is
                not a state file (the policy keeps its own statistics).
        """
        if _names_no_file(path):
            raise IsADirectoryError(errno.EISDIR, "names a folder, not a file", str(path))
        self._refuse_non_regular(path)  # before the lock: no stray lock file beside a FIFO or in /dev
        path.parent.mkdir(parents=True, exist_ok=True)
        with state_lock(path, wait_s):
            saved, problem = self._read(path)
            if saved is None and os.path.lexists(path):  # a file this policy cannot read is not its to replace
                why = f"not a hypertune state file ({problem or 'a link to nothing'}); left as it is"
                raise FileExistsError(errno.EEXIST, why, str(path))
            merged = self.merged_with(saved if saved is not None else self._synced)
            self._refuse_non_regular(path)  # swapped in since the read: still not ours to replace
            atomic_write(path, orjson.dumps({"kind": self.kind, "stats": merged}, option=orjson.OPT_INDENT_2))
        self.stats, self._synced = merged, copy.deepcopy(merged)


class Hypertune(EventConsumer):
    """Watches the run and steers the phase; see the module docs.

    ``objective``, ``arms`` and ``takeover`` are the workload's declarations as plain dicts
    (``experiments.workloads.base.declarations``); without an objective it only observes.
    Its ``events`` batches are checked by :class:`~actors.consumer.EventConsumer` first: a
    malformed one is counted in ``bad_batches`` (see ``get``) and never reaches the policy.
    """

    def __init__(
        self,
        experiment_id: str,
        enabled: bool = False,
        registry: Any = None,
        *,
        window_s: float = 5.0,
        policy: str = "ucb",
        state_file: str | Path | None = None,
        workload: str = "workload",
        family: str = "default",
        seed: int = 0,
        objective: Mapping[str, Any] | None = None,
        arms: list[Mapping[str, Any]] | tuple[Mapping[str, Any], ...] = (),
        takeover: list[Mapping[str, Any]] | tuple[Mapping[str, Any], ...] = (),
    ) -> None:
        super().__init__()
        if window_s <= 0:
            raise ValueError(f"hypertune window_s must be > 0, got {window_s!r}")
        _check_declarations(objective, list(arms))
        self.experiment_id = experiment_id
        self.enabled = enabled
        self.registry = registry
        self.window_us = int(window_s * 1e6)
        self.policy = Policy(policy, seed=seed)
        # read on the supervisor's thread, so it must never block: see read_limited
        self.state_path = resolve_state_path(state_file)
        self.loaded = self.policy.load(self.state_path) if self.state_path else False
        self._lock_busy = False  # the last save found the lock held: the next tries do not wait
        self._skipped_saves = 0
        self._save_warned: set[str] = set()  # each other save failure is logged once
        self.workload, self.family = workload, family
        self.objective = dict(objective) if objective is not None else None
        self.field = self.objective["field"] if self.objective else None
        self.progress_field = self.objective.get("progress") if self.objective else None
        self.label = (self.objective.get("label") or self.field) if self.objective else None
        self.sign = -1.0 if self.objective and self.objective.get("direction") == "max" else 1.0
        self.arms = [dict(a) for a in arms]
        self.takeover = [dict(c) for c in takeover]
        self._arms_by_phase: dict[str | None, dict[str, dict[str, Any]]] = {}
        self._threshold_us: int | None = None  # stall_threshold_us, until the gaps change
        self.snapshots = 0
        self.anomalies = 0
        self.periods = 0
        self.phase: str | None = None
        self.params: dict[str, Any] = {}
        self.best: float = self.sign * math.inf  # the best objective value seen (infinite: none yet)
        self.min_prog: float = math.inf  # the lowest progress value since the objective last improved
        self.last_improve_ts: int | None = None
        self.last_ts = 0
        self.pass_ = 0
        self.pending: dict[str, Any] | None = None  # the action under way (see _maybe_act)
        # arms the workload refused in this phase and pass: how often, and the parameters then
        self._refused: dict[str, tuple[int, dict[str, Any]]] = {}
        self._paused_us = 0  # event time the phase spent paused (its paused / unpaused marks)
        self._pause_at: int | None = None  # when the pause under way began (event time)
        self.actions: list[dict[str, Any]] = []
        self.gaps: list[int] = []  # event time between recent improvements
        self.took_over = False

    # --- observing -------------------------------------------------------------------------------

    def arms_for(self, phase: str | None) -> dict[str, dict[str, Any]]:
        """The arms that apply in ``phase``, by name, in their declared order."""
        found = self._arms_by_phase.get(phase)
        if found is None:
            found = {a["name"]: a for a in self.arms if not a.get("phases") or phase in a["phases"]}
            self._arms_by_phase[phase] = found
        return found

    def score(self) -> float | None:
        """The progress score, lower is better: ``1000 * best`` (negated for a max objective)
        plus the lowest progress value since the last improvement (or the phase's start); None
        while the objective has no value yet: nothing can be measured against that."""
        if not math.isfinite(self.best):
            return None
        prog = 0.0 if math.isinf(self.min_prog) else self.min_prog
        return SCORE_K * self.sign * self.best + prog

    def _progress_known(self) -> bool:
        """Whether the score holds a progress value (after a new best or a phase change the
        next one is awaited: the score would otherwise drop by the whole old value)."""
        return self.progress_field is None or math.isfinite(self.min_prog)

    def _active_us(self, t: int) -> int:
        """Event time ``t`` as active time: the phase's pauses taken out (see ``_pause_mark``).
        Events held through a pause carry times inside it: they count at the pause's end."""
        if self._pause_at is not None:  # a pause not over (the run stops while paused)
            t = min(t, self._pause_at)
        return max(t - self._paused_us, self.last_ts)

    def on_events(self, msg: dict[str, Any]) -> None:
        if self.field is None:
            return
        vals = msg["values"]
        obj, prog = vals.get(self.field), vals.get(self.progress_field) if self.progress_field else None
        n = len(msg["ts"])
        carries = np.zeros(n, dtype=bool)
        for col in (obj, prog):
            if col is not None:
                carries |= ~np.isnan(col)
        names = msg["names"]
        # the phase's answer to an action, its pause marks
        marks = [i for i, name in enumerate(names) if name in _ANSWERS or name in _PAUSE_MARKS]
        keep = carries | np.isin(msg["name"], marks) if marks else carries
        params = msg.get("params")
        if params is not None:
            keep = keep | (params >= 0)
        rows = np.flatnonzero(keep)
        if rows.size == 0:
            return
        # plain lists of the rows that matter: one conversion per batch, not a numpy scalar per row
        ts = msg["ts"][rows].tolist()
        pcodes = msg["phase"][rows].tolist()
        ncodes = msg["name"][rows].tolist()
        passes = msg["pass"][rows].tolist() if msg.get("pass") is not None else [0] * rows.size
        ocol = obj[rows].tolist() if obj is not None else None
        pcol = prog[rows].tolist() if prog is not None else None
        ok = (msg["success"][rows] != 0).tolist() if msg.get("success") is not None else None
        pc_codes = params[rows].tolist() if params is not None else None
        has = carries[rows].tolist()
        phases, texts = msg["phases"], msg.get("param_texts", [])
        notes = dict((i, x) for i, x in (msg.get("sparse") or {}).get("notes", ())) if marks else {}
        lengths = vals.get("paused_s")
        lcol = lengths[rows].tolist() if lengths is not None else None
        parsed_text = None
        for j in range(rows.size):
            code = pc_codes[j] if pc_codes is not None else -1
            if code >= 0 and texts[code] is not parsed_text:
                parsed_text = texts[code]
                self.params = orjson.loads(parsed_text)
            name = names[ncodes[j]]
            if name in _PAUSE_MARKS:  # before the mark's own time is taken as active time
                self._pause_mark(name == "paused", ts[j], lcol[j] if lcol is not None else math.nan)
            t = self.last_ts = self._active_us(ts[j])
            if name in _ANSWERS:
                self._answer(name, notes.get(int(rows[j])), t)
            if not has[j]:
                continue
            pc = pcodes[j]
            where = (passes[j], phases[pc] if pc >= 0 else None)
            if where != (self.pass_, self.phase):
                # a new phase (or pass): its progress is measured afresh, and what it refused is
                # offered again; an action under way goes on (its outcome spans the change)
                self.pass_, self.phase = where
                self.last_improve_ts, self.min_prog = t, math.inf
                self._refused.clear()
            improved = False
            if ok is None or ok[j]:  # a failed call proves nothing
                v = ocol[j] if ocol is not None else math.nan
                if v == v and self.sign * v < self.sign * self.best:  # v == v: not NaN
                    # a new best: the progress value is measured afresh from here
                    self.best, self.min_prog, improved = v, math.inf, True
                w = pcol[j] if pcol is not None else math.nan
                if w == w and w < self.min_prog:
                    self.min_prog, improved = w, True
            if improved or self.last_improve_ts is None:
                if improved and self.last_improve_ts is not None:
                    self.gaps.append(t - self.last_improve_ts)
                    del self.gaps[:-20]
                    self._threshold_us = None
                self.last_improve_ts = t
            self._maybe_act()  # at the first event past the window, not at the end of the batch

    def _answer(self, name: str, note: Any, t: int) -> None:
        """The phase's answer to the action under way: ``hypertune_action`` (applied: its
        window starts now) or ``control_refused`` (not applied). Either ends its notes with the
        action's ``why`` in brackets, which carries a token drawn for the action: nothing else
        (a person's control, whatever its key or value, an answer to an earlier action) ends so."""
        p = self.pending
        if p is None or p["applied"] is not None or not isinstance(note, str):
            return
        tail = f" ({p['why']})"
        if not note.endswith(tail):
            return
        if name == "hypertune_action":
            # the baseline is the score now; after a phase change, once a progress value is in
            p["applied"], p["ts"], p["score"] = True, t, self.score() if self._progress_known() else None
        elif name == "control_refused":
            reason = note[: -len(tail)].split(" refused: ", 1)[-1]
            self._not_applied(p, f"refused by the workload: {reason}", refused=True)

    def _not_applied(self, p: dict[str, Any], why: str, refused: bool = False) -> None:
        """An action that was not applied: nothing is learned from it. A refused arm is offered
        again once the parameters in force have changed (the refusal may have been about them:
        a value out of range); refused twice, not again in this phase (and pass)."""
        self.pending = None
        if refused:
            times = self._refused.get(p["arm"], (0, {}))[0] + 1
            self._refused[p["arm"]] = (times, self.params)
        if self.actions and self.actions[-1].get("arm") == p["arm"]:
            self.actions[-1]["not_applied"] = why
        log.info("hypertune action not applied", experiment=self.experiment_id, phase=p["phase"], arm=p["arm"], why=why)
        self._send(
            {
                "kind": "note",
                "name": "hypertune_outcome",
                "values": {"refused": 1.0} if refused else {},
                "notes": f"outcome of {p['arm']} ({p['key']}={p['value']!r}) in {p['phase']}: {why}; not learned",
            }
        )

    def _offers_again(self, arm: str) -> bool:
        times, params = self._refused.get(arm, (0, {}))
        return times == 0 or (times == 1 and params != self.params)

    def _maybe_act(self) -> None:
        p = self.pending
        if p is not None:
            if p["applied"] is None:  # sent, not answered yet
                if self.last_ts - p["sent"] > max(CONFIRM_WINDOWS * self.window_us, CONFIRM_MIN_US):
                    self._not_applied(p, "no answer from the phase")
            elif p["score"] is None:
                if self._progress_known():  # the baseline, once the score holds a progress value
                    p["ts"], p["score"] = self.last_ts, self.score()
            elif self.last_ts - p["ts"] >= self.window_us and self._progress_known():
                self._outcome()
        arms = self.arms_for(self.phase)
        if not self.enabled or not arms or self.last_improve_ts is None:
            return
        if not self.took_over:
            for c in self.takeover:  # one controller at a time: the workload's own adaptation stands down
                self._send(
                    {
                        "kind": "set_param",
                        "key": c["key"],
                        "value": c.get("value"),
                        "event": "control",
                        "why": c.get("why") or "hypertune steers",
                        "controller": "hypertune",
                    }
                )
            self.took_over = True
        if self.pending is not None or not math.isfinite(self.best):
            return  # one action at a time; and no action before a first value to measure it against
        stalled_us = self.last_ts - self.last_improve_ts
        if stalled_us < self.stall_threshold_us():
            return
        offered = {}
        for name, arm in arms.items():  # refused here already, or it would not move: not offered
            value = arm_move(arm, self.params) if self._offers_again(name) else None
            if value is not None:
                offered[name] = value
        if not offered:
            return
        arm = self.policy.choose(self.phase or "-", list(offered))
        key, value = arms[arm]["key"], offered[arm]
        progress = f", lowest {self.progress_field} {self.min_prog:g}" if self.progress_field else ""
        why = (
            f"hypertune: no progress for {stalled_us / 1e6:.1f}s in {self.phase} "
            f"(best {self.label} {self.best:g}{progress}); arm {arm} by {self.policy.kind} "
            f"[action {secrets.token_hex(4)}]"  # the phase's answer ends with this why: see _answer
        )
        self.pending = {
            "phase": self.phase,
            "why": why,
            "arm": arm,
            "key": key,
            "value": value,
            "sent": self.last_ts,
            "applied": None,  # True once the phase says so (its hypertune_action event)
            "ts": None,  # when the outcome's window started
            "score": None,  # the score then
        }
        self.actions.append({"phase": self.phase, "arm": arm, "key": key, "value": value, "ts": self.last_ts})
        self._send(
            {
                "kind": "set_param",
                "key": key,
                "value": value,
                "why": why,
                "event": "hypertune_action",
                "controller": "hypertune",
            }
        )
        log.info("hypertune action", experiment=self.experiment_id, phase=self.phase, arm=arm, key=key, value=value)

    def stall_threshold_us(self) -> int:
        """A stall is ``window_s`` without progress, and at least 3x the median time this run
        has needed between improvements: a search that steadily needs 4 s per step forward is
        not disturbed after 2 s."""
        if self._threshold_us is None:
            self._threshold_us = (
                self.window_us if len(self.gaps) < 3 else max(self.window_us, int(3 * float(np.median(self.gaps))))
            )
        return self._threshold_us

    def _outcome(self) -> None:
        p, self.pending = self.pending, None
        assert p is not None and p["score"] is not None
        now = self.score()
        assert now is not None  # the baseline had a best, and the best only gets better
        elapsed = max(1e-6, (self.last_ts - p["ts"]) / 1e6)
        reward = (p["score"] - now) / elapsed
        learned = self.policy.update(p["phase"] or "-", p["arm"], reward)
        self.last_improve_ts = self.last_ts  # the next window starts now
        if learned:
            self._save()
        moved = f", in {self.phase} by then" if self.phase != p["phase"] else ""
        self._send(
            {
                "kind": "note",
                "name": "hypertune_outcome",
                "values": {"reward": reward, "window_s": elapsed},
                "notes": f"outcome of {p['arm']} ({p['key']}={p['value']!r}) in {p['phase']}: "
                f"score {p['score']:g} -> {now:g} over {elapsed:.1f}s{moved}, reward {reward:.4g}"
                + ("" if learned else " (not a finite number: not learned)"),
            }
        )

    def _send(self, msg: dict[str, Any]) -> None:
        if self.registry is not None:
            self.registry.send("phase", msg)

    def _save(self, final: bool = False) -> None:
        """Save the statistics; a failure is logged (once) and never stops the actor.

        While another writer holds the lock, the first save waits ``LOCK_WAIT_S`` and later ones
        only try (the final one waits again): the actor keeps steering, learns in memory, and the
        next save that gets the lock merges every pull made meanwhile. A disabled actor takes
        no action, so it learns nothing and writes nothing (no state file, no lock file).
        """
        if self.state_path is None or not self.enabled:
            return
        try:
            self.policy.save(self.state_path, wait_s=0.0 if self._lock_busy and not final else LOCK_WAIT_S)
        except StateLockBusy as exc:
            self._skipped_saves += 1
            if not self._lock_busy:
                log.warning(
                    "hypertune policy state locked by another writer; save skipped, learning kept in memory, "
                    "retried at the next save",
                    file=str(self.state_path),
                    error=exc.strerror,
                )
            self._lock_busy = True
            return
        except OSError as exc:  # the learning is kept in memory; a full disk never stops the run
            error = exc.strerror or str(exc)
            if error not in self._save_warned:
                self._save_warned.add(error)
                log.warning("hypertune policy state not saved", file=str(self.state_path), error=error)
            return
        if self._lock_busy:
            log.warning("hypertune policy state saved again", file=str(self.state_path), skipped=self._skipped_saves)
            self._lock_busy, self._skipped_saves = False, 0

    def handle_metrics(self, msg: dict[str, Any]) -> None:
        self.snapshots += 1

    def handle_anomalies(self, msg: dict[str, Any]) -> None:
        items = msg.get("items")
        if isinstance(items, list):  # anything else is not a summary this actor can count
            self.anomalies += len(items)

    def handle_anomaly_period(self, msg: dict[str, Any]) -> None:
        if msg.get("state") == "start":
            self.periods += 1

    def handle_counters(self, msg: dict[str, Any]) -> None:
        """The emitter's counters travel on the events topic; this actor counts nothing of them."""

    def _pause_mark(self, paused: bool, at: int, length_s: float) -> None:
        """The phase marks its pauses in its events, ``paused`` before the Lab detaches this
        actor and ``unpaused`` once it is attached again, with the pause's length: the pause is
        taken out of the stall and outcome windows, however short it was, also when this actor
        (restarted during it) never saw its start."""
        if paused:
            if self._pause_at is None:
                self._pause_at = at
        elif self._pause_at is not None:
            self._paused_us += max(0, at - self._pause_at)
            self._pause_at = None
        elif math.isfinite(length_s) and length_s > 0:
            self._paused_us += int(length_s * 1e6)

    def handle_get(self, msg: dict[str, Any]) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "acting": self.enabled,
            "policy": self.policy.kind,
            "state_loaded": self.loaded,
            "snapshots_seen": self.snapshots,
            "anomalies_seen": self.anomalies,
            "anomaly_periods_seen": self.periods,
            "actions": list(self.actions),
            "stats": dict(self.policy.stats),
            "phase": self.phase,
            "best": self.best,
            "pending": dict(self.pending) if self.pending is not None else None,
            "paused_s": self._paused_us / 1e6,
            "bad_batches": self.bad_batches,
        }

    def handle_crash(self, msg: dict[str, Any]) -> None:
        """Fault injection for tests and drills."""
        raise RuntimeError("injected hypertune crash")

    def terminate(self, reason: str) -> None:
        self._save(final=True)
