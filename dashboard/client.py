"""A Python client of a lab daemon's HTTP API (``crucible lab serve``), over httpx.

``LabClient(url)`` takes its token as given, else from ``token_file`` (or
``<artifacts>/dashboard.token`` when ``artifacts`` is given), else from ``CRUCIBLE_TOKEN``.
Every call raises :class:`LabClientError` with the server's own message on a 4xx/5xx answer,
and says so when the daemon cannot be reached. See docs/daemon.md.
"""

from __future__ import annotations

import os
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import orjson

from actors.log import get_logger
from experiments.validate import IDEMPOTENCY_HEADER, brief, check_key, tree_problem
from telemetry.rundir import TOKEN_FILE

log = get_logger("dashboard.client")

TOKEN_ENV = "CRUCIBLE_TOKEN"
SUBMIT_RETRIES = 2  # after a lost answer: three tries in all, 0.5 s then 1 s apart
RETRY_DELAY_S = 0.5
SUBMIT_PATIENCE_S = 30.0
"""How long a submission goes on trying once a try may have reached the daemon (sent, its answer
lost): a daemon that died there is likely restarting (recovery and binding take seconds), and
only an answer says whether it took the submission. A daemon refusing connections from the
first try is simply not there: that fails after :data:`SUBMIT_RETRIES`."""
# a lost answer is retried; errors that a second try cannot mend (a malformed URL or request) are not
RETRIED = (httpx.NetworkError, httpx.TimeoutException, httpx.RemoteProtocolError)


class LabClientError(RuntimeError):
    """The daemon refused a request (``status`` is its HTTP status) or could not be reached (``status`` None)."""

    maybe_delivered = False
    """Unreachable after a try that may have reached the daemon (its answer lost): a submission
    may have been taken. Its key says: submitting again with it is safe."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


def find_token(
    token: str | None = None, artifacts: str | Path | None = None, token_file: str | Path | None = None
) -> str:
    """The token to present: ``token``, else the token file given (``token_file``, or the one in
    ``artifacts``), else ``CRUCIBLE_TOKEN``. What the caller names wins over the environment: a
    variable left exported for another daemon must not shadow the file asked for.

    Raises:
        LabClientError: none of them gives one.
    """
    if token:
        return token
    if token_file is not None and not str(token_file).strip():  # Path("") is the current folder
        raise LabClientError(
            f"the token file's path (--token-file) is empty: give the daemon's <artifacts>/{TOKEN_FILE}"
        )
    path = Path(token_file) if token_file is not None else Path(artifacts) / TOKEN_FILE if artifacts else None
    env = os.environ.get(TOKEN_ENV, "").strip()
    if path is None and env:
        return env
    if path is None:
        raise LabClientError(f"no token: set {TOKEN_ENV} or give the daemon's token file (<artifacts>/{TOKEN_FILE})")
    try:
        text = path.read_text().strip()
    except OSError as exc:
        raise LabClientError(f"cannot read the token file {str(path)!r}: {exc.strerror or exc}") from None
    if not text:
        raise LabClientError(f"the token file {str(path)!r} is empty")
    return text


def check_token(token: str) -> str:
    """A token as the daemon writes them (URL-safe ASCII), so a pasted stray character is an
    error here rather than an encoding failure inside the HTTP client."""
    if not token.isascii() or not token.isprintable() or " " in token:
        raise LabClientError("the token has characters a lab daemon's token never has (it is URL-safe ASCII)")
    return token


def base_url(url: str) -> str:
    """The daemon's base URL, ``http(s)://HOST:PORT/``, from what the user gave.

    Raises:
        LabClientError: not such a URL; a query (the printed dashboard URL, with its token) is
            refused with what to give instead.
    """
    try:
        u = httpx.URL(url)
        _ = u.port  # a malformed port raises here
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise LabClientError(f"the lab daemon's URL {url!r} is not a URL: {exc}") from None
    if u.scheme not in ("http", "https") or not u.host or not 0 < (u.port or 80) < 65536:
        raise LabClientError(f"the lab daemon's URL {url!r} must be http://HOST:PORT (crucible lab serve prints it)")
    if u.userinfo:  # httpx would send it as Basic auth in place of the token: a 401 that blames the token
        raise LabClientError(
            f"the lab daemon's URL has a user name or password: give http://HOST:PORT/; "
            f"the token goes in {TOKEN_ENV} or --token-file"
        )
    if u.query or u.fragment:
        raise LabClientError(
            f"the lab daemon's URL {url!r} has a query or fragment: give its base URL, "
            f"{u.scheme}://{u.netloc.decode()}/; the token goes in {TOKEN_ENV} or --token-file"
        )
    segments = [seg for seg in u.path.split("/") if seg]
    api = next((k for k, seg in enumerate(segments) if seg == "api" and _api_path(segments[k + 1 :])), None)
    if api is not None:  # the API's own path: every request would go to .../api/api/... and get a bare 404
        base = "/".join(segments[:api])
        raise LabClientError(
            f"the lab daemon's URL {url!r} names its API path: give its base URL, "
            f"{u.scheme}://{u.netloc.decode()}/{base + '/' if base else ''} (crucible lab serve prints it)"
        )
    return str(u).rstrip("/") + "/"


API_ROOTS = frozenset({"experiments", "control", "sign-in-link", "ws-ticket", "login", "metrics"})
"""The daemon's API paths after ``/api``. A ``--to`` URL ending in ``/api``, or going on with
one of them, names the API, not the daemon; a proxy's own prefix may hold an ``api`` segment
(``https://host/api/crucible/`` is a base URL)."""


def _api_path(after: list[str]) -> bool:
    return not after or after[0] in API_ROOTS


ROW = {"id": str, "status": str}  # what every row of a listing and every submission's entry carry
ACTION = {"experiment": str, "status": str}  # a control's answer


def _cut(text: str) -> str:
    """An answer's text as one short line: a proxy's error page can be long HTML."""
    return brief(" ".join(text.split()), 300)


class LabClient:
    """Submit, list and control the experiments of a lab daemon at ``url``."""

    def __init__(
        self,
        url: str,
        token: str | None = None,
        *,
        artifacts: str | Path | None = None,
        token_file: str | Path | None = None,
        timeout: float = 120.0,
        transport: httpx.BaseTransport | None = None,
    ) -> None:
        self.url = base_url(url)
        self.token = check_token(find_token(token, artifacts, token_file))
        self.http = httpx.Client(  # transport: httpx's, e.g. one through a tunnel (default: a plain connection)
            base_url=self.url,
            timeout=timeout,
            headers={"Authorization": f"Bearer {self.token}"},
            trust_env=False,
            transport=transport,
        )

    def _call(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, 0, **kwargs)[0]

    def _shaped(self, answer: Any, fields: dict[str, type | tuple[type, ...]], what: str) -> dict[str, Any]:
        """``answer`` when it is a JSON object with ``fields`` of those types, as a lab daemon's
        answers are; another server answering 2xx with other JSON is said to be one, not met
        later as a KeyError or an empty listing.

        Raises:
            LabClientError: the answer has another shape.
        """
        if isinstance(answer, dict):
            bad = [k for k, kind in fields.items() if not isinstance(answer.get(k), kind)]
            if not bad:
                return answer
            why = f"no {', '.join(repr(k) for k in bad)} of the right type"
        else:
            why = f"a JSON {type(answer).__name__}, not an object"
        raise LabClientError(
            f"{self.url} answered {what} with JSON that is not a lab daemon's ({why}), so it is likely not a lab "
            f"daemon (crucible lab serve prints its URL): {_cut(orjson.dumps(answer).decode())!r}"
        )

    def _request(self, method: str, path: str, retries: int, patience_s: float = 0.0, **kwargs: Any) -> tuple[Any, int]:
        """One request and the tries it took; ``retries`` more after a lost answer (for a request
        the daemon answers the same however often it comes: a submission with its key), and
        more for up to ``patience_s`` in all once a try may have reached the daemon (anything
        but a refused connection). The error then says so (:attr:`LabClientError.maybe_delivered`)."""
        t0 = time.monotonic()
        sent = False  # a try may have reached the daemon: its answer was lost
        attempt = 0
        while True:
            try:
                resp = self.http.request(method, path, **kwargs)
                break
            except RETRIED as exc:  # refused, reset, timed out: the answer, if any, was lost
                sent = sent or not isinstance(exc, httpx.ConnectError)
                delay = RETRY_DELAY_S * 2 ** min(attempt, 3)  # 0.5, 1, 2, 4, 4, ... s
                attempt += 1
                if attempt > retries and not (sent and time.monotonic() - t0 + delay <= patience_s):
                    err = LabClientError(f"cannot reach the lab daemon at {self.url}: {exc}")
                    err.maybe_delivered = sent
                    raise err from None
                log.info("lab daemon call failed; retrying", url=self.url, error=str(exc), attempt=attempt)
                time.sleep(delay)
            except httpx.HTTPError as exc:
                raise LabClientError(f"cannot reach the lab daemon at {self.url}: {exc}") from None
        if resp.status_code >= 400:
            try:
                message = orjson.loads(resp.content).get("error")
            except (orjson.JSONDecodeError, AttributeError):
                message = None
            if not isinstance(message, str):  # a daemon's errors are JSON {"error": ...}: not one of those
                raise LabClientError(
                    f"{self.url} answered {resp.status_code} {resp.reason_phrase} without a lab daemon's JSON error, "
                    f"so it is likely not a lab daemon (crucible lab serve prints its URL): {_cut(resp.text)!r}",
                    resp.status_code,
                )
            raise LabClientError(f"{resp.status_code}: {_cut(message)}", resp.status_code)
        try:
            return orjson.loads(resp.content), attempt + 1
        except orjson.JSONDecodeError:
            raise LabClientError(
                f"{self.url} answered {resp.status_code} with something other than JSON, so it is not a lab "
                f"daemon (crucible lab serve prints its URL): {_cut(resp.text)!r}",
                resp.status_code,
            ) from None

    def submit(
        self,
        spec: str | Path | dict[str, Any],
        overrides: list[str] | None = None,
        experiment_id: str | None = None,
        key: str | None = None,
    ) -> dict[str, Any]:
        """Queue a spec: a dict, TOML text, or a path to a TOML file. ``{"id", "status", ...}``.

        The submission carries an idempotency ``key`` (a fresh random one when none is given)
        and is sent again, up to :data:`SUBMIT_RETRIES` times, when its answer is lost (a reset
        connection, a timeout): the daemon answers a repeat with the first entry and
        ``"repeated": true`` (and ``"retried": true`` here when this call had to try again), so
        a retry never starts a second experiment. Give the same ``key`` yourself to make a later
        resubmission safe too (a script run again)."""
        if isinstance(spec, Path):
            try:
                spec = spec.read_text()
            except OSError as exc:
                raise LabClientError(f"cannot read the spec {str(spec)!r}: {exc.strerror or exc}") from None
            except UnicodeDecodeError as exc:
                raise LabClientError(f"the spec {str(spec)!r} is not UTF-8 text (byte {exc.start})") from None
        if isinstance(spec, dict) and (problem := tree_problem(spec)) is not None:
            where, what = problem  # JSON carries no NaN: said here, naming the field, not by the encoder
            raise LabClientError(f"the spec's field {where or '(the spec)'} {what}")
        body: dict[str, Any] = {"spec": spec} if isinstance(spec, dict) else {"toml": spec}
        body["set"] = list(overrides or [])
        if experiment_id is not None:
            body["id"] = experiment_id
        try:
            key = check_key(key) or uuid.uuid4().hex
        except ValueError as exc:
            raise LabClientError(str(exc)) from None
        headers = {IDEMPOTENCY_HEADER: key}
        try:
            answer, tries = self._request(
                "POST", "api/experiments", SUBMIT_RETRIES, SUBMIT_PATIENCE_S, json=body, headers=headers
            )
        except LabClientError as exc:
            if not exc.maybe_delivered:
                raise
            err = LabClientError(
                f"{exc}; the daemon may have taken the submission before its answer was lost: submitting it "
                f"again with the same key is safe, it answers with the first if so (crucible submit ... --key {key})"
            )
            err.maybe_delivered = True
            raise err from None
        entry = self._shaped(answer, ROW, "a submission")
        if tries > 1 and entry.get("repeated"):
            entry["retried"] = True  # a repeat this call's own retry met: perhaps the first try's experiment
        return entry

    def list(self, history: bool = True) -> list[dict[str, Any]]:
        """Every experiment: those of the Lab (running, paused, ended), then the never-run and
        queued ones; with ``history``, also the runs of the daemon's earlier lifetimes."""
        data = self._call("GET", "api/experiments?history=1" if history else "api/experiments")
        parts = {"experiments": list, "queued": (list, type(None)), "earlier": (list, type(None))}
        data = self._shaped(data, parts, "the list of experiments")
        for part in parts:
            for e in data.get(part) or []:
                self._shaped(e, ROW, "the list of experiments")
        keys = ("id", "run_id", "status", "reason", "workload")
        out = [{k: e.get(k) for k in keys} | {"position": None} for e in data["experiments"]]
        return out + list(data.get("queued") or []) + list(data.get("earlier") or [])

    def _control(self, action: str, exp_id: str) -> dict[str, Any]:
        return self._shaped(self._call("POST", f"api/control/{action}", json={"experiment": exp_id}), ACTION, action)

    def pause(self, exp_id: str) -> dict[str, Any]:
        return self._control("pause", exp_id)

    def resume(self, exp_id: str) -> dict[str, Any]:
        return self._control("resume", exp_id)

    def stop(self, exp_id: str) -> dict[str, Any]:
        """Stop a running experiment, or cancel a queued one."""
        return self._control("stop", exp_id)

    def set_param(self, exp_id: str, key: str, value: Any, why: str | None = None) -> dict[str, Any]:
        """Set one of a running experiment's controls (a key its workload declares) at its
        phase's next safe point; ``result`` holds ``before`` and
        ``after``. Not retried: the daemon may have applied a change whose answer was lost."""
        if (problem := tree_problem(value, key)) is not None:
            raise LabClientError(f"the value of control {problem[0]!r} {problem[1]}")
        body: dict[str, Any] = {"experiment": exp_id, "key": key, "value": value}
        if why is not None:
            body["why"] = why
        answer = self._call("POST", "api/control/set", json=body)
        return self._shaped(answer, ACTION | {"result": (dict, type(None))}, "set")

    def restart_pass(self, exp_id: str) -> dict[str, Any]:
        """Start a new pass of a running experiment from its best solution (a workload with passes)."""
        return self._control("restart", exp_id)

    def sign_in_link(self) -> str:
        """A new one-time link that opens the dashboard signed in (each printed link works once)."""
        return str(self._shaped(self._call("POST", "api/sign-in-link"), {"url": str}, "a sign-in link")["url"])

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> LabClient:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


__all__ = ["TOKEN_ENV", "LabClient", "LabClientError", "find_token"]
