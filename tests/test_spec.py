import pytest

from experiments.spec import SpecError, load_spec, parse_override
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


@pytest.mark.parametrize(("text", "match"), [
    ('name = "a"\ncolour = 3\n', r"x\.toml: colour: unknown key"),
    ('name = "a"\n[telemetry]\nbatch_sise = 3\n', r"x\.toml: telemetry\.batch_sise: unknown key"),
    ('name = "a"\ntime_budget_s = "long"\n', r"x\.toml: time_budget_s: must be a finite number in \[0\.001, "),
    ('name = "a"\n[telemetry]\noverflow = "explode"\n', r"telemetry\.overflow: must be one of block, drop"),
    ('name = "a"\n[telemetry]\nbatch_size = 0\n', r"telemetry\.batch_size: must be >= 1"),
    ('name = "../up"\n', r"name: .*may only use"),
    ('name = "a"\n[sampling]\nstrategy = "uniform"\nconfig = { rate = 2 }\n', r"sampling: .*rate"),
    ('name = "a"\n[anomaly]\nmethods = ["astrology"]\n', r"anomaly: unknown anomaly method"),
    ('name = "a"\n[workload]\nname = "nope"\n', r"workload\.name: unknown workload 'nope'; available: .*latency"),
    ('name = "a"\n[workload.params]\ncalls = -1\n', r"workload\.params: calls must be"),
    ('name = "a"\n[workload.params]\ntarget = "no.such.module:f"\n', r"cannot import"),
])
def test_bad_specs_name_file_and_key(tmp_path, text, match):
    with pytest.raises(SpecError, match=match):
        load_spec(write(tmp_path, text), workloads=registry())


def test_toml_syntax_error_has_file_and_line(tmp_path):
    with pytest.raises(SpecError, match=r"x\.toml: not valid TOML: .*line 3"):
        load_spec(write(tmp_path, 'name = "a"\n\nseed = = 4\n'))


def test_overrides_are_typed_and_validated(tmp_path):
    p = write(tmp_path, 'name = "a"\n')
    spec = load_spec(p, ["time_budget_s=2.5", "telemetry.overflow=drop", "workload.params.calls=10",
                         "tags=['x', 'y']", "hypothesis=faster is better"], workloads=registry())
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
