"""Workloads: what a Phase actor runs, step by step (see ``experiments.workloads.base``).

A spec's ``workload.name`` picks a class from :func:`registry`: the built-ins (``latency``,
and ``coloring`` when its pipeline imports), the classes installed packages declare in the
entry-point group :data:`ENTRY_POINT_GROUP` (found in every process: the CLI, a lab daemon),
and those this process gave to :func:`register`. A name is an id, never an import path: it
names files (hypertune's ``<workload>-<family>.json``) and it is what recorded runs and a
daemon's submissions carry, so a spec can only pick code that was installed or registered.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import inspect
import threading
from collections.abc import Callable, Iterator, Mapping
from typing import Any, overload

from actors.log import get_logger
from experiments.workloads.base import Arm, Control, Objective, Workload, declarations
from experiments.workloads.latency import LatencyWorkload
from telemetry.schema import check_id

log = get_logger("experiments.workloads")

ENTRY_POINT_GROUP = "crucible.workloads"
"""The entry-point group an installed package declares its workload classes in
(``name = "package.module:Class"``; the name is the spec's ``workload.name``)."""

BUILTIN = {
    "latency": "experiments.workloads.latency:LatencyWorkload",
    "coloring": "experiments.coloring.workload:ColoringWorkload",
}
"""The built-in workloads' names and classes: no registration or entry point may take them."""

KINDS = ("float", "int", "logint")
"""The kinds of a ``search_space`` dimension."""
METHODS = ("start", "step", "checkpoint", "restore", "params", "set_param")
CLASS_METHODS = ("check_params", "family")

_lock = threading.Lock()  # the registered classes and the generation
_discovering = threading.RLock()  # one look for plug-ins at a time (held while their modules import)
_local = threading.local()
_registered: dict[str, type[Any]] = {}
_plugins: tuple[dict[str, type[Any]], dict[str, str], dict[str, str]] | None = None
"""Entry points as found once per process: (name -> class, name -> where, name -> why it is broken)."""
_generation = 0


class WorkloadError(ValueError):
    """A workload class that does not follow the protocol, a name that is not an id, or a name
    another workload already has (the message names both)."""


class WorkloadRegistry(dict[str, type[Workload]]):
    """Workload name -> class, and in :attr:`broken` the entry points that could not be loaded
    (name -> why), so that a spec naming one is told why, not "unknown workload"."""

    def __init__(self, found: Mapping[str, type[Workload]], broken: Mapping[str, str]) -> None:
        super().__init__(found)
        self.broken: dict[str, str] = dict(broken)


def _where(cls: object) -> str:
    """``module:Qualname`` of a class, as an error names it."""
    return f"{getattr(cls, '__module__', '?')}:{getattr(cls, '__qualname__', repr(cls))}"


def check_workload(name: str, cls: object) -> type[Workload]:
    """Check that ``cls`` follows the workload protocol under ``name`` (what the framework reads
    of it before any run: a bad declaration would otherwise fail deep inside a controller).

    Raises:
        WorkloadError: naming the class and what is missing or wrong.
    """
    try:
        check_id("workload name", name)
    except ValueError as exc:
        raise WorkloadError(str(exc)) from None
    if not inspect.isclass(cls):
        raise WorkloadError(f"workload {name!r}: a workload is a class, got {cls!r:.100}")
    what = f"workload {name!r} ({_where(cls)})"
    own = getattr(cls, "name", None)
    if own != name:
        raise WorkloadError(f"{what}: its class attribute name is {own!r}; it must be {name!r}, the name it is run by")
    objective = getattr(cls, "objective", None)
    if not isinstance(objective, Objective):
        raise WorkloadError(f"{what}: objective must be an Objective, got {objective!r:.100}")
    for attr, kind in (("arms", Arm), ("takeover", Control)):
        got = getattr(cls, attr, None)
        if not isinstance(got, tuple) or not all(isinstance(x, kind) for x in got):
            raise WorkloadError(f"{what}: {attr} must be a tuple of {kind.__name__}, got {got!r:.100}")
    space = getattr(cls, "search_space", None)
    if not isinstance(space, dict):
        raise WorkloadError(f"{what}: search_space must be a dict (empty: it cannot be tuned), got {space!r:.100}")
    for key, dim in space.items():
        if not (isinstance(key, str) and isinstance(dim, tuple) and len(dim) == 3 and dim[2] in KINDS):
            raise WorkloadError(f"{what}: search_space[{key!r}] must be (low, high, kind in {KINDS}), got {dim!r:.100}")
    missing = [m for m in (*CLASS_METHODS, *METHODS) if not callable(getattr(cls, m, None))]
    if missing:
        raise WorkloadError(f"{what}: missing method(s) {', '.join(missing)} of the workload protocol")
    return cls  # type: ignore[return-value]


def _builtins() -> dict[str, type[Workload]]:
    found: dict[str, type[Workload]] = {"latency": LatencyWorkload}
    try:
        from experiments.coloring.workload import ColoringWorkload
    except ImportError:
        pass
    else:
        found["coloring"] = ColoringWorkload
    return found


def _entry_points() -> Iterator[importlib.metadata.EntryPoint]:
    yield from importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)


def _describe(ep: importlib.metadata.EntryPoint) -> str:
    dist = getattr(ep.dist, "name", None) if getattr(ep, "dist", None) is not None else None
    return f"entry point {ep.name} = {ep.value!r} in group {ENTRY_POINT_GROUP!r}" + (f" of {dist}" if dist else "")


def _discover() -> tuple[dict[str, type[Any]], dict[str, str], dict[str, str]]:
    """Load every entry point once: a broken one is kept with its error (logged once) and never
    hides the built-ins or the other plug-ins."""
    loaded: dict[str, type[Any]] = {}
    where: dict[str, str] = {}
    broken: dict[str, str] = {}
    for ep in _entry_points():
        desc = _describe(ep)
        if ep.name in BUILTIN:
            broken[ep.name] = f"workload plug-in {desc}: the name {ep.name!r} is the built-in {BUILTIN[ep.name]}"
        elif ep.name in where:
            broken[ep.name] = f"workload plug-in {ep.name!r} is declared twice: {where[ep.name]} and {desc}"
            loaded.pop(ep.name, None)
        else:
            where[ep.name] = desc
            try:
                loaded[ep.name] = check_workload(ep.name, ep.load())
            except Exception as exc:  # noqa: BLE001 - a plug-in's import error is the plug-in's, not ours
                broken[ep.name] = f"workload plug-in {desc} cannot be loaded: {type(exc).__name__}: {exc}"
        if ep.name in broken:
            log.warning("workload plug-in not loaded", workload=ep.name, error=broken[ep.name])
    return loaded, where, broken


def _plugin_state() -> tuple[dict[str, type[Any]], dict[str, str], dict[str, str]]:
    global _plugins
    found = _plugins
    if found is not None:
        return found
    if getattr(_local, "discovering", False):  # a plug-in's module calls register() as it is loaded
        return {}, {}, {}
    with _discovering:
        if _plugins is None:
            _local.discovering = True
            try:
                _plugins = _discover()
            finally:
                _local.discovering = False
        return _plugins


def discover(refresh: bool = False) -> dict[str, str]:
    """The workload plug-ins this process found (name -> ``"entry point ..."``, broken ones
    included); ``refresh`` looks again (a package installed, or put on ``sys.path``, since)."""
    global _plugins, _generation
    if refresh:
        importlib.invalidate_caches()
        with _discovering, _lock:
            _plugins = None
            _generation += 1
    _, where, broken = _plugin_state()
    return {**where, **{n: broken[n] for n in broken if n not in where}}


@overload
def register(name: str, cls: None = None) -> Callable[[type[Any]], type[Any]]: ...
@overload
def register(name: str, cls: type[Any]) -> type[Any]: ...
def register(name: str, cls: type[Any] | None = None) -> type[Any] | Callable[[type[Any]], type[Any]]:
    """Make ``cls`` the workload a spec's ``workload.name = name`` runs, in this process (for
    the CLI or a lab daemon, another process, declare an entry point instead: see the module
    docs). Used as ``register("mywl", MyWorkload)`` or as a decorator ``@register("mywl")``.
    Registering the same class again is a no-op.

    Raises:
        WorkloadError: the class does not follow the protocol, the name is not an id, or it is
            taken by a built-in, a plug-in or another registered class (both named).
    """
    global _generation
    if cls is None:
        return lambda c: register(name, c)
    check_workload(name, cls)
    if name in BUILTIN:
        raise WorkloadError(f"cannot register {_where(cls)} as {name!r}: that is the built-in {BUILTIN[name]}")
    loaded, where, broken = _plugin_state()
    if loaded.get(name) is cls:  # the plug-in's own class, registered by its module too
        return cls
    if name in where or name in broken:
        raise WorkloadError(f"cannot register {_where(cls)} as {name!r}: {where.get(name) or broken[name]} has it")
    with _lock:
        held = _registered.get(name)
        if held is not None and held is not cls:
            raise WorkloadError(f"cannot register {_where(cls)} as {name!r}: {_where(held)} is registered under it")
        if held is None:
            _registered[name] = cls
            _generation += 1
    log.debug("workload registered", workload=name, cls=_where(cls))
    return cls


def unregister(name: str) -> type[Any] | None:
    """Forget a class :func:`register` gave ``name`` (an embedder's or a test's clean-up); the
    class, or None when none was registered under it. Built-ins and plug-ins stay."""
    global _generation
    with _lock:
        _generation += 1
        return _registered.pop(name, None)


def generation() -> int:
    """A number that changes whenever the set of workloads may have (a registration, a look
    for plug-ins): what a reader caching a table of declarations compares."""
    return _generation


def registry() -> WorkloadRegistry:
    """Workload name -> class: built-ins, installed plug-ins and registered classes (see the
    module docs); ``.broken`` says why a plug-in that failed to load is missing."""
    loaded, _, broken = _plugin_state()
    with _lock:
        registered = dict(_registered)
    return WorkloadRegistry({**_builtins(), **loaded, **registered}, broken)


def objectives() -> dict[str, Objective]:
    """Every workload's objective, by workload name (for readers that know no workload). The
    colouring pipeline declares its objective apart, so that readers of recorded runs (``list``,
    ``compare``, the monitor) need not import the pipeline and its numba kernels; a plug-in's
    or a registered class's is read from the class."""
    found = {"latency": LatencyWorkload.objective}
    try:
        from experiments.coloring.objective import OBJECTIVE
    except ImportError:
        pass
    else:
        found["coloring"] = OBJECTIVE
    loaded, _, _ = _plugin_state()
    with _lock:
        registered = dict(_registered)
    found.update({name: cls.objective for name, cls in {**loaded, **registered}.items()})
    return found


def objective_of(name: object) -> Objective | None:
    """The objective of the workload called ``name`` (as a spec or a run's records give it),
    or None when no workload has that name: for readers that have a name, not a class."""
    return objectives().get(name) if isinstance(name, str) else None


__all__ = [
    "ENTRY_POINT_GROUP",
    "Arm",
    "Control",
    "LatencyWorkload",
    "Objective",
    "Workload",
    "WorkloadError",
    "WorkloadRegistry",
    "check_workload",
    "declarations",
    "discover",
    "generation",
    "objective_of",
    "objectives",
    "register",
    "registry",
    "unregister",
]
