"""Independent experiments, N at a time: what ``ab`` and ``tune`` run with ``parallel=N``.

A :class:`Job` is one experiment (spec, overrides, experiment id) and the function that reads
its row from the run directory once it ended. :func:`run_jobs` runs a list of them over one
artifacts folder and returns one :class:`JobResult` per job, in the jobs' order:

* ``parallel=1`` on the ``embedded`` backend: one after another in this process, in one Lab,
  exactly as ``ab`` and ``tune`` always ran;
* ``parallel=N`` on the ``embedded`` backend: N worker processes (``spawn``: no forked actor
  threads or locks), each running its job in a Lab of its own on the same artifacts folder.
  Each worker has its own pipe: a worker that dies (killed, out of memory, ``os._exit``)
  fails the one job it held, its neighbours go on, and a new worker takes the next job. A
  worker whose caller is gone (killed, ended without stopping it) stops its experiment and
  exits: no worker outlives its caller by more than :data:`STOP_POLL_S` and a Lab shutdown.
  Run directories are per run (experiment id, then a fresh run id) and the SQLite history
  takes several writer processes (WAL, a busy timeout of 30 s; see :mod:`telemetry.store`);
* ``backend="ray"``: the same job function as Ray tasks, N at a time, on the cluster at
  ``address`` (None: this process's, or a local one started here). The artifacts folder must
  be one folder for every node, as for the ray experiment backend (docs/ray.md).

A job that fails (its spec refused, its tree gave up, its row unreadable, its worker process
killed) comes back as a failed result with the reason; it never hangs or fails the others. Ctrl-C (a
``KeyboardInterrupt`` in the caller) stops the workers' experiments (each Lab shuts down: the
runs end ``stopped``, their telemetry flushed) before it propagates.
"""

from __future__ import annotations

import contextlib
import multiprocessing as mp
import multiprocessing.connection as mpc
import os
import signal
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from actors.log import configure_logging, get_logger
from actors.recorder import check_artifacts_dir
from experiments.lab import MIN_FREE_BYTES, Lab, check_min_free
from experiments.validate import Num
from telemetry.rundir import RunStatus

log = get_logger("experiments.parallel")

PARALLEL = Num(1, 1024, integer=True)
"""How many jobs may run at once."""
BACKENDS = ("embedded", "ray")
INTERRUPTED = "interrupted"
WORKER_DIED = "its worker process died while it ran"
"""The start of a failed job's error when its worker process died (the exit code or signal follows)."""
INTERRUPT_CHECK_S = 0.5  # how often a job in a worker looks up from its wait (for Ray's cancel)
STOP_POLL_S = 0.2
"""How often a worker looks at the stop signal and whether its caller is still there. The
signal is a byte of shared memory with no lock: an
``Event`` has one, and a worker killed while it held it (a SIGTERM to the whole process
group) left the caller's ``set()`` waiting for ever."""
STOP_WAIT_S = 120.0  # after Ctrl-C: how long the workers get to stop their experiments before they are killed


@dataclass(frozen=True)
class Job:
    """One experiment to run: what :meth:`Lab.start_experiment` takes, and ``read_row``, which
    turns the ended run's directory into the caller's row. ``read_row`` crosses to a worker
    process by reference: a module-level function, or a ``functools.partial`` of one."""

    spec: str | Path | dict[str, Any]
    overrides: tuple[str, ...] = ()
    experiment_id: str | None = None
    read_row: Callable[[Path], dict[str, Any]] | None = None


@dataclass
class JobResult:
    """How one job went: ``row`` when it ran to an end that is not a failure, else ``error``."""

    index: int
    experiment_id: str | None = None
    run_dir: str | None = None
    reason: str | None = None  # the run's end reason (``completed``, ``budget``, ``failed: ...``)
    row: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # why the job failed; None when it did not

    @property
    def failed(self) -> bool:
        return self.error is not None


def check_parallel(parallel: Any, backend: str = "embedded") -> int:
    """``parallel`` if it is an integer from 1 to 1024 and ``backend`` one of :data:`BACKENDS`
    (ValueError naming the value otherwise)."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, got {backend!r}")
    return int(PARALLEL.check("parallel", parallel))


def _one_line(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {' '.join(str(exc).split())}"[:500]


# --- one job (in this process, a worker process or a Ray task) -----------------------------------------------

_worker_lock = threading.Lock()
_worker_lab: Lab | None = None  # the Lab of the job this worker process runs now
_worker_stopping = False  # the caller was interrupted: no new experiment starts here


def run_job(
    job: Job,
    artifacts: str,
    index: int,
    history: str | None = None,
    lab: Lab | None = None,
    min_free_bytes: int = MIN_FREE_BYTES,
) -> JobResult:
    """Run ``job`` to its end and read its row; a failure is a result with ``error`` set.

    With ``lab`` the experiment runs there (the sequential path); without, in a Lab of its own
    (``history``, ``min_free_bytes``) that shuts down with the job, so an interrupt
    (``KeyboardInterrupt``, or the worker's stop signal) stops the experiment before it propagates.
    """
    global _worker_lab
    res = JobResult(index, experiment_id=job.experiment_id)
    own = lab is None
    try:
        if own:
            with _worker_lock:
                if _worker_stopping:
                    res.error = INTERRUPTED
                    return res
                lab = _worker_lab = Lab(artifacts, history=history, min_free_bytes=min_free_bytes)
        exp = lab.start_experiment(job.spec, overrides=list(job.overrides), experiment_id=job.experiment_id)
        res.experiment_id, res.run_dir = exp.id, str(exp.run_dir)
        if own:  # short waits: Ray's cancel raises KeyboardInterrupt only between them, never inside one
            while not exp.wait(INTERRUPT_CHECK_S):
                pass
        else:
            exp.wait()
        res.reason = exp.reason
        if _worker_stopping:
            res.error = INTERRUPTED
        elif exp.status() == RunStatus.FAILED or str(exp.reason or "").startswith("storage:"):
            res.error = f"the run failed: {exp.reason}"
        elif job.read_row is not None:
            res.row = job.read_row(exp.run_dir)
    except Exception as exc:  # noqa: BLE001 - a job's failure is its result, never the others'
        log.warning("a job failed", index=index, experiment=res.experiment_id, error=_one_line(exc))
        res.error = _one_line(exc)
    finally:
        if own and lab is not None:
            with _worker_lock:
                _worker_lab = None
            lab.shutdown()
    return res


def _init_worker(stop: Any, log_level: int, log_json: bool, parent: int | None = None) -> None:
    """A worker process: logs as the caller does (to stderr), leaves Ctrl-C and SIGTERM to the
    caller (a terminal's Ctrl-C, ``timeout`` and systemd signal the whole process group: the
    caller then stops every worker's experiment, flushed, where a worker killed by the signal
    left its run crashed), and stops its experiment when the caller sets ``stop`` or is gone
    (``parent`` no longer its parent)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    configure_logging(log_level, json=log_json)
    threading.Thread(target=_watch_stop, args=(stop, parent), name="parallel-stop", daemon=True).start()


def _watch_stop(stop: Any, parent: int | None = None) -> None:
    global _worker_stopping
    while not stop.value:
        time.sleep(STOP_POLL_S)
        if parent is not None and os.getppid() != parent:  # the caller died (SIGKILL, SIGTERM): we were left
            log.warning("the caller of this worker is gone: stopping its experiment", caller=parent)
            break
    with _worker_lock:
        _worker_stopping = True
        lab = _worker_lab
    if lab is not None:
        lab.shutdown()  # its experiment stops; the job's wait returns and reports it interrupted
    if parent is not None and os.getppid() != parent:
        os._exit(EXIT_ORPHANED)  # nobody reads our result; the main thread may be blocked on the pipe


EXIT_ORPHANED = 3


def _warm_up(task: tuple[Any, ...] | None) -> None:
    """Run the warm-up job (see :class:`JobRunner`), its result dropped: what a process pays once
    (imports, compiled kernels loaded, caches) is then paid outside the jobs that are measured."""
    if task is None:
        return
    res = run_job(*task)
    if res.failed:  # the measured runs go on: they say for themselves whether they can run
        log.warning("the warm-up run failed", experiment=res.experiment_id, error=res.error)
    else:
        log.info("warm-up run done", experiment=res.experiment_id, reason=res.reason)


_warmed: set[str] = set()  # the warm-up jobs this process ran (a Ray worker serves many studies)


def run_job_warm(warmup: tuple[Any, ...] | None, *task: Any) -> JobResult:
    """:func:`run_job` in a Ray task, after the warm-up job (see :class:`JobRunner`) if this
    worker process has not run that one yet: Ray reuses its worker processes, so each pays once."""
    if warmup is not None:
        key = repr((warmup[0].spec, warmup[0].overrides))
        if key not in _warmed:
            _warm_up(warmup)
            _warmed.add(key)
    return run_job(*task)


def _worker_main(
    conn: Any, stop: Any, log_level: int, log_json: bool, parent: int, warmup: tuple[Any, ...] | None = None
) -> None:
    """A worker process's loop: a job from the pipe, its result back, until ``None`` or the pipe closes."""
    _init_worker(stop, log_level, log_json, parent)
    _warm_up(warmup)
    while True:
        try:
            task = conn.recv()
        except (EOFError, OSError):
            return
        if task is None:
            return
        try:
            res = run_job(*task)
        except BaseException as exc:  # noqa: BLE001 - run_job catches Exception; a result even for the rest
            res = JobResult(task[2], getattr(task[0], "experiment_id", None), error=_one_line(exc))
        try:
            conn.send(res)
        except (OSError, ValueError):
            return


def _death(proc: Any) -> str:
    """How a worker process ended, for a failed job's error."""
    proc.join(5.0)
    code = proc.exitcode
    if code is None:
        return WORKER_DIED
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"{WORKER_DIED} (killed by {signal.Signals(-code).name})"
        return f"{WORKER_DIED} (killed by signal {-code})"
    return f"{WORKER_DIED} (exit code {code})"


class _Worker:
    """One worker process and the pipe that gives it jobs and takes back their results."""

    def __init__(
        self, ctx: Any, stop: Any, log_settings: tuple[int, bool], n: int, warmup: tuple[Any, ...] | None = None
    ) -> None:
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(
            target=_worker_main,
            args=(child, stop, *log_settings, os.getpid(), warmup),
            name=f"crucible-parallel-{n}",
        )
        try:
            self.proc.start()
        finally:
            child.close()
        self.index: int | None = None  # the job it runs now

    def alive(self) -> bool:
        return self.proc.is_alive()

    def kill(self) -> None:
        with contextlib.suppress(OSError, ValueError, AttributeError):
            self.proc.kill()

    def close(self, wait: float) -> None:
        """Ask it to exit (it finishes nothing: call when it holds no job), then make sure it did."""
        with contextlib.suppress(OSError, ValueError):
            self.conn.send(None)
        self.proc.join(wait)
        if self.proc.is_alive():
            self.kill()
            self.proc.join(5.0)
        with contextlib.suppress(OSError):
            self.conn.close()


def _log_settings() -> tuple[int, bool]:
    """The caller's log level and renderer, for the worker processes."""
    import structlog

    try:
        level = int(log.bind().get_effective_level())
    except (AttributeError, TypeError, ValueError):
        level = 30
    json = any(isinstance(p, structlog.processors.JSONRenderer) for p in structlog.get_config()["processors"])
    return level, json


# --- running many --------------------------------------------------------------------------------------------


class JobRunner:
    """Runs batches of jobs over one artifacts folder, at most ``parallel`` at once; what it
    holds between batches (the sequential path's Lab, the worker processes, the Ray
    connection) lives until :meth:`close`, so a study's batches pay for their start once.

    ``history`` is the Labs' history target (default: ``$CRUCIBLE_HISTORY`` or the artifacts
    folder's SQLite file).

    ``warmup``: a job each process runs once before its first job, its result dropped (the
    sequential path's Lab, each worker process, each Ray worker process the first time it
    runs one of these jobs): a process's first run pays for its imports, compiled kernels and
    caches, which would handicap whichever job came first (an A/B's first arm).

    ``min_free_bytes``: the free disk each Lab needs to start a run (see
    :data:`experiments.lab.MIN_FREE_BYTES`); below it a job fails with that reason.

    Raises:
        ValueError: ``parallel`` outside 1..1024, an unknown backend, a malformed address, or
            an address for the embedded backend.
    """

    def __init__(
        self,
        artifacts: str | Path,
        parallel: int = 1,
        *,
        backend: str = "embedded",
        address: str | None = None,
        history: str | None = None,
        warmup: Job | None = None,
        min_free_bytes: int = MIN_FREE_BYTES,
    ) -> None:
        self.parallel = check_parallel(parallel, backend)
        self.min_free_bytes = check_min_free(min_free_bytes)  # a bad figure fails here, before any folder
        if backend == "embedded" and address is not None:
            raise ValueError(f"address {address!r} is for the ray backend; the embedded backend takes none")
        if address is not None and address != "auto":
            from experiments.remote import parse_address

            parse_address(address)  # a malformed address fails now, before any folder or process
        self.artifacts = str(check_artifacts_dir(artifacts))  # a bad folder fails here, not in every job
        self.backend = backend
        self.address = address
        self.history = history
        self.warmup = warmup
        self._lab: Lab | None = None  # parallel=1, embedded
        self._workers: list[_Worker] = []  # parallel > 1, embedded: started as jobs need them
        self._ctx: Any = None  # the spawn context
        self._stop: Any = None  # the workers' stop signal: a shared byte (see STOP_POLL_S)
        self._spawned = 0
        self._ray: Any = None  # the ray module, once joined
        self._ray_started = False
        self._task: Any = None

    def __enter__(self) -> JobRunner:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the Lab, the worker processes or the Ray connection (Ray only if it started it)."""
        if self._lab is not None:
            self._lab.shutdown()
            self._lab = None
        self._close_workers(wait=30.0)
        if self._ray is not None and self._ray_started:
            self._ray.shutdown()
        self._ray = None

    def run(self, jobs: Sequence[Job], on_result: Callable[[JobResult], None] | None = None) -> list[JobResult]:
        """Run every job; their results in the jobs' order. ``on_result`` sees each result as
        it comes (in the order the jobs end).

        Raises:
            RayBackendError: the ray backend, and Ray is missing or the cluster cannot be joined.
            KeyboardInterrupt: after the running experiments were stopped.
        """
        results: list[JobResult | None] = [None] * len(jobs)

        def done(res: JobResult) -> None:
            results[res.index] = res
            if on_result is not None:
                on_result(res)

        if self.backend == "ray":
            self._run_ray(jobs, done)
        elif self.parallel == 1:
            if self._lab is None:
                self._lab = Lab(self.artifacts, history=self.history, min_free_bytes=self.min_free_bytes)
                _warm_up(self._warmup_task(self._lab))
            for i, job in enumerate(jobs):
                done(run_job(*self._task_args(job, i, self._lab)))
        else:
            self._run_processes(jobs, done)
        return [r for r in results if r is not None]

    def _task_args(self, job: Job, index: int, lab: Lab | None = None) -> tuple[Any, ...]:
        """:func:`run_job`'s arguments for ``job``, in ``lab`` or (None) a Lab of its own."""
        return (job, self.artifacts, index, self.history, lab, self.min_free_bytes)

    def _warmup_task(self, lab: Lab | None = None) -> tuple[Any, ...] | None:
        """:func:`run_job`'s arguments for the warm-up job (index -1), or None without one."""
        return None if self.warmup is None else self._task_args(self.warmup, -1, lab)

    def _new_worker(self) -> _Worker:
        if self._ctx is None:
            self._ctx = mp.get_context("spawn")
            self._stop = self._ctx.RawValue("b", 0)
        self._spawned += 1
        worker = _Worker(self._ctx, self._stop, _log_settings(), self._spawned, self._warmup_task())
        self._workers.append(worker)
        return worker

    def _close_workers(self, wait: float) -> None:
        workers, self._workers = self._workers, []
        for w in workers:
            w.close(wait)

    def _run_processes(self, jobs: Sequence[Job], done: Callable[[JobResult], None]) -> None:
        """Give each worker process one job at a time; a worker that dies fails only its own job
        (the reason says how it ended) and a new one takes the next."""
        queue = deque(enumerate(jobs))
        busy: dict[int, _Worker] = {}  # job index -> the worker running it
        try:
            while queue or busy:
                while queue and len(busy) < self.parallel:
                    i, job = queue.popleft()
                    for gone in [w for w in self._workers if w.index is None and not w.alive()]:
                        self._workers.remove(gone)  # died between jobs
                        gone.close(0.0)
                    idle = [w for w in self._workers if w.index is None]
                    w = idle[0] if idle else self._new_worker()
                    try:
                        w.conn.send(self._task_args(job, i))
                    except Exception as exc:  # noqa: BLE001 - e.g. a job that cannot be pickled
                        done(JobResult(i, job.experiment_id, error=_one_line(exc)))
                        continue
                    w.index = i
                    busy[i] = w
                ready = set(mpc.wait([r for w in busy.values() for r in (w.conn, w.proc.sentinel)]))
                for i, w in list(busy.items()):
                    if w.conn not in ready and w.proc.sentinel not in ready:
                        continue
                    res = self._result(w, i, jobs[i])
                    del busy[i]
                    w.index = None
                    done(res)
        except BaseException:
            self._interrupt_processes(busy)
            raise

    def _result(self, w: _Worker, i: int, job: Job) -> JobResult:
        """The result a worker sent, or, if it died first, a failed one saying how it ended."""
        try:
            if w.conn.poll():
                return w.conn.recv()
        except (EOFError, OSError):
            pass
        except Exception as exc:  # noqa: BLE001 - a result that does not unpickle here
            return JobResult(i, job.experiment_id, error=_one_line(exc))
        why = _death(w.proc)
        log.warning("a worker process died", index=i, experiment=job.experiment_id, error=why)
        self._workers.remove(w)
        with contextlib.suppress(OSError):
            w.conn.close()
        return JobResult(i, job.experiment_id, error=why)

    def _interrupt_processes(self, busy: dict[int, _Worker]) -> None:
        """Every worker's Lab shuts down (its experiment stops, flushed; a second Ctrl-C does not
        cut that short); a worker that will not stop within :data:`STOP_WAIT_S` is killed (its
        run is left crashed, for ``recover``). No worker process is left behind."""
        if not self._workers:
            return
        log.warning("interrupted: stopping the running experiments", running=len(busy))
        try:
            self._stop.value = 1
            deadline = time.monotonic() + STOP_WAIT_S
            waiting = {w.proc.sentinel: w for w in busy.values()} | {w.conn: w for w in busy.values()}
            while waiting and time.monotonic() < deadline:
                try:
                    ready = mpc.wait(list(waiting), timeout=max(0.0, deadline - time.monotonic()))
                except KeyboardInterrupt:  # Ctrl-C again: the stop is bounded; a kill would leave runs crashed
                    log.warning("still stopping the running experiments", running=len(busy))
                    continue
                for r in ready:
                    w = waiting.pop(r)
                    waiting = {k: v for k, v in waiting.items() if v is not w}
                    with contextlib.suppress(Exception):
                        if w.conn.poll():
                            w.conn.recv()  # its job's result: interrupted
                    w.index = None
            self._close_workers(wait=10.0)
        finally:
            for w in self._workers:
                w.kill()
            self._close_workers(wait=5.0)
            self._ctx = None  # a new stop signal for the next batch's workers

    def _run_ray(self, jobs: Sequence[Job], done: Callable[[JobResult], None]) -> None:
        """Ray tasks running :func:`run_job`; Ctrl-C cancels them (each task's Lab stops its experiment)."""
        if self._ray is None:
            self._ray, self._ray_started = _join_ray(self.address)
            self._task = self._ray.remote(num_cpus=1, max_retries=0)(run_job_warm)
        ray = self._ray
        queue = deque(enumerate(jobs))
        inflight: dict[Any, int] = {}
        try:
            while queue or inflight:
                while queue and len(inflight) < self.parallel:
                    i, job = queue.popleft()
                    inflight[self._task.remote(self._warmup_task(), *self._task_args(job, i))] = i
                finished, _ = ray.wait(list(inflight), num_returns=1)
                for ref in finished:
                    i = inflight.pop(ref)
                    try:
                        res = ray.get(ref)
                    except Exception as exc:  # noqa: BLE001 - the task's process died, or Ray failed it
                        res = JobResult(i, jobs[i].experiment_id, error=_one_line(exc))
                    done(res)
        except BaseException as first:
            log.warning("interrupted: cancelling the running Ray tasks", running=len(inflight))
            try:
                for ref in inflight:
                    ray.cancel(ref)  # a KeyboardInterrupt in the task: its Lab shuts down, the experiment stops
                if inflight:
                    ray.wait(list(inflight), num_returns=len(inflight), timeout=STOP_WAIT_S)
            except BaseException as exc:  # noqa: BLE001 - Ray's wait can fail as the interrupt unwinds
                # (a SystemError from its C core, a second Ctrl-C): the caller must still see the first
                log.warning("could not wait for the cancelled Ray tasks", error=f"{type(exc).__name__}: {exc}"[:300])
            raise first


def _join_ray(address: str | None) -> tuple[Any, bool]:
    """The ray module, joined to the cluster at ``address`` (see :func:`experiments.remote.connect`),
    and whether this call started Ray. With no address and no Ray in this process, a local Ray
    starts here, in the calling thread: Ray's head processes die with the thread that started
    them (their parent-death signal), so a helper thread that ends after ``ray.init`` would
    take the new cluster down with it.

    Raises:
        RayBackendError: Ray is missing, or the cluster cannot be joined.
    """
    from experiments.remote import RayBackendError, connect

    try:
        import ray
    except ImportError as exc:
        raise RayBackendError(
            f"the ray backend needs Ray: pip install 'crucible-lab[ray]' ({type(exc).__name__}: {exc})"
        ) from None
    if address is not None:
        return ray, connect(address)
    if ray.is_initialized():
        return ray, False
    ray.init(address="local", include_dashboard=False, log_to_driver=False)  # not a cluster `ray start` left here
    return ray, True


def run_jobs(
    jobs: Sequence[Job],
    artifacts: str | Path,
    parallel: int = 1,
    *,
    backend: str = "embedded",
    address: str | None = None,
    history: str | None = None,
    on_result: Callable[[JobResult], None] | None = None,
    warmup: Job | None = None,
    min_free_bytes: int = MIN_FREE_BYTES,
) -> list[JobResult]:
    """Run every job, at most ``parallel`` at once (see :class:`JobRunner`); their results in the jobs' order."""
    with JobRunner(
        artifacts,
        parallel,
        backend=backend,
        address=address,
        history=history,
        warmup=warmup,
        min_free_bytes=min_free_bytes,
    ) as runner:
        return runner.run(jobs, on_result)
