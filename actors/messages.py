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
        return sorted(obj)
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


def _find_bad_field(obj: Any, path: str = "") -> str | None:
    """Walk a message to name the first value msgpack cannot encode (error path only)."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            if not isinstance(k, (str, bytes, int, float, bool)) and k is not None:
                return f"{path}[{k!r}] (key of type {type(k).__name__})"
            found = _find_bad_field(v, f"{path}.{k}" if path else str(k))
            if found:
                return found
        return None
    if isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            found = _find_bad_field(v, f"{path}[{i}]")
            if found:
                return found
        return None
    if obj is None or isinstance(obj, (str, bytes, bytearray, memoryview, int, float, bool)):
        return None
    if isinstance(obj, np.ndarray):
        return f"{path} (numpy dtype {obj.dtype})" if obj.dtype.hasobject else None
    if isinstance(obj, (np.generic, set, frozenset)):
        return None
    return f"{path} (type {type(obj).__name__})"


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
