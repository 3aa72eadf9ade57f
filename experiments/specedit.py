"""``crucible set / get / show``: edit and read experiment specs with the same validation as ``run``.

Edits go through tomlkit, so comments and layout of the file survive; a change that would
make the spec invalid is refused and the file is left untouched. The new text is validated
in memory (no scratch file beside the spec), then replaces the file atomically, so a reader
or a crash never sees half a spec.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import tomlkit

from actors.files import atomic_write
from experiments.spec import SpecError, load_spec, parse_override, read_spec_text
from experiments.workloads import registry as workload_registry


def _load_doc(path: Path) -> tomlkit.TOMLDocument:
    text = read_spec_text(path)[0]  # the same reading and TOML errors as `run`
    try:
        return tomlkit.parse(text)
    except tomlkit.exceptions.ParseError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None


def set_values(path: str | Path, assignments: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` assignments (dotted keys) to the file, validated; return the new spec."""
    path = Path(path)
    doc = _load_doc(path)
    for item in assignments:
        keys, value = parse_override(item)
        node: Any = doc
        try:
            for k in keys[:-1]:
                if k not in node:
                    node[k] = tomlkit.table()
                node = node[k]
                if not isinstance(node, dict):
                    raise SpecError(f"{path}: {'.'.join(keys)}: {k!r} is not a table")
            node[keys[-1]] = value
        except (tomlkit.exceptions.TOMLKitError, ValueError, TypeError) as exc:
            if isinstance(exc, SpecError):
                raise
            raise SpecError(f"{path}: {'.'.join(keys)}: cannot set {value!r} here ({exc})") from None
    text = tomlkit.dumps(doc)
    try:
        edited = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise SpecError(f"{path}: the edit would not be valid TOML ({exc}); nothing changed") from None
    spec = load_spec(edited, workloads=workload_registry(), source=str(path))  # the same validation as `run`
    if not os.access(path, os.W_OK):
        raise SpecError(f"{path}: the spec is read-only; nothing changed")
    try:
        atomic_write(path, text.encode())
    except OSError as exc:
        raise SpecError(f"{path}: cannot write the spec ({exc.strerror or exc}); nothing changed") from None
    spec["source"] = str(path)
    return spec


def get_value(path: str | Path, key: str) -> Any:
    """The effective value of a dotted key (defaults filled in), after validation."""
    spec = load_spec(path, workloads=workload_registry())
    node: Any = spec
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise SpecError(f"{path}: {key}: no such key in the spec")
        node = node[part]
    return node


def show(path: str | Path) -> str:
    """The effective spec (validated, defaults filled in) as TOML."""
    spec = load_spec(path, workloads=workload_registry())
    spec.pop("source", None)
    return tomlkit.dumps(_plain(spec))


def _plain(x: Any) -> Any:
    if isinstance(x, dict):
        return {k: _plain(v) for k, v in x.items() if v is not None}
    if isinstance(x, (list, tuple)):
        return [_plain(v) for v in x]
    return x
