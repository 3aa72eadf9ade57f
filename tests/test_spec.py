import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from experiments.spec import SpecError, load_spec, parse_override
from experiments.validate import merge_tables
from experiments.workloads import registry


def write(tmp_path, text, name="x.toml"):
    p = tmp_path / name
    p.write_text(text)
    return p


def test_example_specs_validate():
    for path in ("experiments/default.toml", "experiments/latency.toml", "experiments/latency_sampled.toml"):
        spec = load_spec(path, workloads=registry())
        assert spec["workload"]["name"] in ("latency", "coloring")
        assert spec["telemetry"]["batch_size"] >= 1  # defaults filled in


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ('name = "a"\ncolour = 3\n', r"x\.toml: colour: unknown key"),
        ('name = "a"\n[telemetry]\nbatch_sise = 3\n', r"x\.toml: telemetry\.batch_sise: unknown key"),
        ('name = "a"\ntime_budget_s = "long"\n', r"x\.toml: time_budget_s: must be a finite number in \[0\.001, "),
        ('name = "a"\n[telemetry]\noverflow = "explode"\n', r"telemetry\.overflow: must be one of block, drop"),
        ('name = "a"\n[telemetry]\nbatch_size = 0\n', r"telemetry\.batch_size: must be >= 1"),
        ('name = "../up"\n', r"name: .*may only use"),
        ('name = "Hypertune"\n', r"x\.toml: name: experiment id 'Hypertune' is reserved"),
        (
            'name = "a"\n[sampling]\nstrategy = "uniform"\nconfig = { rate = 2 }\n',
            r"x\.toml: sampling\.config\.rate must",
        ),
        ('name = "a"\n[sampling.config]\nseed = 1.5\n', r"x\.toml: sampling\.config\.seed must be an integer"),
        ('name = "a"\n[anomaly]\nmethods = ["astrology"]\n', r"x\.toml: anomaly\.methods: unknown method"),
        ('name = "a"\n[workload]\nname = "nope"\n', r"workload\.name: unknown workload 'nope'; available: .*latency"),
        ('name = "a"\n[workload.params]\ncalls = -1\n', r"workload\.params: calls must be"),
        ('name = "a"\n[workload.params]\ntarget = "no.such.module:f"\n', r"cannot import"),
    ],
)
def test_bad_specs_name_file_and_key(tmp_path, text, match):
    with pytest.raises(SpecError, match=match):
        load_spec(write(tmp_path, text), workloads=registry())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("sampling.config.seed=1.5", r"x\.toml \(with --set\): sampling\.config\.seed must be an integer"),
        ('anomaly.methods=["astrology"]', r"x\.toml \(with --set\): anomaly\.methods: unknown method"),
        ("workload.params.calls=-1", r"x\.toml \(with --set\): workload\.params: calls must be"),
    ],
)
def test_a_bad_override_is_named_as_one(tmp_path, override, match):
    with pytest.raises(SpecError, match=match):
        load_spec(write(tmp_path, 'name = "a"\n'), [override], workloads=registry())


def test_toml_syntax_error_has_file_and_line(tmp_path):
    with pytest.raises(SpecError, match=r"x\.toml: not valid TOML: .*line 3"):
        load_spec(write(tmp_path, 'name = "a"\n\nseed = = 4\n'))


def test_overrides_are_typed_and_validated(tmp_path):
    p = write(tmp_path, 'name = "a"\n')
    spec = load_spec(
        p,
        [
            "time_budget_s=2.5",
            "telemetry.overflow=drop",
            "workload.params.calls=10",
            "tags=['x', 'y']",
            "hypothesis=faster is better",
        ],
        workloads=registry(),
    )
    assert spec["time_budget_s"] == 2.5 and spec["telemetry"]["overflow"] == "drop"
    assert spec["workload"]["params"]["calls"] == 10 and spec["tags"] == ["x", "y"]
    assert spec["hypothesis"] == "faster is better"
    with pytest.raises(SpecError, match=r"telemetry\.batch_size: must be >= 1"):
        load_spec(p, ["telemetry.batch_size=0"])
    with pytest.raises(SpecError, match="unknown key"):
        load_spec(p, ["telemetry.nope=1"])
    with pytest.raises(SpecError, match="expected key=value"):
        parse_override("justakey")


def test_missing_file(tmp_path):
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path / "absent.toml")


# --- every number is finite and in its documented range -----------------------------------------------


def _number_keys(schema=None, prefix=""):
    """Every key of the schema whose rule is a numeric range of the validation kit."""
    from experiments.spec import SCHEMA
    from experiments.validate import Num

    schema = SCHEMA if schema is None else schema
    out = []
    for k, rule in schema.items():
        if isinstance(rule, dict):
            out += _number_keys(rule, f"{prefix}{k}.")
        elif isinstance(getattr(rule, "__self__", None), Num):
            out.append(f"{prefix}{k}")
    return out


def test_the_number_keys_are_found():
    keys = _number_keys()
    assert {
        "seed",
        "time_budget_s",
        "telemetry.flush_interval_s",
        "metrics.compression",
        "anomaly.window",
        "hypertune.window_s",
        "supervision.max_restarts",
    } <= set(keys)


@pytest.mark.parametrize("key", _number_keys())
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "9223372036854775808", "99999999999999999999", "-1e308"])
def test_no_number_key_takes_nan_infinity_or_an_overflow(tmp_path, key, value):
    p = write(tmp_path, 'name = "a"\n')
    with pytest.raises(SpecError, match=re.escape(key) + ": must "):
        load_spec(p, [f"{key}={value}"], workloads=registry())


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("metadata.x=nan", r"metadata\.x: must be a finite number, got nan"),
        ("metadata.deep={a=[1, inf]}", r"metadata\.deep\.a\[1\]: must be a finite number, got inf"),
        ("metadata.big=18446744073709551616", r"metadata\.big: must fit in 64 bits"),
        ("sampling.config={rate=nan}", r"sampling\.config\.rate: must be a finite number"),
        ("anomaly.threshold=nan", r"anomaly\.threshold: must be a number in \(0, 1e\+06\] or a table"),
        ("anomaly.threshold={z_score=inf}", r"anomaly\.threshold: z_score: must be a number in \(0, 1e\+06\]"),
        ('anomaly.threshold={z_score="auto"}', r"anomaly\.threshold: z_score: must be a number"),
        ("anomaly.threshold={zscore=3}", r"anomaly\.threshold: threshold given for unknown method 'zscore'"),
        ("anomaly.threshold={isolation_forest=0.7}", r"isolation_forest: the contamination must be \"auto\" or in"),
        ("metrics.windows_s=[60, nan]", r"metrics\.windows_s: must be a list of 1 to 32 window lengths"),
        ("workload.params.args=[nan]", r"workload\.params\.args\[0\]: must be a finite number"),
        ("workload.params.calls_per_step=1000000000", r"workload\.params: calls_per_step must be <= 100_000"),
        ("workload.params.timeout_s=0", r"workload\.params: timeout_s must be >= 0\.001"),
        ("workload.params.calls=-3", r"workload\.params: calls must be >= 0"),
    ],
)
def test_numbers_inside_free_tables_and_workload_params(tmp_path, override, match):
    with pytest.raises(SpecError, match=match):
        load_spec(write(tmp_path, 'name = "a"\n'), [override], workloads=registry())


def test_the_same_numbers_are_refused_in_the_file_itself(tmp_path):
    with pytest.raises(
        SpecError,
        match=r"x\.toml: time_budget_s: must be a finite number in \[0\.001, 31_536_000\], "
        r"got nan",
    ):
        load_spec(write(tmp_path, 'name = "a"\ntime_budget_s = nan\n'))
    with pytest.raises(SpecError, match=r"x\.toml: metadata\.n: must be a finite number, got -inf"):
        load_spec(write(tmp_path, 'name = "a"\n[metadata]\nn = -inf\n'))


def test_unreadable_spec_files(tmp_path):
    p = tmp_path / "x.toml"
    p.write_bytes(b'name = "\xff"\n')
    with pytest.raises(SpecError, match=r"x\.toml: the spec is not UTF-8 text \(byte 0xff at offset 8\)"):
        load_spec(p)
    p.write_bytes(b"# " + b"x" * (1 << 20) + b"\n")
    with pytest.raises(SpecError, match="larger than 1,048,576 bytes"):
        load_spec(p)
    with pytest.raises(SpecError, match="cannot read the spec"):
        load_spec(tmp_path)


def test_init_table_check():
    from experiments.coloring.graph import gnp
    from experiments.coloring.init import check_init, multistart

    assert check_init({"strategy": "multistart", "tries": 8}) == {"strategy": "multistart", "tries": 8}
    for bad, match in (
        ({"tries": 0}, "init.tries must be >= 1"),
        ({"tries": 10**12}, "init.tries must be <="),
        ({"tries": float("nan")}, "init.tries must be an integer"),
        ({"strategy": "psychic"}, "init.strategy must be one of"),
        ({"x": 1}, "unknown init key"),
        ("dsatur", "init must be a table"),
    ):
        with pytest.raises(ValueError, match=match):
            check_init(bad)
    with pytest.raises(ValueError, match=r"init\.tries"):
        multistart(gnp(10, 0.5), tries=-1)


def test_every_ranged_key_is_documented():
    from pathlib import Path

    doc = (Path(__file__).resolve().parents[1] / "docs" / "experiments.md").read_text()
    missing = [k for k in _number_keys() if f"`{k}`" not in doc]
    assert missing == []


_leaf = st.integers(-5, 5) | st.text(max_size=3)
_tables = st.recursive(
    st.dictionaries(st.sampled_from("abcd"), _leaf, max_size=3),
    lambda inner: st.dictionaries(st.sampled_from("abcd"), inner | _leaf, max_size=3),
    max_leaves=12,
)


@given(_tables, _tables)
def test_merged_tables_take_every_value_of_the_override_and_share_nothing(base, over):

    out = merge_tables(base, over)

    def check(out, base, over):
        for k in set(base) | set(over):
            if k not in over:
                assert out[k] == base[k] and (not isinstance(out[k], dict) or out[k] is not base[k])
            elif isinstance(over[k], dict) and isinstance(base.get(k), dict):
                check(out[k], base[k], over[k])
            else:
                assert out[k] == over[k] and (not isinstance(out[k], dict) or out[k] is not over[k])

    check(out, base, over)
    assert set(out) == set(base) | set(over)


def test_a_strict_merge_names_the_unknown_key_and_where_it_is():

    with pytest.raises(ValueError, match=r"unknown parameter tabu\.'tenur'; known: tenure"):
        merge_tables({"tabu": {"tenure": 1}}, {"tabu": {"tenur": 2}}, strict=True, what="parameter")
    with pytest.raises(ValueError, match=r"tabu must be a table"):
        merge_tables({"tabu": {"tenure": 1}}, {"tabu": 3}, strict=True)


# --- how deep a spec may nest --------------------------------------------------------------------------


def _arrays(n):
    return "[" * n + "]" * n


def _inline_tables(n):
    return "{a = " * n + "1" + "}" * n


@pytest.mark.parametrize(
    ("text", "where"),
    [
        (f'name = "a"\n[metadata]\nx = {_arrays(300)}\n', r"metadata\.x\[0\]\[0\]\.\.\.: "),
        (f'name = "a"\n[workload.params]\nx = {_inline_tables(300)}\n', r"workload\.params\.x\.a\.\.\.: "),
        (f"a = {_arrays(300)}\n", r"a\[0\]\[0\]\[0\]\.\.\.: "),
        (f'name = "a"\n[metadata.{".".join(["t"] * 60)}]\nx = {_arrays(50)}\n', r"metadata\.t\.t\.t\.\.\.: "),
        (f'name = "a"\n[metadata]\nx = {_arrays(2000)}\n', ""),  # deeper than the TOML reader can recurse
        (f'name = "a"\n[metadata]\nx = {_inline_tables(2000)}\n', ""),
    ],
)
def test_a_spec_nested_too_deep_is_refused_naming_the_file(tmp_path, text, where):
    with pytest.raises(SpecError, match=rf"^{re.escape(str(tmp_path / 'x.toml'))}: {where}tables and arrays nested "):
        load_spec(write(tmp_path, text), workloads=registry())


def test_the_nesting_limit_is_100_levels_the_document_being_level_0(tmp_path):
    spec = load_spec(write(tmp_path, f'name = "a"\n[metadata]\nx = {_arrays(99)}\n'))  # metadata is level 1
    x, depth = spec["metadata"]["x"], 2
    while x:
        x, depth = x[0], depth + 1
    assert depth == 100
    with pytest.raises(SpecError, match="more than 100 levels deep"):
        load_spec(write(tmp_path, f'name = "a"\n[metadata]\nx = {_arrays(100)}\n'))


def test_a_spec_given_as_a_dict_is_checked_before_it_is_copied(tmp_path):
    deep: dict = {"a": 1}
    for _ in range(5000):  # far past what copy.deepcopy can recurse over
        deep = {"a": deep}
    with pytest.raises(SpecError, match=r"^submitted spec: metadata\.a\.a\.a\.\.\.: tables and arrays nested"):
        load_spec({"name": "a", "metadata": deep}, source="submitted spec")
    looped: list = []
    looped.append(looped)
    with pytest.raises(SpecError, match="nested more than 100"):
        load_spec({"name": "a", "metadata": {"x": looped}})


@pytest.mark.parametrize(
    "item",
    [
        f"metadata.x={_arrays(150)}",
        f"metadata.x={_arrays(3000)}",
        f"metadata.x={_inline_tables(3000)}",
        ".".join(["metadata"] + ["t"] * 101) + "=1",
    ],
)
def test_an_override_nested_too_deep_is_refused(tmp_path, item):
    with pytest.raises(SpecError, match=r"^--set metadata\.[tx].*: tables and arrays nested more than 100 levels deep"):
        parse_override(item)
    with pytest.raises(SpecError, match="nested more than 100 levels deep"):
        load_spec(write(tmp_path, 'name = "a"\n'), [item])
    assert parse_override(f"metadata.x={_arrays(98)}")[1]  # metadata, x, then 98 arrays: level 99


def test_an_integer_too_long_to_read_is_a_spec_error(tmp_path):
    with pytest.raises(SpecError, match=r"x\.toml: a number too long to read"):
        load_spec(write(tmp_path, f'name = "a"\nseed = {"9" * 5000}\n'))
    with pytest.raises(SpecError, match=r"^--set seed: a number too long to read"):
        parse_override(f"seed={'9' * 5000}")


def _depth(v):
    """How deep ``v`` nests, by recursion: the reference for the iterative check."""
    if isinstance(v, dict):
        return 1 + max(map(_depth, v.values()), default=0)
    if isinstance(v, list):
        return 1 + max(map(_depth, v), default=0)
    return 0


_nested = st.recursive(
    st.integers(0, 3) | st.text(max_size=2),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.sampled_from("abc"), inner, max_size=3),
    max_leaves=30,
)


@given(_nested, st.integers(0, 8))
def test_nesting_problem_agrees_with_a_recursive_depth(data, limit):
    from experiments.spec import nesting_problem

    # containers at levels 0 .. depth-1: the check refuses one below the limit
    assert (nesting_problem(data, limit) is None) == (_depth(data) - 1 <= limit)


@pytest.mark.parametrize(
    ("text", "line"),
    [
        ("metadata." + "a." * 30_000 + "a = 1\n", 1),  # 60 KB: the TOML reader alone would take 5 GB
        ('name = "a"\n\n[metadata.' + "a." * 100_000 + "a]\nx = 1\n", 3),
        ('name = "a"\n[metadata]\nx = {' + "b." * 150 + "c = 1}\n", 3),
        ('name = "a"\n' + '"q".' * 120 + "z = 1\n", 2),
        ('name = "a"\n' + "1." * 120 + "z = 1\n", 2),
    ],
)
def test_a_long_dotted_key_is_refused_before_the_toml_reader_sees_it(tmp_path, text, line):
    path = write(tmp_path, text)
    with pytest.raises(SpecError, match=rf"^{re.escape(str(path))}:{line}: a dotted key of more than 100 parts"):
        load_spec(path, workloads=registry())


def test_dots_in_values_strings_and_comments_are_not_keys(tmp_path):
    floats = ", ".join(["1.5"] * 500)
    dots = "." * 400
    text = (
        f'name = "a"\n[metadata]\nb = [{floats}]\nc = "{"." * 5000}"\nd = """\n{dots}\n"""\n'
        f'# {dots}\n"q.q"."r.r" = 1\ne.f.g = 2\nt = 1979-05-27T07:32:00.999\n'
        f"u = '''{dots}'''\nv = '{dots}'\n"
    )
    meta = load_spec(write(tmp_path, text), workloads=registry())["metadata"]
    assert len(meta["b"]) == 500 and meta["c"] == "." * 5000 and meta["q.q"] == {"r.r": 1}
    assert meta["e"] == {"f": {"g": 2}} and meta["u"] == dots and meta["v"] == dots
    ok = ".".join(["metadata"] + ["t"] * 98)  # 99 parts: deep, but within the bound
    assert load_spec(write(tmp_path, f'name = "a"\n[{ok}]\nx = 1\n'), workloads=registry())["metadata"]


def test_a_byte_order_mark_is_not_part_of_the_spec(tmp_path):
    path = tmp_path / "bom.toml"
    path.write_bytes(b"\xef\xbb\xbfname = 'bom'\n")
    assert load_spec(path, workloads=registry())["name"] == "bom"


def test_a_gpu_count_above_one_must_be_whole_whichever_backend_reads_it():
    """Ray shares one GPU in fractions, never several: 1.5 GPUs is refused with the spec (a
    spec checked, or run on the embedded backend, used to pass it until the ray backend)."""
    base = {"name": "g", "workload": {"name": "latency"}}
    for ok in (0, 0.25, 1, 2, 64):
        assert load_spec({**base, "resources": {"gpus": ok}})["resources"]["gpus"] == ok
    with pytest.raises(SpecError, match=r"resources\.gpus: a share of a GPU must be below 1, or whole GPUs; got 1\.5"):
        load_spec({**base, "resources": {"gpus": 1.5}})
    with pytest.raises(SpecError, match=r"resources\.gpus: a share of a GPU .* got 2\.5"):
        load_spec(base, ["resources.gpus=2.5"])


@pytest.mark.parametrize("raw, shown", [("true", "True"), ("nan", "nan"), ("2024-01-01", "2024-01-01"), ("[1]", "[1]")])
def test_free_text_that_reads_as_another_toml_value_is_refused_with_the_quotes_it_needs(raw, shown):
    base = {"name": "t", "workload": {"name": "latency"}}
    with pytest.raises(SpecError) as e:
        load_spec(base, [f"hypothesis={raw}"])
    assert f"hypothesis: must be str, got {shown} (text that reads as another TOML value needs quotes" in str(e.value)
    assert load_spec(base, [f'hypothesis="{raw}"'])["hypothesis"] == raw  # quoted: the text as written


@pytest.mark.parametrize("key", ['metadata."a.b"', "metadata.'x y'", '"seed"', "metadata.café", "metadata.a b"])
def test_a_key_that_is_not_bare_is_refused_not_split_on_its_dots(key):
    """``--set`` and ``crucible set`` take bare keys: a quoted one was split on its dots, its
    quotes kept in the names written to the spec (``[metadata."\\"a"]``)."""
    with pytest.raises(SpecError, match=r"is not a bare key \(letters, digits, _ and -\)"):
        parse_override(f"{key}=1")
    assert parse_override("metadata.run-tag_2=1") == (["metadata", "run-tag_2"], 1)


def test_a_list_of_names_holds_no_empty_name(tmp_path):
    base = {"name": "t", "workload": {"name": "latency"}}
    for key in ("tags", "telemetry.maximize", "anomaly.metrics"):
        with pytest.raises(SpecError, match=rf"{re.escape(key)}: must be a list of non-empty strings"):
            load_spec(base, [f"{key}=['ok', ' ']"])


def test_get_of_an_empty_key_says_what_to_give(tmp_path):
    from experiments.specedit import get_value

    spec = tmp_path / "s.toml"
    spec.write_text('name = "t"\n[workload]\nname = "latency"\n')
    for key in ("", "a..b", "."):
        with pytest.raises(SpecError, match=r"bad key .*: give a dotted key"):
            get_value(spec, key)
    assert get_value(spec, "name") == "t"
