"""The supervisor's decision, without threads: the restart intensity window and the table of
what an exit leads to (OTP's supervisor rules)."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from actors.supervision import (
    GIVE_UP,
    IGNORE,
    RESTART,
    SHUTDOWN_SUPERVISOR,
    Decision,
    decide,
    restart_group,
    within_intensity,
)

# --- within_intensity against a naive reference ----------------------------------------------------


def naive_ok(history: list[float], max_restarts: int, max_seconds: float) -> bool:
    """The last restart of ``history`` keeps the supervisor within its intensity: at most
    ``max_restarts`` restarts (that one included) at most ``max_seconds`` before it."""
    now = history[-1]
    return sum(1 for t in history if now - max_seconds <= t <= now) <= max_restarts


gaps = st.lists(st.floats(0.0, 10.0, allow_nan=False, allow_infinity=False), min_size=1, max_size=40)


@given(gaps=gaps, max_restarts=st.integers(0, 6), max_seconds=st.floats(0.01, 20.0))
def test_intensity_agrees_with_counting_the_whole_history(gaps, max_restarts, max_seconds):
    times, now = [], 0.0
    for g in gaps:
        now += g
        times.append(now)
    window: tuple[float, ...] = ()
    for i, t in enumerate(times):
        ok, window = within_intensity(window, t, max_restarts, max_seconds)
        assert ok == naive_ok(times[: i + 1], max_restarts, max_seconds)
        assert window[-1] == t and all(t - max_seconds <= w <= t for w in window)  # only the window is kept
        assert list(window) == [w for w in times[: i + 1] if w >= t - max_seconds]


@given(
    window=st.lists(st.floats(0.0, 100.0, allow_nan=False), max_size=10).map(lambda xs: tuple(sorted(xs))),
    max_restarts=st.integers(0, 6),
    max_seconds=st.floats(0.01, 50.0),
)
def test_intensity_is_pure(window, max_restarts, max_seconds):
    now = (window[-1] if window else 0.0) + 1.0
    first = within_intensity(window, now, max_restarts, max_seconds)
    assert within_intensity(window, now, max_restarts, max_seconds) == first  # same input, same answer
    assert isinstance(first[1], tuple)


def test_zero_max_restarts_never_allows_a_restart():
    assert within_intensity((), 0.0, 0, 5.0) == (False, (0.0,))


def test_the_window_edge_counts_as_inside():
    ok, window = within_intensity((0.0,), 5.0, 1, 5.0)  # exactly max_seconds apart: both count
    assert (ok, window) == (False, (0.0, 5.0))
    ok, window = within_intensity((0.0,), 5.5, 1, 5.0)
    assert (ok, window) == (True, (5.5,))


# --- the decision table ------------------------------------------------------------------------------

ABNORMAL = "exception: RuntimeError: boom"


@pytest.mark.parametrize(
    ("restart", "reason", "action"),
    [
        ("permanent", "normal", RESTART),
        ("permanent", "shutdown", RESTART),
        ("permanent", ABNORMAL, RESTART),
        ("permanent", "killed", RESTART),
        ("transient", "normal", IGNORE),
        ("transient", "shutdown", IGNORE),
        ("transient", "shutdown: told so", IGNORE),
        ("transient", ABNORMAL, RESTART),
        ("transient", "killed", RESTART),
        ("temporary", "normal", IGNORE),
        ("temporary", ABNORMAL, IGNORE),
    ],
)
def test_restart_types(restart, reason, action):
    assert decide("one_for_one", restart, reason, False, "never").action == action


@pytest.mark.parametrize(
    ("strategy", "index", "group"),
    [
        ("one_for_one", 1, (1,)),
        ("one_for_all", 1, (0, 1, 2, 3)),
        ("rest_for_one", 1, (1, 2, 3)),
        ("rest_for_one", 0, (0, 1, 2, 3)),
        ("rest_for_one", 3, (3,)),
    ],
)
def test_the_strategy_picks_the_group(strategy, index, group):
    d = decide(strategy, "permanent", ABNORMAL, False, "never", index=index, count=4)
    assert d == Decision(RESTART, group)
    assert restart_group(strategy, index, 4) == group


def test_over_the_intensity_the_supervisor_gives_up():
    d = decide("rest_for_one", "permanent", ABNORMAL, False, "never", index=1, count=3, intensity_ok=False)
    assert d == Decision(GIVE_UP)
    # an exit that restarts nothing never counts against the intensity
    assert decide("one_for_one", "transient", "normal", False, "never", intensity_ok=False).action == IGNORE


@pytest.mark.parametrize(
    ("restart", "reason", "significant", "mode", "others", "action"),
    [
        ("transient", "normal", True, "any_significant", True, SHUTDOWN_SUPERVISOR),
        ("transient", "shutdown", True, "any_significant", False, SHUTDOWN_SUPERVISOR),
        ("transient", ABNORMAL, True, "any_significant", False, RESTART),  # restarted, not an end
        ("temporary", ABNORMAL, True, "any_significant", False, SHUTDOWN_SUPERVISOR),
        ("transient", "normal", True, "never", False, IGNORE),
        ("transient", "normal", False, "any_significant", False, IGNORE),  # not significant
        ("temporary", "normal", True, "all_significant", True, IGNORE),  # another one still runs
        ("temporary", "normal", True, "all_significant", False, SHUTDOWN_SUPERVISOR),  # the last one
    ],
)
def test_significant_children_and_auto_shutdown(restart, reason, significant, mode, others, action):
    d = decide("one_for_one", restart, reason, significant, mode, other_significant_running=others)
    assert d.action == action


def test_unknown_strategy_is_refused():
    with pytest.raises(ValueError, match="unknown strategy"):
        restart_group("one_for_some", 0, 1)
