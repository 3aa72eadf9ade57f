"""A submission with an idempotency key is taken once: a retry after a lost answer, a script run
again, two copies sent at once, or a restart of the daemon in between all get the first
submission's entry, never a second experiment; the same key with another submission is refused."""

from __future__ import annotations

import threading

import httpx
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import dashboard.client as client_mod
import experiments.service as service_mod
from cli import main
from dashboard.client import IDEMPOTENCY_HEADER, LabClient, LabClientError
from experiments.service import KeyReused, LabService
from experiments.spec import SpecError
from telemetry.rundir import QUEUE_FILE
from tests import test_daemon
from tests.fault_helpers import latency_spec
from tests.test_daemon import statuses

daemon = test_daemon.daemon  # the same module fixture: a lab daemon of this module's own


def ids(service: LabService) -> list[str]:
    return sorted(e["id"] for e in service.list(history=False))


def test_a_repeated_key_gets_the_first_entry_and_queues_nothing(tmp_path):
    art = tmp_path / "art"
    service = LabService(art, max_running=1)
    try:
        first = service.submit(latency_spec("x", budget=600), key="job-1")
        assert first["id"] == "x" and first["status"] == "running" and "repeated" not in first
        again = service.submit(latency_spec("x", budget=600), key="job-1")
        assert again == {**service.submit(latency_spec("x", budget=600), key="job-1"), "repeated": True}
        assert again["id"] == "x" and again["repeated"] is True
        queued = service.submit(latency_spec("x", budget=600), key="job-2")  # another key: another experiment
        assert queued["id"] == "x-2" and queued["status"] == "queued"
        assert service.submit(latency_spec("x", budget=600), key="job-2") == {**queued, "repeated": True}
        with pytest.raises(KeyReused, match=r"'job-1' came before with another submission.*'x'"):
            service.submit(latency_spec("x", budget=600), ["seed=9"], key="job-1")
        with pytest.raises(KeyReused):
            service.submit(latency_spec("x", budget=600), experiment_id="y", key="job-1")
        assert ids(service) == ["x", "x-2"]
        for bad in ("", "a b", "clé", "k" * 201, 5):
            with pytest.raises(SpecError, match="idempotency key"):
                service.submit(latency_spec("x", budget=600), key=bad)  # type: ignore[arg-type]
        huge = 'name = "x"\n[workload.params]\ntarget = "math:sqrt"\nargs = [1000000000000000000000000000000]\n'
        with pytest.raises(SpecError, match=r"workload\.params\.args\[0\]: must fit in 64 bits"):
            service.submit(huge, key="job-9")  # checked before the key's digest, which could not hold it
        assert ids(service) == ["x", "x-2"]
    finally:
        service.shutdown()
    keys = orjson.loads((art / QUEUE_FILE).read_bytes())["keys"]
    assert {k: v["id"] for k, v in keys.items()} == {"job-1": "x", "job-2": "x-2"}

    again = LabService(art, max_running=1)  # a restart between the submission and its retry
    try:
        repeat = again.submit(latency_spec("x", budget=600), key="job-1")
        assert (repeat["id"], repeat["status"], repeat["repeated"]) == ("x", "stopped", True)  # from its folder
        assert again.submit(latency_spec("x", budget=600), key="job-2")["id"] == "x-2"  # still queued
        assert again.submit(latency_spec("x", budget=600), key="job-3")["id"] == "x-3"
    finally:
        again.shutdown()


def test_a_retry_is_answered_before_it_is_validated_again(tmp_path):
    """The first try was admitted; what the retry would now be refused for (its data file
    removed, a daemon restarted without the data folder) must not turn its answer into a 400."""
    data = tmp_path / "graphs"
    data.mkdir()
    graph = data / "tiny.col"
    graph.write_text("p edge 3 2\ne 1 2\ne 2 3\n")
    spec = test_daemon._colour_spec("tiny", str(graph))
    art = tmp_path / "art"
    service = LabService(art, max_running=1, data_dirs=[data])
    try:
        first = service.submit(spec, key="k-1")
        graph.unlink()
        again = service.submit(spec, key="k-1")
        assert (again["id"], again["repeated"]) == (first["id"], True)
        with pytest.raises(SpecError):  # a new submission of it is checked, and refused
            service.submit(spec, key="k-2")
        with pytest.raises(KeyReused):  # another submission under the key is still refused first
            service.submit(spec, ["seed=3"], key="k-1")
    finally:
        service.shutdown()
    restarted = LabService(art, max_running=1)  # no data folder any more
    try:
        assert restarted.submit(spec, key="k-1")["id"] == first["id"]
        assert restarted.list(history=False) == []  # nothing queued or started by the retry
        assert not (art / "tiny-2").exists()
    finally:
        restarted.shutdown()


def test_the_same_key_sent_at_once_from_many_threads_makes_one_experiment(tmp_path):
    service = LabService(tmp_path / "art", max_running=1)
    answers: list[dict] = []
    go = threading.Event()

    def send() -> None:
        go.wait(10)
        answers.append(service.submit(latency_spec("par", budget=600), key="once"))

    threads = [threading.Thread(target=send) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        go.set()
        for t in threads:
            t.join(60)
        assert len(answers) == 8 and {a["id"] for a in answers} == {"par"}
        assert sum(1 for a in answers if not a.get("repeated")) == 1
        assert ids(service) == ["par"]
    finally:
        service.shutdown()


def test_only_the_newest_keys_are_kept(tmp_path, monkeypatch):
    monkeypatch.setattr(service_mod, "KEYS_KEPT", 3)
    art = tmp_path / "art"
    service = LabService(art, max_running=1)
    try:
        hog = service.submit(latency_spec("hog", budget=600))["id"]
        for i in range(5):
            service.stop(service.submit(latency_spec("q", budget=600), key=f"k{i}")["id"])  # cancelled at once
        keys = orjson.loads((art / QUEUE_FILE).read_bytes())["keys"]
        assert list(keys) == ["k2", "k3", "k4"]
        assert service.submit(latency_spec("q", budget=600), key="k0")["id"] == "q-6"  # forgotten: a new one
        service.stop(hog)
    finally:
        service.shutdown()


SUBMISSIONS = st.lists(st.tuples(st.sampled_from([None, "a", "b", "c"]), st.integers(0, 1)), min_size=1, max_size=8)


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(SUBMISSIONS)
def test_keyed_submissions_follow_the_model(tmp_path_factory, submissions):
    """Against a model: a key seen with the same submission repeats its entry; seen with another,
    it is refused; a new key, or none, makes a new experiment."""
    service = LabService(tmp_path_factory.mktemp("art"), max_running=1)
    seen: dict[str, tuple[int, str]] = {}
    made = 0
    try:
        for key, variant in submissions:
            spec = latency_spec("m", budget=600)
            sets = [f"seed={variant}"]
            if key is not None and key in seen and seen[key][0] != variant:
                with pytest.raises(KeyReused):
                    service.submit(spec, sets, key=key)
                continue
            entry = service.submit(spec, sets, key=key)
            if key is not None and key in seen:
                assert entry["repeated"] is True and entry["id"] == seen[key][1]
                continue
            made += 1
            assert "repeated" not in entry
            if key is not None:
                seen[key] = (variant, entry["id"])
        assert len(ids(service)) == made
    finally:
        service.shutdown()


# --- over HTTP, against a real daemon ---------------------------------------------------------------------


class LoseAnswers(httpx.BaseTransport):
    """A network that delivers the submissions and loses the daemon's first ``n`` answers."""

    def __init__(self, n: int) -> None:
        self.inner = httpx.HTTPTransport()
        self.n = n
        self.lost = 0

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        resp = self.inner.handle_request(request)
        if request.method == "POST" and self.lost < self.n:
            resp.read()
            resp.close()
            self.lost += 1
            raise httpx.ReadError("connection reset by peer", request=request)
        return resp


def test_the_client_retries_a_lost_answer_and_the_daemon_starts_one_experiment(daemon, monkeypatch):
    lossy = LoseAnswers(1)
    entry = LabClient(daemon.url, daemon.token, transport=lossy).submit(latency_spec("lost", budget=600))
    assert lossy.lost == 1 and entry["id"] == "lost" and entry["repeated"] is True
    # every answer lost for longer than the client's patience (3 s here): an error after the last
    # try that says the daemon may have it, with the key that makes submitting again safe
    monkeypatch.setattr(client_mod, "SUBMIT_PATIENCE_S", 3.0)
    hopeless = LoseAnswers(10_000)
    with pytest.raises(LabClientError, match="cannot reach the lab daemon") as e:
        LabClient(daemon.url, daemon.token, transport=hopeless).submit(latency_spec("gone", budget=600), key="k-gone")
    assert hopeless.lost == 3 and e.value.maybe_delivered
    assert "may have taken the submission" in str(e.value) and "--key k-gone" in str(e.value)
    assert sorted(i for i in statuses(daemon.client()) if i.startswith(("lost", "gone"))) == ["gone", "lost"]
    daemon.client().stop("lost")
    daemon.client().stop("gone")


def test_the_key_over_http_repeats_answers_and_refuses_reuse(daemon):
    http = httpx.Client(base_url=daemon.url, headers={"Authorization": f"Bearer {daemon.token}"}, timeout=30)
    body = {"spec": latency_spec("h", budget=600)}
    first = http.post("api/experiments", json=body, headers={IDEMPOTENCY_HEADER: "h-1"})
    second = http.post("api/experiments", json=body, headers={IDEMPOTENCY_HEADER: "h-1"})
    assert (first.status_code, second.status_code) == (201, 200)
    assert second.json() == {**first.json(), "status": second.json()["status"], "repeated": True}
    toml = 'name = "h"\ntime_budget_s = 600\n[workload]\nname = "latency"\n'
    other = http.post(
        "api/experiments", content=toml, headers={"content-type": "application/toml", IDEMPOTENCY_HEADER: "h-1"}
    )
    assert other.status_code == 422 and "came before with another submission" in other.json()["error"]
    bad = http.post("api/experiments", json=body, headers={IDEMPOTENCY_HEADER: "x" * 300})
    assert bad.status_code == 400 and "idempotency key" in bad.json()["error"]
    assert [i for i in statuses(daemon.client()) if i.startswith("h")] == ["h"]
    daemon.client().stop("h")


def test_submit_with_a_key_twice_through_the_cli(daemon, tmp_path, capsys, monkeypatch):
    spec = tmp_path / "k.toml"
    spec.write_text('name = "kc"\ntime_budget_s = 600\n[workload]\nname = "latency"\n')
    monkeypatch.setenv("CRUCIBLE_TOKEN", daemon.token)
    argv = ["submit", str(spec), "--key", "nightly-7", "--to", daemon.url]
    assert main(argv) == 0
    first = orjson.loads(capsys.readouterr().out)
    assert main(argv) == 0
    out, err = capsys.readouterr()
    assert orjson.loads(out)["id"] == first["id"] == "kc" and "already submitted with this --key, as kc" in err
    with pytest.raises(SystemExit) as exit_:
        main(["submit", str(spec), "--key", "a b", "--to", daemon.url])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "idempotency key" in err and "Traceback" not in err
    with pytest.raises(LabClientError, match=r"422: .*came before"):
        daemon.client().submit(spec, ["seed=3"], key="nightly-7")
    daemon.client().stop("kc")


def test_a_submission_whose_answers_are_lost_goes_on_trying_while_the_daemon_may_restart(daemon, monkeypatch):
    """Past the usual three tries, a submission that may have reached the daemon keeps trying
    for up to SUBMIT_PATIENCE_S (a daemon killed there takes seconds to come back); one to an
    address where nothing listens fails after the usual tries, saying nothing was sent."""
    import socket

    monkeypatch.setattr(client_mod, "RETRY_DELAY_S", 0.02)
    lossy = LoseAnswers(6)
    entry = LabClient(daemon.url, daemon.token, transport=lossy).submit(latency_spec("patient", budget=600))
    assert lossy.lost == 6 and entry["id"] == "patient" and entry["repeated"] is True
    daemon.client().stop("patient")
    with socket.socket() as s:  # a port that was free a moment ago: refused, never sent
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(LabClientError, match="cannot reach the lab daemon") as e:
        LabClient(f"http://127.0.0.1:{port}/", daemon.token).submit(latency_spec("nowhere", budget=600))
    assert not e.value.maybe_delivered and "may have taken" not in str(e.value)
