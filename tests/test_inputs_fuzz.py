"""Fuzzing every user input: whatever comes in, only the documented errors come out.

Specs (TOML text, structured specs, ``--set`` strings), ``crucible set`` assignments,
command-line numbers, DIMACS files (arbitrary bytes and near-valid mutations) and JSONL
lines. Documented errors are ValueError subclasses with a message: SpecError, GraphError,
SchemaError (and ValueError from the validation kit).
"""

import math

import numpy as np
import orjson
import pytest
import tomlkit
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from experiments.coloring.graph import MAX_VERTICES, GraphError, read_dimacs
from experiments.monitor import format_event
from experiments.spec import SCHEMA, SpecError, load_spec, parse_override
from experiments.specedit import set_values
from experiments.validate import INT64_MAX, Num, tree_problem
from experiments.workloads import registry
from telemetry.export import BASE_COLUMNS, _flat
from telemetry.schema import FIELDS, SchemaError, compact_event, dumps_line, parse_line

FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])

numbers = st.one_of(
    st.integers(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([0, -1, 1, 2**63 - 1, 2**63, -(2**63), 10**20, 1e308, -1e308, 5e-324]),
)
scalars = st.one_of(numbers, st.booleans(), st.text(max_size=12))
values = st.recursive(
    scalars,
    lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(st.text(max_size=6), inner, max_size=4)),
    max_leaves=12,
)


def _keys(schema=SCHEMA, prefix=""):
    for k, rule in schema.items():
        yield f"{prefix}{k}"
        if isinstance(rule, dict):
            yield from _keys(rule, f"{prefix}{k}.")


KEYS = [
    *sorted(_keys()),
    "workload.params.calls",
    "workload.params.calls_per_step",
    "workload.params.timeout_s",
    "workload.params.args",
    "sampling.config.rate",
    "metadata.x",
    "nope",
    "telemetry.nope",
]


def _valid(spec):
    """What a spec that passed validation guarantees."""
    assert tree_problem(spec) is None
    assert isinstance(spec["seed"], int) and 0 <= spec["seed"] <= 2**32 - 1
    assert math.isfinite(spec["time_budget_s"]) and 0 < spec["time_budget_s"] <= 31_536_000


def _load(text, tmp_path):
    p = tmp_path / "fuzz.toml"
    p.write_bytes(text if isinstance(text, bytes) else text.encode("utf-8", "surrogatepass"))
    return load_spec(p, workloads=registry())


@FUZZ
@given(text=st.one_of(st.text(max_size=200), st.binary(max_size=200)))
def test_any_spec_text_is_a_spec_or_a_spec_error(tmp_path, text):
    try:
        _valid(_load(text, tmp_path))
    except SpecError as exc:
        assert str(exc)


@FUZZ
@given(assignments=st.dictionaries(st.sampled_from(KEYS), values, max_size=5))
def test_any_structured_spec_is_a_spec_or_a_spec_error(tmp_path, assignments):
    doc = tomlkit.document()
    doc["name"] = "fuzz"
    for key, v in assignments.items():
        node = doc
        parts = key.split(".")
        for p in parts[:-1]:
            if p not in node or not isinstance(node[p], dict):
                node[p] = tomlkit.table()
            node = node[p]
        try:
            node[parts[-1]] = v
        except (TypeError, ValueError):  # a value tomlkit itself cannot write (e.g. a lone surrogate)
            assume(False)
    try:
        text = tomlkit.dumps(doc)
    except (TypeError, ValueError):
        assume(False)
    try:
        _valid(_load(text, tmp_path))
    except SpecError as exc:
        assert str(exc)


override_text = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda k, v: f"{k}={v}",
        st.sampled_from(KEYS),
        st.one_of(
            st.text(max_size=20),
            numbers.map(str),
            st.sampled_from(["nan", "inf", "-inf", "[1, nan]", "{a = inf}", "1e999", "0x7fff", "9" * 4400]),
            st.integers(90, 110).map(lambda n: "[" * n + "]" * n),  # either side of the nesting limit
            st.integers(90, 110).map(lambda n: "{a = " * n + "1" + "}" * n),
        ),
    ),
)


@FUZZ
@given(overrides=st.lists(override_text, min_size=1, max_size=3))
def test_any_override_is_applied_or_a_spec_error(tmp_path, overrides):
    p = tmp_path / "base.toml"
    p.write_text('name = "base"\ntime_budget_s = 1.0\n')
    try:
        _valid(load_spec(p, overrides, workloads=registry()))
    except SpecError as exc:
        assert str(exc)


@FUZZ
@given(item=st.text(max_size=40))
def test_parse_override_only_raises_spec_errors(item):
    try:
        keys, _ = parse_override(item)
    except SpecError as exc:
        assert str(exc)
    else:
        assert keys and all(keys)


@FUZZ
@given(assignments=st.lists(override_text, min_size=1, max_size=2))
def test_crucible_set_keeps_the_file_valid_or_untouched(tmp_path, assignments):
    p = tmp_path / "s.toml"
    original = '# comment\nname = "s"\ntime_budget_s = 2.0\n'
    p.write_text(original)
    try:
        spec = set_values(p, assignments)
    except SpecError as exc:
        assert str(exc)
        assert p.read_text() == original
    else:
        _valid(spec)
        _valid(load_spec(p, workloads=registry()))
    assert sorted(x.name for x in tmp_path.iterdir()) == ["s.toml"]


@FUZZ
@given(text=st.text(max_size=30), lo=st.integers(-5, 5), span=st.integers(0, 100), integer=st.booleans())
def test_flag_numbers_parse_in_range_or_raise_value_error(text, lo, span, integer):
    rule = Num(lo, lo + span, integer=integer)
    try:
        v = rule.parse(text)
    except ValueError as exc:
        assert "must be" in str(exc)
    else:
        assert math.isfinite(v) and lo <= v <= lo + span and (isinstance(v, int) or not integer)
        assert text.isascii()  # what a flag shows is what it means: no other script's digits


@pytest.mark.parametrize("text", ["\u0661\u0662", "\uff11\uff12", "\u06f3", "1\uff12"])  # Arabic-Indic, fullwidth
def test_flag_numbers_are_ascii(text):
    with pytest.raises(ValueError, match="must be"):
        Num(0, 100, integer=True).parse(text)
    with pytest.raises(ValueError, match="must be"):
        Num(0, 100).parse(text)


# --- DIMACS files --------------------------------------------------------------------------------------


def _check_graph(g):
    assert 1 <= g.n <= MAX_VERTICES
    assert g.indptr[0] == 0 and np.all(np.diff(g.indptr) >= 0) and g.indptr[-1] == g.indices.size
    if g.indices.size:
        assert g.indices.min() >= 0 and g.indices.max() < g.n


@FUZZ
@given(data=st.binary(max_size=300))
def test_any_bytes_are_a_graph_or_a_graph_error(tmp_path, data):
    p = tmp_path / "f.col"
    p.write_bytes(data)
    try:
        _check_graph(read_dimacs(p))
    except GraphError as exc:
        assert str(exc)


VALID = [b"c a small graph", b"p edge 5 4", b"e 1 2", b"e 2 3", b"e 3 4", b"e 4 5"]
tokens = st.one_of(
    st.integers(-(2**40), 2**70).map(lambda i: str(i).encode()),
    st.binary(max_size=4),
    st.sampled_from(
        [
            b"p",
            b"e",
            b"c",
            b"edge",
            b"col",
            b"0",
            b"-1",
            b"1e3",
            b"\xff",
            b"\x00",
            b"6",
            b"2147483648",
            b"99999999999999999999",
        ]
    ),
)


@st.composite
def mutated(draw):
    lines = [ln.split() for ln in VALID]
    for _ in range(draw(st.integers(1, 4))):
        i = draw(st.integers(0, len(lines) - 1))
        op = draw(st.sampled_from(["replace", "drop", "dup", "insert", "truncate"]))
        if op == "replace" and lines[i]:
            lines[i][draw(st.integers(0, len(lines[i]) - 1))] = draw(tokens)
        elif op == "drop":
            del lines[i]
        elif op == "dup":
            lines.insert(i, list(lines[i]))
        elif op == "insert":
            lines.insert(i, draw(st.lists(tokens, max_size=4)))
        elif op == "truncate" and lines[i]:
            lines[i] = lines[i][:-1]
        if not lines:
            lines = [[]]
    return b"\n".join(b" ".join(t for t in ln) for ln in lines) + draw(st.sampled_from([b"\n", b""]))


@FUZZ
@given(data=mutated(), gz=st.booleans())
def test_near_valid_dimacs_files_are_a_graph_or_a_graph_error(tmp_path, data, gz):
    import gzip

    p = tmp_path / ("f.col.gz" if gz else "f.col")
    p.write_bytes(gzip.compress(data) if gz else data)
    try:
        _check_graph(read_dimacs(p))
    except GraphError as exc:
        assert str(exc)


# --- JSONL lines -------------------------------------------------------------------------------------------

json_values = st.recursive(
    st.one_of(
        st.none(),
        st.booleans(),
        st.integers(-(2**64), 2**64),
        st.floats(allow_nan=False, allow_infinity=False),
        st.text(max_size=8),
    ),
    lambda inner: st.one_of(st.lists(inner, max_size=3), st.dictionaries(st.text(max_size=5), inner, max_size=3)),
    max_leaves=8,
)
KEYS = [*FIELDS, "extra"]  # the schema's fields and one it does not know


def _line(obj):
    try:
        return orjson.dumps(obj)
    except TypeError:  # integers beyond 64 bits: write them as text, as a foreign writer might
        return str(obj).encode()


@FUZZ
@given(
    base=st.fixed_dictionaries({"seq": st.integers(0, 10), "ts": st.integers(0, 10**12), "name": st.just("step")}),
    fields=st.dictionaries(st.sampled_from(KEYS), json_values, max_size=6),
)
def test_a_jsonl_line_is_an_event_every_reader_can_use_or_a_schema_error(base, fields):
    line = _line({**base, **fields})
    try:
        ev = parse_line(line)
    except SchemaError as exc:
        assert str(exc)
        return
    assert isinstance(ev["seq"], int) and isinstance(ev["ts"], int) and isinstance(ev["name"], str)
    assert all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in ev["values"].values())
    format_event(ev, 0)  # monitor
    assert len(_flat(ev, list(ev["values"]))) == len(BASE_COLUMNS) + len(ev["values"])  # export
    assert parse_line(dumps_line(compact_event(ev)))["seq"] == ev["seq"]  # export --format jsonl round trip


@FUZZ
@given(line=st.binary(max_size=120))
def test_any_bytes_line_is_an_event_or_a_schema_error(line):
    try:
        parse_line(line)
    except SchemaError as exc:
        assert str(exc)


def test_the_kit_bounds_integers_even_without_an_upper_limit():
    assert Num(0, integer=True).problem(INT64_MAX) is None
    assert "must be" in Num(0, integer=True).problem(INT64_MAX + 1)
    assert "must be" in Num().problem(float("nan"))
    assert tree_problem({"a": [1, {"b": float("inf")}]}) == ("a[1].b", "must be a finite number, got inf")
    with pytest.raises(ValueError, match=r"seed must be >= 0, got -1"):
        Num(0, 10, integer=True).check("seed", -1)
