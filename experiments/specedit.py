"""``crucible set / get / show``: edit and read experiment specs with the same validation as ``run``.

Edits go through tomlkit, so comments and layout of the file survive; a change that would
make the spec invalid, or a file larger than a spec may be (:data:`SPEC_MAX_BYTES`), is
refused and the file is left untouched. The new text is validated in memory (no scratch file
beside the spec), then replaces the file atomically, so a reader or a crash never sees half
a spec. An edit holds a lock on the spec from its read to its write, so edits that run at once
are applied in turn (one that waits more than :data:`EDIT_LOCK_S` gives up, nothing changed);
only a regular file is edited (``/dev/null`` or a FIFO is refused, not read as an empty spec).

Values are written as TOML text here (:func:`_inline`, :func:`_tables`) and only then handed
to tomlkit: its own conversion of Python values re-indexes an array on every element, scans a
table on every key and copies a string's tail at every escape, quadratic in the value's size;
its parser is linear.
"""

from __future__ import annotations

import contextlib
import copy
import os
import re
import tomllib
from datetime import date, datetime, time
from pathlib import Path
from typing import Any

import tomlkit
from tomlkit.items import InlineTable, Item, Whitespace

from actors.files import NotRegularFileError, atomic_write, locked_file
from experiments.spec import SCHEMA, UNSET, SpecError, known_here, load_spec, parse_override, read_spec_text
from experiments.validate import SPEC_MAX_BYTES, brief
from experiments.workloads import registry as workload_registry

_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_ESCAPED = re.compile(r'[\x00-\x1f\x7f"\\]')  # what a TOML basic string may not hold as itself
EDIT_LOCK_S = 10.0  # how long an edit waits for another one to the same spec before it gives up
_SHORT_ESCAPES = {"\b": "\\b", "\t": "\\t", "\n": "\\n", "\f": "\\f", "\r": "\\r", '"': '\\"', "\\": "\\\\"}


def _load_doc(path: Path) -> tomlkit.TOMLDocument:
    text = read_spec_text(path)[0]  # the same reading and TOML errors as `run`
    try:
        return tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None


def set_values(path: str | Path, assignments: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` assignments (dotted keys) to the file, validated; return the new spec.

    The read, the edit and the write hold a lock on the spec (:func:`actors.files.locked_file`),
    so two edits at once are applied one after the other and neither is lost; a spec that is
    not a regular file (``/dev/null``, a FIFO) is refused, never read as an empty spec."""
    path = Path(path)
    try:
        target = path.resolve()  # a link to a spec: the file it names is edited, the link stays one
    except (OSError, RuntimeError):  # a loop of links, a name too long: the open below says which
        target = path
    with contextlib.ExitStack() as held:
        try:
            held.enter_context(locked_file(target, timeout=EDIT_LOCK_S))
        except FileNotFoundError:
            _load_doc(path)  # the reader's own error for a missing spec
            raise
        except (NotRegularFileError, IsADirectoryError) as exc:
            raise SpecError(f"{path}: {exc.strerror}; only a spec file can be edited") from None
        except TimeoutError as exc:
            raise SpecError(f"{path}: not edited: {exc.strerror}; try again") from None
        except OSError as exc:
            raise SpecError(f"{path}: cannot read the spec ({exc.strerror or exc})") from None
        return _edit(path, target, assignments)


def _edit(path: Path, target: Path, assignments: list[str]) -> dict[str, Any]:
    """The read-modify-write of :func:`set_values`, under its lock."""
    doc = _load_doc(path)
    for item in assignments:
        try:
            keys, value = parse_override(item, flag="")  # refuses a value nested too deep; set takes it bare
        except SpecError as exc:
            raise SpecError(f"{path}: {exc}") from None
        key = ".".join(keys)
        node: Any = doc
        try:
            for k in keys[:-1]:
                if k not in node:
                    node[k] = tomlkit.table()
                node = node[k]
                if not isinstance(node, dict):
                    raise SpecError(f"{path}: {key}: {k!r} is not a table")
            if isinstance(node, InlineTable):
                _set_inline(node, keys[-1], _toml_item(path, key, value, inline=True))
            else:
                node[keys[-1]] = _toml_item(path, key, value, inline=False)
        except (tomlkit.exceptions.TOMLKitError, ValueError, TypeError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"{path}: {key}: cannot set {brief(repr(value))} here ({exc})") from None
    text = tomlkit.dumps(doc)
    data = _fits(path, text, "the edited spec")
    try:
        edited = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: the edit would not be valid TOML ({exc}); nothing changed") from None
    spec = load_spec(edited, workloads=workload_registry(), source=str(path))  # the same validation as `run`
    # read-only for this user, or for everyone (root may write anything: a 0444 spec says "do not edit")
    if not os.access(target, os.W_OK) or not target.stat().st_mode & 0o222:
        raise SpecError(f"{path}: the spec is read-only; nothing changed")
    try:
        atomic_write(target, data)
    except OSError as exc:
        raise SpecError(f"{path}: cannot write the spec ({exc.strerror or exc}); nothing changed") from None
    spec["source"] = str(path)
    return spec


def get_value(path: str | Path, key: str) -> Any:
    """The effective value of a dotted key (defaults filled in), after validation."""
    return lookup(path, key)[0]


def lookup(path: str | Path, key: str) -> tuple[Any, str | None]:
    """The effective value of a dotted key, and what to say of it when the spec leaves it to a
    default that is no single value (:data:`experiments.spec.UNSET`), else None.

    A key no table holds is an error listing the keys there, as ``run`` and ``set`` list them;
    a key the schema knows that has no value is an error saying what its absence means."""
    if not key.strip() or any(not part for part in key.split(".")):
        raise SpecError(f"{path}: bad key {key!r}: give a dotted key, e.g. workload.params.calls")
    spec = load_spec(path, workloads=workload_registry())
    spec.pop("source", None)
    node: Any = spec
    schema: Any = SCHEMA
    note = None
    parts = key.split(".")
    for i, part in enumerate(parts):
        here = ".".join(parts[:i])
        if not isinstance(node, dict):
            raise SpecError(f"{path}: {key}: {here!r} is not a table")
        at = f"{here}.{part}" if here else part
        if part in node:
            node = node[part]
        elif at in UNSET:
            node, said = UNSET[at]
            note = f"{at}: {said}"
            if node is None:
                raise SpecError(f"{path}: {note}")
        elif isinstance(schema, dict):  # a table of the schema: its keys are known
            raise SpecError(f"{path}: {at}: {known_here(here + '.' if here else '', set(node) | set(schema))}")
        else:  # a free-form table (metadata, workload.params): what it holds
            held = ", ".join(sorted(f"{here}.{k}" for k in node)) or "nothing"
            raise SpecError(f"{path}: {at}: not in the spec ({here} holds {held})")
        schema = schema.get(part) if isinstance(schema, dict) else None
    return copy.deepcopy(node), note


def show(path: str | Path) -> str:
    """The effective spec (validated, defaults filled in) as TOML; a key left to a default that
    is no single value (:data:`experiments.spec.UNSET`) is said so in a comment."""
    spec = load_spec(path, workloads=workload_registry())
    spec.pop("source", None)
    notes: dict[str, str] = {}
    for key, (value, said) in UNSET.items():
        *tables, last = key.split(".")
        node = spec
        for t in tables:
            node = node[t]
        if node.get(last) is None:
            notes[key] = said
            if value is not None:
                node[last] = copy.deepcopy(value)
    out: list[str] = []
    _tables(_plain(spec), [], out, notes)
    return "".join(out)


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x


def _fits(path: Path, text: str, what: str) -> bytes:
    """``text`` as UTF-8, refused unless a spec that holds it can be read again (see
    :func:`experiments.validate.read_text`): ``set`` must never write a spec ``run`` refuses."""
    try:
        data = text.encode()
    except UnicodeEncodeError as exc:  # a lone surrogate, from a command line that was not UTF-8
        raise SpecError(f"{path}: {what} is not UTF-8 text ({exc.reason}); nothing changed") from None
    if len(data) > SPEC_MAX_BYTES:
        raise SpecError(
            f"{path}: {what} would be {len(data):,} bytes, more than the {SPEC_MAX_BYTES:,} a spec may hold; "
            "nothing changed"
        )
    return data


def _set_inline(table: InlineTable, key: str, item: Item) -> None:
    """Set ``key`` in an inline table; a new key keeps the blank that closed the table
    (``{ a = 1, b = 2 }``), where tomlkit leaves the new key against the brace (``b = 2}``)."""
    body = table.value.body
    spaced = key not in table and body and body[-1][0] is None and isinstance(body[-1][1], Whitespace)
    table[key] = item
    if spaced:
        body.append((None, Whitespace(" ")))


def _toml_item(path: Path, key: str, value: Any, inline: bool) -> Item:
    """``value`` as a tomlkit item, by way of its TOML text (linear in its size, see the module's
    docstring): a table as a ``[table]`` of its own unless its parent is an inline table.
    A value too large for a spec is refused before tomlkit reads it."""
    if isinstance(value, dict) and not inline:
        out: list[str] = []
        _tables(value, ["v"], out)
        text = "".join(out)
    else:
        text = f"v = {_inline(value)}\n"
    _fits(path, text, f"{key}: the value")
    return tomlkit.parse(text)["v"]


def _tables(table: dict[str, Any], path: list[str], out: list[str], notes: dict[str, str] | None = None) -> None:
    """``table`` as TOML lines on ``out``: its values first, then each sub-table under its
    ``[header]`` (the layout tomlkit gives a dict). ``notes`` (dotted key: text) are comments
    after the values of the table that holds the key."""
    if path:
        blank = "\n" if out else ""
        out.append(f"{blank}[{'.'.join(map(_key, path))}]\n")
    out.extend(f"{_key(k)} = {_inline(v)}\n" for k, v in table.items() if not isinstance(v, dict))
    here = ".".join(path)
    for key, said in (notes or {}).items():
        table_of, _, name = key.rpartition(".")
        if table_of == here:
            out.append(f"# {name}: {said}\n")
    for k, v in table.items():
        if isinstance(v, dict):
            _tables(v, [*path, k], out, notes)


def _inline(v: Any) -> str:
    """A value as inline TOML (a table as ``{k = v}``); nesting is bounded by
    :data:`experiments.spec.MAX_DEPTH`, checked before anything gets here."""
    if isinstance(v, str):
        return _string(v)
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return str(v)  # floats: inf, -inf and nan are TOML's spelling too
    if isinstance(v, (list, tuple)):
        return f"[{', '.join(map(_inline, v))}]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_key(k)} = {_inline(x)}" for k, x in v.items()) + "}"
    if isinstance(v, (datetime, date, time)):
        return tomlkit.item(v).as_string()
    raise TypeError(f"{type(v).__name__} is not a TOML value")


def _key(k: str) -> str:
    return k if _BARE_KEY.fullmatch(k) else _string(k)


def _string(s: str) -> str:
    return '"' + _ESCAPED.sub(lambda m: _SHORT_ESCAPES.get(m[0]) or f"\\u{ord(m[0]):04x}", s) + '"'
