"""What a lab daemon lets a submission do: read files only in its data folders, call only the
code and endpoints it allows.

Whoever holds a daemon's token may run experiments; that must not make them the daemon's
user. A workload names the local files its parameters read (``files``) and the code or
endpoints they make it call (``targets``: see :mod:`experiments.workloads.base`), and
:class:`Admission` checks both, at submission and again when the experiment starts (a link
in a data folder may have been changed meanwhile).

Allowed targets (``crucible lab serve --allow-target``, repeatable, added to
:data:`DEFAULT_TARGETS`):

* ``module:function``: that function;
* ``module:*``: any function of that module (the module itself, not its submodules);
* ``http://host[:port]/path`` or ``https://...``: URLs of that scheme, host and port whose
  path starts with that path (no user name or password in the URL).
"""

from __future__ import annotations

import re
import urllib.parse
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from experiments.spec import SpecError, load_spec
from experiments.workloads import registry as workload_registry

BOUNDED_MATH = (
    *("sqrt", "cbrt", "exp", "exp2", "expm1", "log", "log1p", "log2", "log10", "pow", "hypot", "fsum"),
    *("sin", "cos", "tan", "asin", "acos", "atan", "atan2", "sinh", "cosh", "tanh"),
    *("fabs", "floor", "ceil", "trunc", "fmod", "copysign", "isfinite", "isnan"),
)
"""The ``math`` functions whose time does not grow with their arguments' values (not
``factorial``, ``comb`` or ``perm``: a number in a spec would hold the phase for hours)."""

DEFAULT_TARGETS = ("experiments.workloads.latency:checksum_work", *(f"math:{f}" for f in BOUNDED_MATH))
"""Targets every daemon allows: the latency workload's own default and bounded arithmetic.
None of them can hold a phase longer than its arguments' size allows: a stop cannot cut a
call short, so ``time:sleep`` (or any slow target) is the operator's to allow."""

_NAME = r"[A-Za-z_][A-Za-z0-9_]*"
_CODE = re.compile(rf"({_NAME}(?:\.{_NAME})*):({_NAME}|\*)")


def check_data_dir(path: str | Path) -> Path:
    """An existing folder, resolved (a submission's files are compared with it resolved too).

    Raises:
        ValueError: naming the path and what it is instead.
    """
    p = Path(path).expanduser()
    if not p.is_dir():
        raise ValueError(f"data folder {str(path)!r} {'is not a folder' if p.exists() else 'does not exist'}")
    return p.resolve()


def _url(text: str) -> urllib.parse.SplitResult | None:
    """``text`` split as an http(s) URL with a host and no user info, else None."""
    try:
        u = urllib.parse.urlsplit(text)
        u.port  # noqa: B018 - raises ValueError for a port that is not a number in range
    except ValueError:
        return None
    if u.scheme not in ("http", "https") or not u.hostname or "@" in u.netloc:
        return None
    return u


def check_target_rule(rule: str) -> str:
    """``rule`` if it is an allowed-target form (see the module docs).

    Raises:
        ValueError: naming the rule and the forms.
    """
    if _CODE.fullmatch(rule) or _url(rule) is not None:
        return rule
    raise ValueError(
        f"allowed target {rule!r} must be 'module:function', 'module:*' or an http(s)://host[:port]/path URL"
    )


def target_allowed(target: str, rules: Sequence[str]) -> bool:
    """Whether one of ``rules`` allows ``target`` (see the module docs)."""
    code = _CODE.fullmatch(target)
    if code is not None:
        module, function = code.groups()
        return function != "*" and any(r in (target, f"{module}:*") for r in rules)
    u = _url(target)
    if u is None:
        return False
    for rule in rules:
        r = _url(rule)
        if r is not None and (r.scheme, r.hostname, r.port) == (u.scheme, u.hostname, u.port):
            if (u.path or "/").startswith(r.path or "/"):
                return True
    return False


class Admission:
    """A daemon's rules for submissions: its data folders and its allowed targets."""

    def __init__(self, data_dirs: Sequence[str | Path] = (), allow_targets: Sequence[str] = ()) -> None:
        self.data_dirs = tuple(check_data_dir(d) for d in data_dirs)
        self.targets = (*DEFAULT_TARGETS, *(check_target_rule(t) for t in allow_targets))

    def load(self, raw: dict[str, Any], overrides: list[str] | None, source: str) -> dict[str, Any]:
        """``raw`` with its overrides, loaded and checked (:func:`~experiments.spec.load_spec`),
        if these rules admit it. The rules are applied before the workload checks its
        parameters too: checking a target imports its module, and an import runs code.

        Raises:
            SpecError: the spec is not valid, or these rules refuse it.
        """
        self.check(load_spec(raw, overrides, source=source), checked=False)
        full = load_spec(raw, overrides, workload_registry(), source=source)
        self.check(full)
        return full

    def check(self, full: dict[str, Any], checked: bool = True) -> None:
        """Refuse a (loaded) spec that would read a local file outside the data folders or call
        a target not allowed: an error would quote a file, a call could run anything.
        ``checked``: the workload has checked its parameters; when not, a parameter its
        declarations cannot read is left for that check to refuse.

        Raises:
            SpecError: naming the file or target and what is allowed.
        """
        workload = workload_registry().get(full["workload"]["name"])
        if workload is None:
            return  # an unknown workload: load_spec names it
        params = full["workload"]["params"]
        try:
            files = [*getattr(workload, "files", lambda p: [])(params)]
            targets = [*getattr(workload, "targets", lambda p: [])(params)]
        except (ValueError, TypeError, AttributeError, KeyError):
            if checked:
                raise
            return
        for path in files:
            if not any(path.is_relative_to(d) for d in self.data_dirs):
                allowed = ", ".join(map(str, self.data_dirs)) or "none (start the daemon with --data-dir)"
                raise SpecError(  # the path as resolved is not quoted: a link's target is not the submitter's to learn
                    f"submitted spec: workload.params names a file outside the daemon's data folders ({allowed}); "
                    "shipped instances are always allowed"
                )
        for target in targets:
            if not target_allowed(target, self.targets):
                raise SpecError(
                    f"submitted spec: workload.params.target {target!r} is not allowed on this daemon "
                    f"(allowed: {', '.join(self.targets)}; start it with --allow-target to add one)"
                )
