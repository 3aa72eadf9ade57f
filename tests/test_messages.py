import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

from actors.messages import DecodeError, decode, decode_message, encode

json_like = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats(allow_nan=False) | st.text() | st.binary(),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5),
    max_leaves=20,
)


@given(st.dictionaries(st.text(), json_like, max_size=6))
def test_roundtrip_plain_values(payload):
    msg = {"kind": "x", **payload} if "kind" not in payload else payload
    out = decode(encode(msg))
    assert out == msg


@given(
    hnp.arrays(
        dtype=st.sampled_from([np.float64, np.float32, np.int64, np.int32, np.uint8, np.bool_, np.int16]),
        shape=hnp.array_shapes(min_dims=0, max_dims=3, max_side=6),
    )
)
def test_roundtrip_numpy_arrays(arr):
    out = decode(encode({"kind": "batch", "a": arr}))["a"]
    assert out.dtype == arr.dtype
    assert out.shape == arr.shape
    np.testing.assert_array_equal(out, arr)


def test_decoded_array_is_a_view_not_a_copy():
    arr = np.arange(1000, dtype=np.float64)
    out = decode(encode({"kind": "b", "a": arr}))["a"]
    assert not out.flags.owndata  # a view over the received buffer
    assert not out.flags.writeable
    assert isinstance(out.base, (bytes, memoryview)) or out.base is not None


def test_non_contiguous_and_big_endian_arrays():
    a = np.arange(20, dtype=">i4").reshape(4, 5)[:, ::2]
    out = decode(encode({"kind": "b", "a": a}))["a"]
    np.testing.assert_array_equal(out, a)


def test_numpy_scalars_travel_as_python_numbers():
    out = decode(encode({"kind": "s", "f": np.float32(1.5), "i": np.int64(7), "b": np.bool_(True)}))
    assert out == {"kind": "s", "f": 1.5, "i": 7, "b": True}


def test_unencodable_field_is_named():
    with pytest.raises(TypeError, match=r"params\.bad"):
        encode({"kind": "x", "params": {"ok": 1, "bad": object()}})
    with pytest.raises(TypeError, match=r"items\[1\]"):
        encode({"kind": "x", "items": [1, lambda: 0]})
    with pytest.raises(TypeError, match="object"):
        encode({"kind": "x", "arr": np.array([object()], dtype=object)})


def test_an_integer_past_64_bits_is_named_with_its_size():
    with pytest.raises(TypeError, match=r"params\.lr \(an integer of 71 bits: msgpack carries at most 64\)"):
        encode({"kind": "x", "params": {"lr": 2**70}})
    with pytest.raises(TypeError, match=r"d\[<66-bit int>\] \(a key that is an integer of 66 bits\)"):
        encode({"kind": "x", "d": {2**65: 1}})
    edges = {"kind": "x", "lo": -(2**63), "hi": 2**64 - 1}
    assert decode(encode(edges)) == edges


@given(st.sets(st.one_of(st.none(), st.integers(-(2**63), 2**63 - 1), st.text(max_size=5), st.booleans())))
def test_a_set_of_mixed_types_travels_in_a_fixed_order(members):
    out = decode(encode({"kind": "x", "s": members}))["s"]
    assert sorted(map(repr, out)) == sorted(map(repr, members)) and len(out) == len(members)
    assert out == decode(encode({"kind": "x", "s": set(reversed(list(members)))}))["s"]


def test_a_set_member_that_cannot_travel_is_named():
    with pytest.raises(TypeError, match=r"tags\{<object object at .*>\} \(type object\)"):
        encode({"kind": "x", "tags": {1, object()}})


@pytest.mark.parametrize(
    "data", [b"\xc1", b"", b"\x93\x01\x02", encode([1, 2]), encode({"nokind": 1}), encode({"kind": 3})]
)
def test_decode_message_rejects_garbage(data):
    with pytest.raises(DecodeError):
        decode_message(data)
