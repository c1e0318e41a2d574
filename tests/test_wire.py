import json
import struct

import numpy
import pytest
import torch

from swarm import wire
from swarm.errors import ProtocolError


def roundtrip(fields, tensors):
    frame = b"".join(wire.encode(fields, tensors))
    header_length, body_length = wire.decode_prefix(frame[:8])
    header = frame[8 : 8 + header_length]
    body = bytearray(frame[8 + header_length :])
    assert len(body) == body_length
    return wire.decode(header, body)


@pytest.mark.parametrize("dtype", list(wire.DTYPES.values()))
def test_every_dtype_roundtrips(dtype):
    tensor = (torch.arange(24) % 7).reshape(2, 3, 4).to(dtype)
    fields, tensors = roundtrip({"method": "x", "n": 3}, {"a": tensor, "empty": torch.empty(0, 5, dtype=dtype)})
    assert fields == {"method": "x", "n": 3}
    assert torch.equal(tensors["a"], tensor) and tensors["a"].dtype == dtype
    assert tensors["empty"].shape == (0, 5)


def test_fields_roundtrip_as_json_gives_them():
    fields = {"text": "naïve ✓", "nested": {"a": [1, 2.5, None, True]}, "numbers": {1: "one"}, "pair": (3, 4),
              "mean": numpy.float64(0.25), "count": numpy.int64(7)}  # fmt: skip
    assert roundtrip(fields, {})[0] == json.loads(json.dumps({**fields, "mean": 0.25, "count": 7}))


def test_non_contiguous_tensor_roundtrips():
    tensor = torch.randn(4, 6).t()
    assert torch.equal(roundtrip({}, {"t": tensor})[1]["t"], tensor)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_views_and_scalars_send_their_own_bytes(dtype):
    whole = torch.randn(4, 6).to(dtype)
    tensors = {"rows": whole[1:3], "scalar": whole[2, 5], "grad": torch.ones(3, requires_grad=True)}
    sent = roundtrip({}, tensors)[1]
    assert torch.equal(sent["rows"], whole[1:3]) and torch.equal(sent["scalar"], whole[2, 5])
    assert sent["scalar"].shape == () and torch.equal(sent["grad"], torch.ones(3))


def frame_parts(header: dict, body: bytes = b""):
    return json.dumps(header).encode(), bytearray(body)


@pytest.mark.parametrize(
    "header, body, message",
    [
        ({"tensors": [{"name": "x", "dtype": "complex64", "shape": [1]}]}, b"\0" * 8, "unsupported dtype"),
        ({"tensors": [{"name": "x", "dtype": "float32", "shape": [4]}]}, b"\0" * 8, "body ends"),
        ({"tensors": [{"name": "x", "dtype": "float32", "shape": [1]}]}, b"\0" * 8, "no tensor describes"),
        ({"tensors": [{"name": "x", "dtype": "float32", "shape": [-1]}]}, b"", "invalid shape"),
        ({"tensors": [{"name": 3, "dtype": "float32", "shape": [1]}]}, b"\0" * 4, "string 'name'"),
        ({"tensors": "nope"}, b"", "must be a list"),
    ],
)
def test_malformed_frames_are_rejected(header, body, message):
    with pytest.raises(ProtocolError, match=message):
        wire.decode(*frame_parts(header, body))


def test_header_must_be_a_json_object():
    with pytest.raises(ProtocolError, match="not valid JSON"):
        wire.decode(b"\xff{", bytearray())
    with pytest.raises(ProtocolError, match="JSON object"):
        wire.decode(b"[1, 2]", bytearray())


def test_oversized_frames_are_rejected_before_reading():
    with pytest.raises(ProtocolError, match="header"):
        wire.decode_prefix(struct.pack("<II", wire.MAX_HEADER_BYTES + 1, 0))
