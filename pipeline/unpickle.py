"""Unpickling with an allow-list of inert stand-ins: nothing is imported and nothing is executed.

A pickle names the callables that rebuild its objects (`module.name` globals) and the unpickler
calls them; a hostile file names `os.system` or `builtins.eval`. Here `find_class` returns only
the stand-ins of an allow-list, defined in our code, and refuses every other global with the
caller's error type before anything runs. Before that, the opcodes are walked without running
them (`prescan`), so that a damaged or hostile stream cannot inflate memo indices or length
prefixes into huge allocations.

`NUMPY` is the allow-list of numpy arrays of plain numeric dtypes (what the CIFAR python release
holds, pipeline.data.cifar): the array's bytes are copied by `np.frombuffer`, never interpreted
as objects. pipeline.models.safe_pickle builds its own list (tensors, NVlabs records) on the same
`prescan`.
"""

from __future__ import annotations

import io
import pickle
import pickletools
import struct
from collections.abc import Mapping

import numpy as np

MEMO_PUTS = ("PUT", "BINPUT", "LONG_BINPUT")


def prescan(f: io.BytesIO, where: str, error: type[Exception]) -> None:
    """Walk the pickle's opcodes without running them, then rewind.

    The C unpickler trusts two kinds of numbers that a damaged or hostile file can inflate: memo
    indices (it grows its memo table to the index) and length prefixes (it allocates the length
    before reading). Here a memo index must not exceed the number of opcodes before it, and every
    length must be backed by bytes that are there (pickletools reads them).
    """
    start = f.tell()
    try:
        for count, (opcode, arg, _) in enumerate(pickletools.genops(f)):
            if opcode.name in MEMO_PUTS and (not isinstance(arg, int) or not 0 <= arg <= count):
                raise error(f"{where}: memo index {arg!r} at opcode {count} is out of range; the file is damaged")
    except error:
        raise
    except Exception as exc:  # pickletools reports a damaged stream as ValueError, EOFError, ...
        raise error(f"{where} is not a readable pickle: {type(exc).__name__}: {exc}") from None
    f.seek(start)


class _Allowlisted(pickle.Unpickler):
    def __init__(self, file, where: str, allowed: Mapping[tuple[str, str], object], error: type[Exception],
                 what: str, encoding: str):
        super().__init__(file, encoding=encoding)
        self.where, self.allowed, self.error, self.what = where, allowed, error, what

    def find_class(self, module: str, name: str):
        try:
            return self.allowed[(module, name)]
        except KeyError:
            raise self.error(f"{self.where} refers to {module}.{name}, which {self.what} never needs; refusing to "
                             f"load it (it could run code)") from None

    def persistent_load(self, pid):
        raise self.error(f"{self.where} has a persistent id where none is expected")


def load_allowlisted(data: bytes, where: str, allowed: Mapping[tuple[str, str], object], error: type[Exception],
                     what: str = "such a file", encoding: str = "bytes"):
    """The object of the pickle `data`, rebuilt only from the stand-ins of `allowed`; `error`
    (naming `where`) for any other global or a damaged stream. encoding: how Python 2 strings
    load ("bytes" keeps them bytes)."""
    f = io.BytesIO(data)
    prescan(f, where, error)
    try:
        return _Allowlisted(f, where, allowed, error, what, encoding).load()
    except error:
        raise
    except (pickle.UnpicklingError, EOFError, TypeError, ValueError, AttributeError, IndexError, KeyError,
            struct.error, RecursionError, OverflowError, MemoryError) as exc:
        raise error(f"{where} is not a readable pickle: {type(exc).__name__}: {exc}") from None


# --- numpy arrays ------------------------------------------------------------------------------

DTYPES = frozenset(f"{k}{n}" for k, sizes in (("u", (1, 2, 4, 8)), ("i", (1, 2, 4, 8)), ("f", (2, 4, 8)))
                   for n in sizes) | {"b1"}
"""The dtypes an array may have: unsigned and signed integers, floats, bools (never objects)."""


class _NdarrayType:
    """Stands for numpy.ndarray where a pickle passes the class as an argument."""


class _Dtype:
    """numpy.dtype(name, align, copy), its byte order set by BUILD; `.numpy` is the real dtype."""

    def __init__(self, name, align=False, copy=True):
        if isinstance(name, bytes):
            name = name.decode("latin1")
        if not isinstance(name, str) or name not in DTYPES:
            raise TypeError(f"array dtype {name!r} is not a plain number type")
        self.name, self.order = name, "|" if name in ("u1", "i1", "b1") else "<"

    def __setstate__(self, state) -> None:
        order = state[1] if isinstance(state, tuple) and len(state) > 1 else "|"
        if isinstance(order, bytes):
            order = order.decode("latin1")
        if order not in ("<", ">", "|", "="):
            raise ValueError(f"unknown byte order {order!r}")
        self.order = order

    @property
    def numpy(self) -> np.dtype:
        return np.dtype(self.order.replace("|", "=") + self.name)


class _Array:
    """numpy.core.multiarray._reconstruct(ndarray, (0,), b"b"); BUILD gives (version, shape,
    dtype, fortran order, raw bytes), copied by np.frombuffer."""

    def __setstate__(self, state) -> None:
        if not isinstance(state, tuple) or len(state) != 5:
            raise ValueError("malformed array state")
        _, shape, dtype, fortran, raw = state
        if not isinstance(dtype, _Dtype):
            raise TypeError("array without a plain dtype")
        if isinstance(raw, str):  # a Python 2 string loaded with encoding="latin1"
            raw = raw.encode("latin1")
        if not isinstance(raw, (bytes, bytearray)) or not all(isinstance(n, int) and n >= 0 for n in shape):
            raise TypeError("array data is not a byte string")
        self.value = _frombuffer(raw, dtype, tuple(shape), "F" if fortran else "C")


def _reconstruct(cls, shape, typecode):
    if cls is not _NdarrayType:
        raise TypeError("only numpy.ndarray is rebuilt")
    return _Array()


def _frombuffer(buf, dtype, shape, order):
    """numpy.core.numeric._frombuffer (protocol 5 arrays): a copy, the dtype and shape checked."""
    if not isinstance(dtype, _Dtype):
        raise TypeError("array without a plain dtype")
    buf = bytes(buf)
    count = int(np.prod(shape, dtype=np.int64)) if shape else 1
    if count * dtype.numpy.itemsize != len(buf):
        raise ValueError(f"array of shape {tuple(shape)} and dtype {dtype.name} does not match its {len(buf)} bytes")
    return np.frombuffer(buf, dtype=dtype.numpy).reshape(shape, order=order).copy()


def _encode(text, encoding="latin1"):
    """_codecs.encode: how protocol 2 writes Python 3 bytes."""
    if not isinstance(text, str) or encoding != "latin1":
        raise TypeError(f"unexpected _codecs.encode({type(text).__name__}, {encoding!r})")
    return text.encode("latin1")


def _numpy() -> dict[tuple[str, str], object]:
    table: dict[tuple[str, str], object] = {("numpy", "ndarray"): _NdarrayType, ("numpy", "dtype"): _Dtype,
                                            ("_codecs", "encode"): _encode}
    for core in ("numpy.core", "numpy._core"):  # numpy 1 and numpy 2 names
        table[(f"{core}.multiarray", "_reconstruct")] = _reconstruct
        table[(f"{core}.numeric", "_frombuffer")] = _frombuffer
    return table


NUMPY: Mapping[tuple[str, str], object] = _numpy()


def arrays(obj):
    """`obj` with every rebuilt array (`_Array` stand-in) replaced by its numpy array."""
    if isinstance(obj, _Array):
        if not hasattr(obj, "value"):
            raise ValueError("an array without its data")
        return obj.value
    if isinstance(obj, dict):
        return {k: arrays(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [arrays(v) for v in obj]
    if isinstance(obj, tuple):
        return tuple(arrays(v) for v in obj)
    return obj

