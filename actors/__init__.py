"""The actor framework: msgpack actors on pykka, names, monitors, topics, supervision."""

from actors.base import (
    KILLED,
    NOPROC,
    NORMAL,
    SHUTDOWN,
    Actor,
    ActorDeadError,
    ActorRef,
    UnknownMessage,
    demonitor,
    is_abnormal,
    monitor,
    spawn_monitor,
)
from actors.messages import DecodeError, decode, encode
from actors.registry import Registry, register, send, unregister, whereis
from actors.topics import Topics, publish, subscribe, unsubscribe

__all__ = [
    "KILLED",
    "NOPROC",
    "NORMAL",
    "SHUTDOWN",
    "Actor",
    "ActorDeadError",
    "ActorRef",
    "DecodeError",
    "Registry",
    "Topics",
    "UnknownMessage",
    "decode",
    "demonitor",
    "encode",
    "is_abnormal",
    "monitor",
    "publish",
    "register",
    "send",
    "spawn_monitor",
    "subscribe",
    "unregister",
    "unsubscribe",
    "whereis",
]
