"""The wire format of every message between a client and a server. No pickle anywhere.

A frame is::

    u32 header_length | u32 body_length | header (UTF-8 JSON object) | body (raw tensor bytes)

The header carries plain fields plus `"tensors"`, a list of `{"name", "dtype", "shape"}` entries
whose bytes follow one another in the body, in order, each in native little-endian layout.
Decoding checks every field against what the header promises before a tensor is built.
"""

from __future__ import annotations

import math
import struct
from typing import Any

import numpy
import orjson
import torch

from swarm.errors import ProtocolError

FRAME_PREFIX = struct.Struct("<II")
Buffer = bytes | numpy.ndarray  # what a frame is sent from
MAX_HEADER_BYTES = 1 << 20
MAX_BODY_BYTES = 1 << 31

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "int64": torch.int64,
    "int32": torch.int32,
    "uint8": torch.uint8,
    "bool": torch.bool,
}
DTYPE_NAMES = {dtype: name for name, dtype in DTYPES.items()}
FLOAT_DTYPES = ("float32", "bfloat16", "float16")  # what hidden states may travel in
# numpy's dtype for each: a frame's tensors are built from its bytes by numpy, which costs a third less per tensor
# than torch's own `frombuffer` and `view` (numpy has no bfloat16: its bytes are read as int16, then viewed)
NUMPY_DTYPES: dict[torch.dtype, numpy.dtype] = {
    dtype: numpy.dtype("int16" if dtype is torch.bfloat16 else name) for name, dtype in DTYPES.items()
}


def dtype_name(dtype: torch.dtype) -> str:
    try:
        return DTYPE_NAMES[dtype]
    except KeyError:
        raise ProtocolError(f"dtype {dtype} cannot travel on the wire; supported: {sorted(DTYPES)}") from None


def encode(fields: dict[str, Any], tensors: dict[str, torch.Tensor] | None = None) -> list[Buffer]:
    """Builds one frame as a list of buffers, ready for `socket.sendmsg` (tensor bytes are not copied)."""
    descriptors, buffers, body_length = [], [], 0
    for name, tensor in (tensors or {}).items():
        if tensor.requires_grad or not tensor.is_cpu or not tensor.is_contiguous():
            tensor = tensor.detach().cpu().contiguous()
        dtype = tensor.dtype
        descriptors.append({"name": name, "dtype": dtype_name(dtype), "shape": [*tensor.shape]})
        if nbytes := tensor.nbytes:  # the tensor's own memory, through numpy (which has no bfloat16: its bits then)
            buffers.append((tensor.view(torch.int16) if dtype is torch.bfloat16 else tensor).numpy())
            body_length += nbytes
    header = orjson.dumps({**fields, "tensors": descriptors}, option=orjson.OPT_NON_STR_KEYS | orjson.OPT_SERIALIZE_NUMPY)
    return [FRAME_PREFIX.pack(len(header), body_length), header, *buffers]


def decode_prefix(prefix: bytes) -> tuple[int, int]:
    header_length, body_length = FRAME_PREFIX.unpack(prefix)
    if header_length > MAX_HEADER_BYTES:
        raise ProtocolError(f"header of {header_length} bytes exceeds the limit of {MAX_HEADER_BYTES}")
    if body_length > MAX_BODY_BYTES:
        raise ProtocolError(f"body of {body_length} bytes exceeds the limit of {MAX_BODY_BYTES}")
    return header_length, body_length


def decode(header_bytes: bytes | bytearray | memoryview, body: bytearray) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """Parses a header and body into plain fields and tensors, or raises `ProtocolError` saying why."""
    try:
        fields = orjson.loads(header_bytes)
    except orjson.JSONDecodeError as error:  # also: not UTF-8, nested too deeply, an integer past 64 bits
        raise ProtocolError(f"header is not valid JSON: {error}") from None
    if not isinstance(fields, dict):
        raise ProtocolError("header must be a JSON object")
    descriptors = fields.pop("tensors", [])
    if not isinstance(descriptors, list):
        raise ProtocolError("header field 'tensors' must be a list")
    tensors, offset = {}, 0
    for descriptor in descriptors:
        name, dtype, shape = _check_descriptor(descriptor)
        count = math.prod(shape)
        nbytes = count * dtype.itemsize
        if offset + nbytes > len(body):
            raise ProtocolError(f"tensor {name!r} needs {nbytes} bytes but the body ends at {len(body)}")
        if count:
            array = numpy.frombuffer(body, dtype=NUMPY_DTYPES[dtype], count=count, offset=offset).reshape(shape)
            tensor = torch.from_numpy(array)
            tensors[name] = tensor.view(torch.bfloat16) if dtype is torch.bfloat16 else tensor
        else:
            tensors[name] = torch.empty(shape, dtype=dtype)
        offset += nbytes
    if offset != len(body):
        raise ProtocolError(f"body has {len(body) - offset} bytes that no tensor describes")
    return fields, tensors


def is_int(value: Any) -> bool:
    """Whether a decoded JSON value is an integer (JSON's `true` decodes to a Python bool, which is an int too)."""
    return isinstance(value, int) and not isinstance(value, bool)


def _check_descriptor(descriptor: Any) -> tuple[str, torch.dtype, list[int]]:
    if not isinstance(descriptor, dict):
        raise ProtocolError("each tensor descriptor must be an object")
    name, dtype, shape = descriptor.get("name"), descriptor.get("dtype"), descriptor.get("shape")
    if not isinstance(name, str):
        raise ProtocolError("tensor descriptor needs a string 'name'")
    if not isinstance(dtype, str) or dtype not in DTYPES:
        raise ProtocolError(f"tensor {name!r} has unsupported dtype {dtype!r}; supported: {sorted(DTYPES)}")
    if not isinstance(shape, list) or len(shape) > 8 or not all(type(dim) is int and 0 <= dim < 2**31 for dim in shape):
        raise ProtocolError(f"tensor {name!r} has an invalid shape {shape!r}")
    return name, DTYPES[dtype], shape
