"""The wire format: every actor message is a msgpack-encoded dict with a ``kind``.

Bytes on the wire keep the tree location-transparent: the same messages can
cross a process or a machine later. numpy arrays travel as one msgpack ext type
(code 1) holding ``dtype``, ``shape`` and the raw bytes, and decode as read-only
views of the received buffer (no copy beyond msgpack's own ext payload).
"""

from __future__ import annotations

import struct
import threading
from typing import Any, Protocol

import msgpack
import numpy as np

NDARRAY_EXT = 1
"""msgpack ext type code used for numpy arrays."""

_HEADER = struct.Struct("<BB")  # dtype-string length, ndim


class BytesReceiver(Protocol):
    """What an encoded message can be handed to: an actor ref, a name in a registry (the
    pipeline's downstream targets are typed with it, so a target may be either, or a proxy
    in another process later). Returns False when the message was not delivered."""

    def tell_bytes(self, data: bytes) -> bool: ...


class Receiver(Protocol):
    """What a message can be sent to as a dict, urgently or not (``ActorRef.ask``): an actor
    ref or a name in a registry. Returns False when the message was not delivered."""

    def tell(self, msg: dict[str, Any], *, urgent: bool = False) -> bool: ...


class DecodeError(ValueError):
    """Raised when bytes are not a valid message (not msgpack, or not a dict with a kind)."""


def _pack_array(arr: np.ndarray) -> msgpack.ExtType:
    if arr.dtype.hasobject:
        raise TypeError(f"numpy array of dtype {arr.dtype} cannot travel in a message")
    if not arr.flags.c_contiguous:
        arr = arr.copy(order="C")
    dt = arr.dtype.str.encode("ascii")
    head = _HEADER.pack(len(dt), arr.ndim) + dt + struct.pack(f"<{arr.ndim}q", *arr.shape)
    return msgpack.ExtType(NDARRAY_EXT, head + arr.tobytes())


def _default(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        return _pack_array(obj)
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, (set, frozenset)):
        try:
            return sorted(obj)
        except TypeError:  # members of several types: grouped by type, each group in order
            return sorted(obj, key=lambda v: (type(v).__name__, repr(v)))
    raise TypeError(f"cannot encode object of type {type(obj).__name__}")


def _ext_hook(code: int, data: bytes) -> Any:
    if code != NDARRAY_EXT:
        return msgpack.ExtType(code, data)
    dt_len, ndim = _HEADER.unpack_from(data, 0)
    off = _HEADER.size
    dtype = np.dtype(data[off : off + dt_len].decode("ascii"))
    off += dt_len
    shape = struct.unpack_from(f"<{ndim}q", data, off)
    off += 8 * ndim
    return np.frombuffer(data, dtype=dtype, offset=off).reshape(shape)


INT_MIN, UINT_MAX = -(2**63), 2**64 - 1
"""The integers msgpack carries (int64 and uint64)."""

MAX_DEPTH = 1024
"""Deepest nesting a message may have, counting each dict, list or tuple (the message itself is
depth 1): msgpack's own limit, on packing and on unpacking alike. A deeper or cyclic message
raises ``TypeError`` naming the path where the limit was passed."""


def _show_path(parts: list[str]) -> str:
    """A field path (``.key`` and ``[i]`` segments) for an error message; a very deep one is
    shortened in the middle."""
    if len(parts) > 12:
        parts = [*parts[:6], f"...({len(parts) - 10} levels)...", *parts[-4:]]
    return "".join(parts).removeprefix(".")


class _BadKey:
    """Stands, in :func:`_find_bad_field`'s walk, for a dict key msgpack cannot encode."""

    __slots__ = ("key",)

    def __init__(self, key: object) -> None:
        self.key = key


def _find_bad_field(obj: Any) -> str | None:
    """Name the first value msgpack cannot encode (error path only).

    Iterative, bounded by :data:`MAX_DEPTH` and aware of cycles: a message that refers to
    itself, or one nested 100,000 deep, is reported as such rather than by a RecursionError.
    """
    # each entry: (value, path segments, ids of the containers above it)
    stack: list[tuple[Any, list[str], frozenset[int]]] = [(obj, [], frozenset())]
    while stack:
        value, parts, above = stack.pop()
        if isinstance(value, (dict, list, tuple)):
            if id(value) in above:
                return f"{_show_path(parts) or '(message)'} (cyclic: contains a {type(value).__name__} it is in)"
            if len(above) >= MAX_DEPTH:
                return f"{_show_path(parts)} (nested deeper than MAX_DEPTH={MAX_DEPTH})"
            inner = above | {id(value)}
            children: list[tuple[Any, list[str], frozenset[int]]] = []
            if isinstance(value, dict):
                for k, v in value.items():
                    if (not isinstance(k, (str, bytes, int, float, bool)) and k is not None) or _too_big(k):
                        children.append((_BadKey(k), [*parts, f"[{_brief_repr(k)}]"], inner))
                        break  # nothing after a bad key is looked at
                    children.append((v, [*parts, f".{k}"], inner))
            else:
                children = [(v, [*parts, f"[{i}]"], inner) for i, v in enumerate(value)]
            stack.extend(reversed(children))  # first child on top: the first bad field is named
            continue
        if _too_big(value):
            return f"{_show_path(parts)} (an integer of {value.bit_length()} bits: msgpack carries at most 64)"
        if value is None or isinstance(value, (str, bytes, bytearray, memoryview, int, float, bool)):
            continue
        if isinstance(value, _BadKey):
            if _too_big(value.key):
                return f"{_show_path(parts)} (a key that is an integer of {value.key.bit_length()} bits)"
            return f"{_show_path(parts)} (key of type {type(value.key).__name__})"
        if isinstance(value, np.ndarray):
            if value.dtype.hasobject:
                return f"{_show_path(parts)} (numpy dtype {value.dtype})"
            continue
        if isinstance(value, (set, frozenset)) and len(above) >= MAX_DEPTH:  # travels as a list
            return f"{_show_path(parts)} (nested deeper than MAX_DEPTH={MAX_DEPTH})"
        if isinstance(value, (set, frozenset)):  # travels as a list: its members are looked at as one's
            stack.extend((v, [*parts, f"{{{_brief_repr(v)}}}"], above | {id(value)}) for v in value)
            continue
        if isinstance(value, np.generic):
            continue
        return f"{_show_path(parts)} (type {type(value).__name__})"
    return None


def _too_big(value: Any) -> bool:
    """An integer msgpack cannot carry (outside int64 and uint64)."""
    return isinstance(value, int) and not isinstance(value, bool) and not INT_MIN <= value <= UINT_MAX


def _brief_repr(value: Any, limit: int = 40) -> str:
    """``repr(value)`` cut to ``limit`` characters: a path names a key or member, not all of it."""
    text = repr(value) if not _too_big(value) else f"<{value.bit_length()}-bit int>"
    return text if len(text) <= limit else text[: limit - 3] + "..."


_local = threading.local()


def _packer() -> msgpack.Packer:
    # msgpack.packb builds a Packer per call (about 3x the cost of packing a small
    # message); one Packer per thread is reused instead (Packers are not thread-safe).
    p = getattr(_local, "packer", None)
    if p is None:
        p = _local.packer = msgpack.Packer(default=_default, use_bin_type=True)
    return p


def encode(msg: Any) -> bytes:
    """Encode a message; raise ``TypeError`` naming the field that cannot travel."""
    try:
        return _packer().pack(msg)
    except (TypeError, ValueError, OverflowError) as exc:
        _local.packer = None  # never reuse a packer that failed half-way
        where = _find_bad_field(msg)
        if where:
            raise TypeError(f"message field {where} cannot be encoded: {exc}") from None
        raise TypeError(f"message cannot be encoded: {exc}") from None


def decode(data: bytes) -> Any:
    """Decode bytes produced by :func:`encode`; raise :class:`DecodeError` on garbage."""
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except Exception as exc:  # noqa: BLE001 - msgpack raises several unrelated types
        raise DecodeError(f"undecodable message ({len(data)} bytes): {exc}") from None


def decode_message(data: bytes) -> dict[str, Any]:
    """Decode and check the envelope shape: a dict whose ``kind`` is a string."""
    msg = decode(data)
    if not isinstance(msg, dict):
        raise DecodeError(f"message is a {type(msg).__name__}, expected a dict with a 'kind'")
    kind = msg.get("kind")
    if not isinstance(kind, str):
        raise DecodeError("message has no string 'kind'")
    return msg
