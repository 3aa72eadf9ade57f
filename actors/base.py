"""The actor runtime: an :class:`Actor` on pykka whose messages travel as msgpack bytes.

Let it crash: an exception raised while handling any message (tell or ask) stops
the actor with that reason, notifies its monitors, and reaches the asker. A message
that cannot be decoded, or whose ``kind`` the actor does not handle, is logged,
counted and dropped; it never kills the actor.

Kill. A Python thread cannot be killed. ``ActorRef.kill()`` therefore means: the
actor is marked dead at once, removed from pykka's registry and from our name
registries, its monitors receive ``down`` with reason ``"killed"``, it is never
given another message (anything still queued or arriving later is discarded
unread), and its thread is abandoned. Actor threads are daemon threads, so an
abandoned thread never keeps the process alive. If the abandoned handler ever
returns, the thread exits without running ``terminate``.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable
from typing import Any, ClassVar

import pykka

from actors.log import get_logger
from actors.messages import DecodeError, decode, decode_message, encode
from actors.timers import Timer, call_later, check_timeout

logging.getLogger("pykka").addHandler(logging.NullHandler())

log = get_logger("actors")

ActorDeadError = pykka.ActorDeadError

NORMAL = "normal"
SHUTDOWN = "shutdown"
KILLED = "killed"
NOPROC = "noproc"

URGENT = "_urgent"  # the key an urgent message carries its token under (see ActorRef.ask)
_urgent_tokens = itertools.count(1)  # next() on a count is atomic under the GIL


def is_abnormal(reason: str) -> bool:
    """OTP's rule: anything but ``normal`` and ``shutdown`` is an abnormal exit."""
    return reason not in (NORMAL, SHUTDOWN) and not reason.startswith("shutdown:")


class UnknownMessage(Exception):
    """Raised by ``on_message`` for a ``kind`` the actor does not handle: dropped, not a crash;
    an ``ask`` of it raises this in the asker (a reply of None would pass for an answer)."""

    def __str__(self) -> str:
        return f"no handler for message kind {self.args[0]!r}" if self.args else "no handler for this message kind"


class HandlerExit(RuntimeError):
    """A handler raised a BaseException that is no Exception: ``SystemExit`` (user code calling
    ``sys.exit()``), ``asyncio.CancelledError`` (an async client's cancelled task),
    ``KeyboardInterrupt`` (re-raised by a library: a real Ctrl-C reaches the main thread
    only), ``GeneratorExit``. pykka stops every actor of the process on one; here it is this
    actor's crash, like any exception."""

    def __init__(self, exc: BaseException) -> None:
        what = f"SystemExit({exc.code!r})" if isinstance(exc, SystemExit) else repr(exc)
        super().__init__(f"{what} raised in a handler")


class _Life:
    """Shared, thread-safe life state of one actor, visible to every ref to it."""

    __slots__ = ("dead", "inbox", "lock", "on_death", "pending_reason", "reason", "stopped", "urgent", "watchers")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.dead = False
        self.reason: str | None = None
        self.watchers: list[ActorRef] = []
        self.stopped = threading.Event()
        self.pending_reason: str | None = None
        self.on_death: list[Callable[[str], None]] = []
        self.inbox: Any = None  # the pykka inbox (a queue.Queue), for drain_leftovers
        self.urgent: set[int] = set()  # tokens of the urgent messages queued and not yet taken

    def drain_leftovers(self) -> list[bytes]:
        """Take the messages still queued for a dead actor (asks are answered ActorDeadError).

        Used by a Registry to carry a crashed named actor's queued messages over to
        its replacement. The message being handled when it crashed is not among them.
        """
        out: list[bytes] = []
        if self.inbox is None:
            return out
        while True:
            try:
                env = self.inbox.get_nowait()
            except queue.Empty:
                return out
            if env.reply_to is not None:
                env.reply_to.set_exception(exc_info=(ActorDeadError, ActorDeadError("actor died"), None))
            elif isinstance(env.message, (bytes, bytearray)):
                out.append(bytes(env.message))


class ActorRef:
    """A handle to an actor; encodes messages on send, the actor decodes on receipt."""

    __slots__ = ("_life", "_pref", "actor_class", "urn")

    def __init__(self, pref: pykka.ActorRef[Any], life: _Life, actor_class: type) -> None:
        self._pref = pref
        self._life = life
        self.urn: str = pref.actor_urn
        self.actor_class = actor_class

    def __repr__(self) -> str:
        state = "alive" if self.is_alive() else f"dead:{self._life.reason}"
        return f"<ActorRef {self.actor_class.__name__} {self.urn[-12:]} {state}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ActorRef) and other.urn == self.urn

    def __hash__(self) -> int:
        return hash(self.urn)

    def is_alive(self) -> bool:
        return not self._life.dead

    def queue_size(self) -> int:
        """Messages waiting in the actor's mailbox (for backpressure decisions)."""
        return self._pref.actor_inbox.qsize()

    @property
    def exit_reason(self) -> str | None:
        """Why the actor died (``normal``, ``shutdown``, ``killed`` or the crash), or None."""
        return self._life.reason

    def tell(self, msg: dict[str, Any], *, urgent: bool = False) -> bool:
        """Send without waiting; silently dropped if the actor is dead (as in Erlang). Returns
        False when it was dropped.

        ``urgent``: as for :meth:`ask`."""
        if not urgent:
            return self.tell_bytes(encode(msg))
        token, data = self._urgent(msg)
        if self.tell_bytes(data):
            return True
        self._life.urgent.discard(token)
        return False

    def _urgent(self, msg: dict[str, Any]) -> tuple[int, bytes]:
        """``msg`` encoded with a new token, counted as waiting: after the encoding (a message
        that cannot travel raises here and counts for nothing), before it is queued (so a
        handler never misses it)."""
        token = next(_urgent_tokens)
        data = encode({**msg, URGENT: token})
        self._life.urgent.add(token)
        return token, data

    def tell_bytes(self, data: bytes) -> bool:
        """Send an already-encoded message (topics encode once and fan out the bytes).

        Returns False if the actor is dead or dying (the message was not queued).
        """
        if self._life.dead:
            return False
        try:
            self._pref.tell(data)
        except pykka.ActorDeadError:
            return False
        return True

    def tell_unless_stopping(self, msg: dict[str, Any]) -> bool:
        """Send a message an actor sends itself (a timer's tick, its next step), unless a stop
        is already on its way. A tick queued behind the stop would never be read, and a
        registry would count it as an undelivered message. Atomic with :meth:`stop` (both
        take the actor's life lock): a tick sent first is read before the stop."""
        data = encode(msg)
        with self._life.lock:
            if self._life.pending_reason is not None:
                return False
            return self.tell_bytes(data)

    def tell_later(self, delay: float, msg: dict[str, Any]) -> Timer:
        """Send ``msg`` to this actor after ``delay`` seconds, unless it is stopping by then
        (Erlang's ``send_after`` for an actor's own ticks, on the process's one timer
        thread: :mod:`actors.timers`); cancel the returned timer to take it back."""
        return call_later(delay, self.tell_unless_stopping, msg)

    def ask(self, msg: dict[str, Any], timeout: float | None = None, *, urgent: bool = False) -> Any:
        """Send and wait for the reply; the handler's exception is raised here.

        ``timeout``: seconds in ``[0, MAX_DELAY_S]``, or None / ``math.inf`` to wait as long as
        it takes (anything else is a ValueError here, not an OverflowError deep in threading).

        ``urgent``: the message still waits its turn in the mailbox, but the actor's
        :meth:`Actor.should_yield` says so from now until it takes the message, so a handler
        busy with a long piece of work (a Phase's step) returns at its next safe point
        instead of holding a pause or a stop for as long as the work would take.
        """
        timeout = check_timeout(timeout)
        if self._life.dead:
            raise ActorDeadError(f"{self!r} is dead")
        token, data = self._urgent(msg) if urgent else (None, encode(msg))
        try:
            reply = self._pref.ask(data, timeout=timeout)
        except pykka.Timeout as exc:
            raise TimeoutError(f"{self!r} did not answer {msg.get('kind')!r} in {timeout}s") from exc
        except pykka.ActorDeadError:
            if token is not None:
                self._life.urgent.discard(token)
            raise
        if isinstance(reply, Refusal):
            raise reply.exc
        return None if reply is None else decode(reply)

    def wait(self, timeout: float | None = None) -> str | None:
        """Block until the actor is dead; return its exit reason (None on timeout)."""
        self._life.stopped.wait(check_timeout(timeout))
        return self._life.reason

    def stop(self, timeout: float | None = None, reason: str = NORMAL) -> bool:
        """Stop after the messages already queued; True if it stopped within ``timeout``."""
        timeout = check_timeout(timeout)
        with self._life.lock:
            if self._life.dead:
                return True
            self._life.pending_reason = reason
        try:
            self._pref.stop(block=True, timeout=timeout)
        except pykka.Timeout:
            return False
        except pykka.ActorDeadError:
            pass
        self._life.stopped.wait(timeout)
        return self._life.dead

    def kill(self, reason: str = KILLED) -> None:
        """Mark the actor dead now, whatever its thread is doing (see module docs)."""
        if _finalize(self._life, reason, self):
            try:
                self._pref.tell(pykka.messages._ActorStop())
            except pykka.ActorDeadError:
                pass


def _finalize(life: _Life, reason: str, ref: ActorRef) -> bool:
    """Record death once: unregister, notify monitors. Returns False if already dead."""
    with life.lock:
        if life.dead:
            return False
        life.dead = True
        life.reason = reason
        watchers, life.watchers = life.watchers, []
        hooks, life.on_death = life.on_death, []
    pykka.ActorRegistry.unregister(ref._pref)
    for hook in hooks:
        try:
            hook(reason)
        except Exception:
            log.exception("death hook failed", urn=ref.urn)
    down = encode({"kind": "down", "urn": ref.urn, "reason": reason})
    for w in watchers:
        w.tell_bytes(down)
    life.stopped.set()
    return True


def monitor(watcher: ActorRef, target: ActorRef) -> None:
    """``watcher`` receives ``{"kind": "down", "urn", "reason"}`` when ``target`` dies.

    Monitoring an actor that is already dead delivers ``down`` with reason ``noproc``.
    """
    life = target._life
    with life.lock:
        if not life.dead:
            life.watchers.append(watcher)
            return
    watcher.tell({"kind": "down", "urn": target.urn, "reason": NOPROC})


_spawning = threading.local()


def spawn_monitor(watcher: ActorRef, actor: type[Actor], *args: Any, **kwargs: Any) -> ActorRef:
    """Start ``actor`` with ``watcher`` monitoring it from before its ``on_start`` (Erlang's
    ``spawn_monitor``): an actor whose ``on_start`` crashes at once is reported ``down`` with
    its crash, where a :func:`monitor` taken after ``start`` could only say ``noproc``."""
    _spawning.pending = (actor, watcher)
    try:
        return actor.start(*args, **kwargs)
    finally:
        _spawning.pending = None


def demonitor(watcher: ActorRef, target: ActorRef) -> None:
    """Stop watching ``target`` (no ``down`` will be sent to ``watcher``)."""
    life = target._life
    with life.lock:
        life.watchers = [w for w in life.watchers if w != watcher]


def on_death(target: ActorRef, hook: Callable[[str], None]) -> None:
    """Run ``hook(reason)`` once when ``target`` dies (at once if it is dead already)."""
    life = target._life
    with life.lock:
        if not life.dead:
            life.on_death.append(hook)
            return
        reason = life.reason or NOPROC
    hook(reason)


_handler_tables: dict[type, dict[str, Callable[..., Any]]] = {}


def _handlers_for(cls: type) -> dict[str, Callable[..., Any]]:
    """``kind -> handle_<kind>`` for an actor class, built once per class."""
    table = _handler_tables.get(cls)
    if table is None:
        table = _handler_tables[cls] = {
            name[7:]: getattr(cls, name)
            for name in dir(cls)
            if name.startswith("handle_") and callable(getattr(cls, name))
        }
    return table


def _guard_start(start: Callable[[Any], None]) -> Callable[[Any], None]:
    """``start`` (an ``on_start``), made to record a crash before pykka stops the actor."""

    def on_start(self: Actor) -> None:
        try:
            start(self)
        except Exception as exc:
            if not self._life.dead:  # a guarded parent's on_start recorded it already
                self._crash(exc)
            raise
        except BaseException as exc:  # SystemExit, CancelledError, ...: this actor's crash alone
            if self._life.dead:
                raise
            raise self._crash_exit(exc) from exc

    on_start._crash_guarded = True  # type: ignore[attr-defined]
    on_start.__doc__, on_start.__qualname__ = start.__doc__, start.__qualname__
    return on_start


def _guard_stop(stop: Callable[[Any], None]) -> Callable[[Any], None]:
    """``stop`` (a subclass's ``on_stop``), made to end in the base's finalisation whatever it
    does: without it, an ``on_stop`` that neither calls ``super().on_stop()`` nor returns left
    the actor a zombie (never marked dead, monitors never told, ``stop()`` timing out)."""

    def on_stop(self: Actor) -> None:
        try:
            stop(self)
        except BaseException:  # logged; the actor stops all the same (see HandlerExit)
            log.exception(
                "on_stop failed; the actor stops all the same",
                actor=type(self).__name__,
                urn=self.actor_urn,
                reason=self._life.pending_reason or NORMAL,
            )
        finally:
            self._finish_stop()  # a no-op when the override called super().on_stop()

    on_stop._stop_guarded = True  # type: ignore[attr-defined]
    on_stop.__doc__, on_stop.__qualname__ = stop.__doc__, stop.__qualname__
    return on_stop


class Actor(pykka.ThreadingActor):
    """Base class of every actor: override ``on_message(msg)`` or define ``handle_<kind>``.

    ``on_message`` receives the decoded dict. The default implementation dispatches
    to a method named ``handle_<kind>`` and raises :class:`UnknownMessage` if there
    is none. Whatever a handler returns is the reply to an ``ask`` (encoded too).
    """

    use_daemon_thread: ClassVar[bool] = True
    ref_class: ClassVar[type[ActorRef]] = ActorRef

    def __init_subclass__(cls, **kwargs: Any) -> None:
        """A subclass's ``on_start`` that raises crashes the actor as a handler would: pykka
        stops such an actor without calling ``on_failure``, and its supervisor would never
        learn (the child neither restarted nor failed: a tree stuck ``running``). A subclass's
        ``on_stop`` is always followed by the base's finalisation (``terminate``, exit reason,
        monitors, registries), and one that raises is logged, not a zombie actor."""
        super().__init_subclass__(**kwargs)
        start = cls.__dict__.get("on_start")
        if start is not None and not getattr(start, "_crash_guarded", False):
            cls.on_start = _guard_start(start)  # type: ignore[method-assign]
        stop = cls.__dict__.get("on_stop")
        if callable(stop) and not getattr(stop, "_stop_guarded", False):
            cls.on_stop = _guard_stop(stop)  # type: ignore[method-assign]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._life = _Life()
        self._life.inbox = self.actor_inbox
        pending = getattr(_spawning, "pending", None)
        if pending is not None and pending[0] is type(self):
            _spawning.pending = None  # this actor's, not one its constructor might start
            self._life.watchers.append(pending[1])
        self.ref = self.ref_class(self.actor_ref, self._life, type(self))
        self._handlers = _handlers_for(type(self))
        self.dropped_undecodable = 0
        self.dropped_unknown = 0
        self.started_at = time.monotonic()

    @classmethod
    def start(cls, *args: Any, **kwargs: Any) -> ActorRef:  # type: ignore[override]
        """Create the actor, start its thread, return our :class:`ActorRef`."""
        obj = cls(*args, **kwargs)
        pykka.ActorRegistry.register(obj.actor_ref)
        obj._start_actor_loop()
        return obj.ref

    # --- hooks for subclasses -------------------------------------------------

    def on_message(self, msg: dict[str, Any]) -> Any:
        handler = self._handlers.get(msg["kind"])
        if handler is None:
            raise UnknownMessage(msg["kind"])
        return handler(self, msg)

    def terminate(self, reason: str) -> None:
        """Clean-up on a normal stop, a shutdown or a crash (not after a kill)."""

    def should_yield(self) -> bool:
        """True when a long handler should return at its next safe point: an urgent message
        waits (``ask(..., urgent=True)``), a stop is on its way, or the actor was killed (its
        abandoned thread would otherwise burn a core until the work ends). Cheap enough to
        call between chunks of work; a handler that never calls it runs as before."""
        life = self._life
        return bool(life.urgent) or life.pending_reason is not None or life.dead

    # --- pykka plumbing ---------------------------------------------------------

    def on_receive(self, message: Any) -> Any:
        if self._life.dead:
            return None  # killed: never handle another message
        if isinstance(message, LocalCall):
            return self._handle_local(message)
        try:
            msg = decode_message(message) if isinstance(message, (bytes, bytearray)) else None
            if msg is None:
                raise DecodeError(f"message is {type(message).__name__}, not bytes")
        except DecodeError as exc:
            self.dropped_undecodable += 1
            log.warning("message dropped", actor=type(self).__name__, urn=self.actor_urn, error=str(exc))
            self._take_urgent(message)  # an urgent dict without a 'kind' waits no longer either
            return None
        self._take_urgent(msg)
        try:
            reply = self.on_message(msg)
        except UnknownMessage as exc:
            self.dropped_unknown += 1
            log.warning("unknown message kind dropped", actor=type(self).__name__, kind=msg["kind"])
            return Refusal(exc)  # an asker gets the error (a None reply would pass for an answer); a tell drops it
        except Exception as exc:
            self._crash(exc)
            raise
        except BaseException as exc:  # SystemExit, CancelledError, ...: this actor's crash alone (see HandlerExit)
            raise self._crash_exit(exc) from exc
        return None if reply is None else encode(reply)

    def _take_urgent(self, msg: Any) -> None:
        """A message taken (or dropped) is no longer a reason for a handler to yield."""
        if isinstance(msg, (bytes, bytearray)):
            try:
                msg = decode(msg)
            except DecodeError:
                return
        if isinstance(msg, dict):
            token = msg.pop(URGENT, None)
            if isinstance(token, int):  # anything else was never a token (a hostile sender's list)
                self._life.urgent.discard(token)

    def _handle_local(self, call: LocalCall) -> Any:
        try:
            return call.fn(self, *call.args)
        except Exception as exc:
            self._crash(exc)
            raise
        except BaseException as exc:  # SystemExit, CancelledError, ...: this actor's crash alone (see HandlerExit)
            raise self._crash_exit(exc) from exc

    def _crash_exit(self, exc: BaseException) -> HandlerExit:
        """This actor's crash for a BaseException that is no Exception (see :class:`HandlerExit`);
        the error raised in its place is an ordinary exception, so pykka fails this actor (and
        an asker's future) and no other."""
        err = HandlerExit(exc)
        self._crash(err)
        return err

    def exit(self, reason: str = NORMAL) -> None:
        """Stop this actor from inside, after the current message, with ``reason``."""
        with self._life.lock:
            self._life.pending_reason = reason
        self.stop()

    def _crash(self, exc: BaseException) -> None:
        reason = getattr(exc, "exit_reason", None) or f"exception: {type(exc).__name__}: {exc}"
        log.error("actor crashed", actor=type(self).__name__, urn=self.actor_urn, reason=reason)
        log.debug("crash traceback", urn=self.actor_urn, exc_info=exc)
        self.actor_stopped.set()  # ends pykka's loop after this message, tell or ask alike
        try:
            self.terminate(reason)
        except BaseException:  # any: one escaping to pykka would stop every actor (see HandlerExit)
            log.exception("terminate failed after crash", actor=type(self).__name__)
        _finalize(self._life, reason, self.ref)

    def on_stop(self) -> None:
        """pykka's stop hook. A subclass may override it (no need to call super): the base's
        :meth:`_finish_stop` runs after it anyway (see ``__init_subclass__``)."""
        self._finish_stop()

    def _finish_stop(self) -> None:
        """Run ``terminate`` and record the exit (once); a ``terminate`` that raises is logged."""
        if self._life.dead:
            return  # killed, or crashed and already finalized
        reason = self._life.pending_reason or NORMAL
        try:
            self.terminate(reason)
        except BaseException:  # logged; the exit is recorded all the same (see HandlerExit)
            log.exception("terminate failed", actor=type(self).__name__, urn=self.actor_urn, reason=reason)
        finally:
            _finalize(self._life, reason, self.ref)

    def on_failure(self, exc_type: Any, exc_value: Any, tb: Any) -> None:
        # Reached only if something outside on_message raised; keep death recorded.
        _finalize(self._life, f"exception: {exc_type.__name__}: {exc_value}", self.ref)


class LocalCall:
    """An in-process call run inside an actor's thread (framework use: supervisor management).

    Supervisor management carries Python objects (actor classes, constructor
    arguments) that have no wire form, so it bypasses the codec; everything an
    actor says to another actor goes through :func:`encode`.
    """

    __slots__ = ("args", "fn")

    def __init__(self, fn: Callable[..., Any], *args: Any) -> None:
        self.fn = fn
        self.args = args


class Refusal:
    """Returned by a local call to raise ``exc`` in the caller without crashing the actor."""

    __slots__ = ("exc",)

    def __init__(self, exc: Exception) -> None:
        self.exc = exc


def call_local(ref: ActorRef, fn: Callable[..., Any], *args: Any, timeout: float | None = None) -> Any:
    """Run ``fn(actor, *args)`` in the actor's thread and return its result.

    ``fn`` returns a :class:`Refusal` for an error that belongs to the caller (an
    unknown id, say): it is raised here and the actor keeps running. Any other
    exception is a crash of the actor, as for a message.
    """
    timeout = check_timeout(timeout)
    if ref._life.dead:
        raise ActorDeadError(f"{ref!r} is dead")
    try:
        result = ref._pref.ask(LocalCall(fn, *args), timeout=timeout)
    except pykka.Timeout as exc:
        raise TimeoutError(f"{ref!r} did not answer in {timeout}s") from exc
    if isinstance(result, Refusal):
        raise result.exc
    return result
