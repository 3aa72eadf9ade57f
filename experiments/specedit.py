"""``crucible set / get / show``: edit and read experiment specs with the same validation as ``run``.

Edits go through tomlkit, so comments and layout of the file survive; a change that would
make the spec invalid is refused and the file is left untouched.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import tomlkit

from experiments.spec import SpecError, load_spec, parse_override
from experiments.workloads import registry as workload_registry


def _load_doc(path: Path) -> tomlkit.TOMLDocument:
    try:
        return tomlkit.parse(path.read_text())
    except OSError as exc:
        raise SpecError(f"{path}: cannot read the spec ({exc.strerror or exc})") from None
    except tomlkit.exceptions.ParseError as exc:
        raise SpecError(f"{path}: not valid TOML: {exc}") from None


def set_values(path: str | Path, assignments: list[str]) -> dict[str, Any]:
    """Apply ``key=value`` assignments (dotted keys) to the file, validated; return the new spec."""
    path = Path(path)
    doc = _load_doc(path)
    for item in assignments:
        keys, value = parse_override(item)
        node: Any = doc
        for k in keys[:-1]:
            if k not in node:
                node[k] = tomlkit.table()
            node = node[k]
            if not isinstance(node, dict):
                raise SpecError(f"{path}: {'.'.join(keys)}: {k!r} is not a table")
        node[keys[-1]] = value
    text = tomlkit.dumps(doc)
    tmp = path.with_suffix(path.suffix + ".check")
    try:
        tmp.write_text(text)
        spec = load_spec(tmp, workloads=workload_registry())  # the same validation as `run`
    except SpecError as exc:
        raise SpecError(str(exc).replace(str(tmp), str(path))) from None
    finally:
        tmp.unlink(missing_ok=True)
    path.write_text(text)
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
