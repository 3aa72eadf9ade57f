"""One validation kit for what users type: spec values, ``crucible set``, CLI flags, workload
parameters, text files.

Every number a user gives must be finite and inside a documented range. A bare ``v < lo``
test lets NaN through (every comparison with NaN is false) and Python integers have no
upper bound, so ``time_budget_s = nan`` would run forever and ``seed = 99999999999999999999``
would crash deep inside numpy or msgpack. :class:`Num` states a range once and checks it the
same way in each place it is used:

* :meth:`Num.problem` returns what is wrong (or None): the spec schema's rules;
* :meth:`Num.check` raises ``ValueError("<what> must be ..., got ...")``: workload parameters;
* :meth:`Num.arg` is an ``argparse`` ``type=``: command-line flags.

:func:`tree_problem` applies the two rules that hold for every number anywhere in a spec,
free-form tables included (finite; integers within signed 64 bits), and the one for every
string and key (valid text: no lone surrogate), and
:func:`read_text` reads a user's text file with one clear error for every way that fails.
"""

from __future__ import annotations

import argparse
import copy
import math
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from telemetry.jsonl import open_for_reading

INT64_MAX = 2**63 - 1
SEED_MAX = 2**32 - 1
"""Seeds are 32-bit: numpy, ``random`` and the numba kernels all take them (the kernels add
small offsets per pass, which must stay inside 64 bits)."""
YEAR_S = 31_536_000
"""The longest duration a spec or a flag may ask for (365 days)."""
SPEC_MAX_BYTES = 1 << 20
MAX_KEY_CHARS = 200  # an idempotency key (check_key)
IDEMPOTENCY_HEADER = "Idempotency-Key"  # how a submission carries its key over HTTP


class SpecError(ValueError):
    """A spec problem, with the file and the key it is about (defined here, beside the checks,
    so that what only reports it, the command line's error handling, need not load the spec's
    schema and the actors it takes its defaults from)."""


def _fmt(x: float) -> str:
    return f"{x:,}".replace(",", "_") if isinstance(x, int) and abs(x) >= 100_000 else f"{x:g}"


@dataclass(frozen=True)
class Num:
    """A finite number (``integer=True``: an int, never a bool) in ``[lo, hi]``.

    ``lo_open`` excludes ``lo`` (``(0, 1]``). Without ``hi`` an integer is still bounded by
    :data:`INT64_MAX` and a float by being finite.
    """

    lo: float | None = None
    hi: float | None = None
    integer: bool = False
    lo_open: bool = False

    def describe(self) -> str:
        kind = "an integer" if self.integer else "a finite number"
        lo, hi = self.lo, self.hi if self.hi is not None else (INT64_MAX if self.integer else None)
        if lo is None and hi is None:
            return kind
        if hi is None:
            return f"{kind} {'>' if self.lo_open else '>='} {_fmt(lo)}"  # type: ignore[arg-type]
        if lo is None:
            return f"{kind} <= {_fmt(hi)}"
        return f"{kind} in {'(' if self.lo_open else '['}{_fmt(lo)}, {_fmt(hi)}]"

    def problem(self, v: Any) -> str | None:
        """What is wrong with ``v`` ("must be ..., got ..."), or None."""
        ok_type = isinstance(v, int) if self.integer else isinstance(v, (int, float))
        if isinstance(v, bool) or not ok_type:
            return f"must be {self.describe()}, got {v!r:.200}"
        if isinstance(v, float) and not math.isfinite(v):
            return f"must be {self.describe()}, got {v!r:.200}"
        hi = self.hi if self.hi is not None else (INT64_MAX if self.integer else None)
        if self.lo is not None and (v <= self.lo if self.lo_open else v < self.lo):
            return f"must be {'>' if self.lo_open else '>='} {_fmt(self.lo)}, got {v!r:.200}"
        if hi is not None and v > hi:
            return f"must be <= {_fmt(hi)}, got {v!r:.200}"
        if isinstance(v, int) and abs(v) > INT64_MAX:
            return f"must be {self.describe()}, got {v!r:.200}"
        return None

    def check(self, what: str, v: Any) -> Any:
        """``v`` itself if it is in range; ``ValueError("<what> must be ...")`` if not."""
        problem = self.problem(v)
        if problem:
            raise ValueError(f"{what} {problem}")
        return v

    def parse(self, text: str) -> int | float:
        """Read a command-line string (``ValueError`` naming the range if it does not fit)."""
        try:
            if not text.isascii():  # int() and float() also read other scripts' digits ("١٢" is 12)
                raise ValueError(text)
            v: int | float = int(text, 10) if self.integer else float(text)
        except ValueError:
            raise ValueError(f"must be {self.describe()}, got {text!r}") from None
        if self.problem(v):
            raise ValueError(f"must be {self.describe()}, got {text!r}")
        return v

    def arg(self) -> Callable[[str], int | float]:
        """An ``argparse`` ``type=``: the error names the flag, the range and the value."""

        def parse_arg(text: str) -> int | float:
            try:
                return self.parse(text)
            except ValueError as exc:
                raise argparse.ArgumentTypeError(str(exc)) from None

        parse_arg.__name__ = "number"
        return parse_arg


SEED = Num(0, SEED_MAX, integer=True)
PORT = Num(0, 65535, integer=True)
SECONDS = Num(0.001, YEAR_S)
"""A duration a user asks for: 1 ms to 365 days."""


def tree_problem(data: Any, path: str = "") -> tuple[str, str] | None:
    """The first number anywhere in ``data`` (dicts and lists, walked) that is not finite or
    does not fit in 64 bits, or string (a value or a key) that is not valid text, as ``(dotted
    path, problem)``; None when every one is fine. Not valid text: a lone surrogate, which is
    what a command-line argument or a JSON ``\\ud800`` escape that is not UTF-8 becomes, and
    which no file, message or database can hold."""
    stack: list[tuple[str, Any]] = [(path, data)]
    while stack:
        where, v = stack.pop()
        if isinstance(v, dict):
            for k in v:
                if isinstance(k, str) and not _is_text(k):
                    return f"{where}.{k!a}" if where else ascii(k), "a key that is not valid text (not UTF-8)"
            stack.extend((f"{where}.{k}" if where else str(k), x) for k, x in reversed(list(v.items())))
        elif isinstance(v, str) and not _is_text(v):
            return where, f"not valid text (not UTF-8): {brief(ascii(v), 80)}"
        elif isinstance(v, (list, tuple)):
            stack.extend((f"{where}[{i}]", x) for i, x in reversed(list(enumerate(v))))
        elif isinstance(v, float) and not math.isfinite(v):
            return where, f"must be a finite number, got {v!r:.200}"
        elif isinstance(v, int) and not isinstance(v, bool) and abs(v) > INT64_MAX:
            return where, f"must fit in 64 bits (at most {INT64_MAX} in size), got {v!r:.200}"
    return None


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def brief(text: str, limit: int = 60) -> str:
    """``text`` cut to about ``limit`` characters, saying how long it was: a value in a message
    or a printed line stays short whatever its size."""
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"


def check_key(key: object) -> str | None:
    """A submission's idempotency key: None, or 1 to :data:`MAX_KEY_CHARS` printable ASCII
    characters without spaces (a UUID, a job's name); ValueError saying what is wrong."""
    if key is None:
        return None
    if not isinstance(key, str) or not 0 < len(key) <= MAX_KEY_CHARS:
        raise ValueError(f"idempotency key: must be 1 to {MAX_KEY_CHARS} characters, got {brief(repr(key), 80)}")
    if not (key.isascii() and key.isprintable()) or " " in key:
        raise ValueError(f"idempotency key: only printable ASCII without spaces, got {brief(repr(key), 80)}")
    return key


def read_text(path: str | Path, what: str = "file", max_bytes: int = SPEC_MAX_BYTES) -> str:
    """A user's UTF-8 text file; ``ValueError`` naming the file for a missing or unreadable
    file, a folder, a file over ``max_bytes``, or bytes that are not UTF-8. It is opened
    without blocking (:func:`telemetry.jsonl.open_for_reading`): a named FIFO or a device is
    refused, never waited on; an anonymous pipe (``/dev/stdin`` fed by ``|``) is read to its end."""
    path = Path(path)
    try:
        with open_for_reading(path, pipe_ok=True) as fh:
            data = fh.read(max_bytes + 1)
    except OSError as exc:
        raise ValueError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    if len(data) > max_bytes:
        raise ValueError(f"{path}: the {what} is larger than {max_bytes:,} bytes")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path}: the {what} is not UTF-8 text (byte 0x{data[exc.start]:02x} at offset {exc.start})"
        ) from None


def merge_tables(
    base: dict[str, Any],
    over: dict[str, Any],
    *,
    strict: bool = False,
    opaque: tuple[str, ...] = (),
    where: str = "",
    what: str = "key",
) -> dict[str, Any]:
    """``over`` on top of ``base``, table by table (deep copies: the result shares nothing).

    ``strict``: a key that ``base`` lacks is an error naming it and the known keys (a typo in a
    spec must not be ignored). Tables named in ``opaque`` are values, replaced whole.
    """
    out = copy.deepcopy(base)
    for k, v in over.items():
        if strict and k not in base:
            raise ValueError(f"unknown {what} {where}{k!r}; known: {', '.join(sorted(base))}")
        if isinstance(out.get(k), dict) and k not in opaque:
            if not isinstance(v, dict):
                if strict:
                    raise ValueError(f"{where}{k} must be a table")
                out[k] = copy.deepcopy(v)
                continue
            out[k] = merge_tables(out[k], v, strict=strict, opaque=opaque, where=f"{where}{k}.", what=what)
        else:
            out[k] = copy.deepcopy(v)
    return out
