"""numpy arrays <-> ``loupe.v1.Tensor``: dtype name, shape, raw little-endian C-order bytes."""

from __future__ import annotations

import numpy as np

from loupe.errors import LoupeError

#: dtypes a Tensor may carry
DTYPES = (
    "bool",
    "uint8",
    "int8",
    "int16",
    "int32",
    "int64",
    "float16",
    "float32",
    "float64",
)


def to_tensor(array, message=None):
    """An array -> a Tensor message (``message`` is filled in when given)."""
    from loupe.service.proto.loupe.v1 import tensor_pb2

    array = np.asarray(array)
    if array.dtype.name not in DTYPES:
        raise LoupeError(f"cannot send dtype {array.dtype.name}; use one of {', '.join(DTYPES)}")
    little = array.astype(array.dtype.newbyteorder("<"), copy=False)
    out = tensor_pb2.Tensor() if message is None else message
    out.dtype = array.dtype.name
    out.shape[:] = list(array.shape)
    out.data = np.ascontiguousarray(little).tobytes()
    return out


def from_tensor(tensor, name: str = "tensor") -> np.ndarray:
    """A Tensor message -> a (writable) array; LoupeError when dtype, shape and bytes disagree."""
    if tensor.dtype not in DTYPES:
        raise LoupeError(f"{name}: unknown dtype {tensor.dtype!r}; send one of {', '.join(DTYPES)}")
    shape = tuple(int(s) for s in tensor.shape)
    if any(s < 0 for s in shape):
        raise LoupeError(f"{name}: negative dimension in shape {list(shape)}")
    dtype = np.dtype(tensor.dtype).newbyteorder("<")
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(tensor.data) != expected:
        raise LoupeError(
            f"{name}: shape {list(shape)} of {tensor.dtype} needs {expected} bytes, got "
            f"{len(tensor.data)}; send the C-order elements as little-endian bytes"
        )
    array = np.frombuffer(tensor.data, dtype=dtype).reshape(shape)
    return array.astype(array.dtype.newbyteorder("="))  # a native-order copy
