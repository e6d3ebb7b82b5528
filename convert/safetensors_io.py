"""Streaming safetensors reading and writing, one tensor at a time.

The format is an 8-byte little-endian header length, a JSON header (name -> dtype, shape and
[begin, end) byte offsets into the data that follows, plus optional `__metadata__`), then the data.
Reading parses the header ourselves so that a truncated or inconsistent file is named precisely,
and reads each tensor with a plain positioned read: memory-mapping would leave every touched page
of the (multi-GB) shards counted in the process's resident memory. Writing lays out the header from
the planned tensor list first, then appends each tensor's bytes as it is produced, so a shard never
has to be held in memory.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
import struct
from typing import Any, BinaryIO, Iterator, Sequence

import ml_dtypes
import numpy as np

DTYPES: dict[str, np.dtype] = {
    "F64": np.dtype(np.float64), "F32": np.dtype(np.float32), "F16": np.dtype(np.float16),
    "BF16": np.dtype(ml_dtypes.bfloat16), "I64": np.dtype(np.int64), "I32": np.dtype(np.int32),
    "I16": np.dtype(np.int16), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8), "BOOL": np.dtype(np.bool_),
}
NAMES: dict[np.dtype, str] = {dtype: name for name, dtype in DTYPES.items()}
MAX_HEADER_BYTES = 100_000_000  # the reference library's own limit


class SafetensorsFormatError(ValueError):
    """A file that is not a complete, consistent safetensors file."""


@dataclasses.dataclass(frozen=True)
class Entry:
    """Where one tensor's bytes are in a safetensors file."""

    dtype: str
    shape: tuple[int, ...]
    begin: int  # absolute file offsets
    end: int


def dtype_name(dtype: Any) -> str:
    """The safetensors name (F32, BF16, ...) of a numpy dtype."""
    try:
        return NAMES[np.dtype(dtype)]
    except KeyError:
        raise ValueError(f"dtype {np.dtype(dtype)} has no safetensors name") from None


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    seen: dict[str, Any] = {}
    for key, value in pairs:
        if key in seen:
            raise SafetensorsFormatError(f"its header lists tensor {key} twice")
        seen[key] = value
    return seen


def read_header(path: str | os.PathLike[str]) -> tuple[dict[str, Entry], dict[str, str]]:
    """(name -> Entry, metadata) of a safetensors file; SafetensorsFormatError if it is damaged.

    Checks that the header is valid JSON without repeated names, that each tensor's byte range
    matches its dtype and shape, and that the file holds all the data the header promises.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise SafetensorsFormatError(f"truncated: {size} bytes, too short for a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > MAX_HEADER_BYTES:
            raise SafetensorsFormatError(f"not a safetensors file (header length {length})")
        if 8 + length > size:
            raise SafetensorsFormatError(f"truncated: the header needs {8 + length} bytes, the file has {size}")
        try:
            header = json.loads(f.read(length), object_pairs_hook=_no_duplicates)
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise SafetensorsFormatError(f"its header is not valid JSON ({err})") from None
    if not isinstance(header, dict):
        raise SafetensorsFormatError("its header is not a JSON object")
    metadata = header.pop("__metadata__", None) or {}
    start = 8 + length
    entries: dict[str, Entry] = {}
    problems = []
    for name, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(d) for d in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            problems.append(f"{name}: malformed header entry {info!r}")
            continue
        itemsize = DTYPES[dtype].itemsize if dtype in DTYPES else None
        if itemsize is not None and end - begin != int(np.prod(shape, dtype=np.int64)) * itemsize:
            problems.append(f"{name}: {end - begin} bytes for a {dtype} tensor of shape {list(shape)}")
        entries[name] = Entry(dtype, shape, start + int(begin), start + int(end))
    if problems:
        raise SafetensorsFormatError("inconsistent header: " + "; ".join(problems))
    data_end = max((e.end for e in entries.values()), default=start)
    if data_end > size:
        raise SafetensorsFormatError(f"truncated: the header promises {data_end} bytes, the file has {size}")
    return entries, metadata


def read_tensor(path: str | os.PathLike[str], entry: Entry) -> np.ndarray:
    """One tensor, read into fresh memory (numpy; bfloat16 through ml_dtypes)."""
    if entry.dtype not in DTYPES:
        raise ValueError(f"dtype {entry.dtype} is not supported")
    dtype = DTYPES[entry.dtype]
    count = (entry.end - entry.begin) // dtype.itemsize
    array = np.fromfile(path, dtype=dtype, count=count, offset=entry.begin)
    if array.size != count:
        raise SafetensorsFormatError(f"truncated: got {array.size} of {count} values")
    return array.reshape(entry.shape)


class StreamingWriter:
    """Writes a safetensors file whose tensors are known in advance, then streamed in that order."""

    def __init__(self, path: str | os.PathLike[str], plan: Sequence[tuple[str, str, tuple[int, ...]]],
                 metadata: dict[str, str] | None = None):
        """`plan`: (name, safetensors dtype, shape) of every tensor, in the order they will come."""
        self.path = os.fspath(path)
        self._plan = list(plan)
        header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
        offset = 0
        for name, dtype, shape in self._plan:
            nbytes = int(np.prod(shape, dtype=np.int64)) * DTYPES[dtype].itemsize
            header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
            offset += nbytes
        self.nbytes = offset
        encoded = json.dumps(header, separators=(",", ":")).encode()
        encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned
        self._file: BinaryIO = open(self.path, "wb")
        with self._naming_errors():
            self._file.write(struct.pack("<Q", len(encoded)) + encoded)
        self._next = 0

    def write(self, name: str, array: np.ndarray) -> None:
        expected, dtype, shape = self._plan[self._next]
        if name != expected or dtype_name(array.dtype) != dtype or tuple(array.shape) != tuple(shape):
            raise ValueError(f"{self.path}: got {name} {array.dtype}{list(array.shape)}, "
                             f"expected {expected} {dtype}{list(shape)}")
        with self._naming_errors():
            self._file.write(np.ascontiguousarray(array).reshape(-1).view(np.uint8).data)
        self._next += 1

    @contextlib.contextmanager
    def _naming_errors(self) -> Iterator[None]:
        """A failed write (a full disk, say) names this file (Python's file writes name none)."""
        try:
            yield
        except OSError as err:
            if err.filename is None:
                raise OSError(err.errno, err.strerror, self.path) from err
            raise

    def close(self) -> None:
        with self._naming_errors():
            self._file.close()
        if self._next != len(self._plan):
            raise ValueError(f"{self.path}: {len(self._plan) - self._next} planned tensors were not written")

    def __enter__(self) -> "StreamingWriter":
        return self

    def __exit__(self, *exc: Any) -> None:
        if exc[0] is None:
            self.close()
        else:
            with contextlib.suppress(OSError):  # the first error is the one to report
                self._file.close()
