"""Safetensors read and written a tensor at a time, so a merge holds a few tensors in memory, never a model.

Reading uses plain reads at each tensor's offsets, not a memory map: the pages read stay in the page cache (which the
kernel reclaims), not in the process. Writing puts the header first (every name, dtype and shape is known before any
data), then each tensor's bytes as it is made, into a temporary file renamed into place at the end, so a failed write
leaves no file behind."""
from __future__ import annotations

import json
import math
import os
import struct
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

DTYPE_NAMES = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64",
               torch.float8_e4m3fn: "F8_E4M3", torch.float8_e5m2: "F8_E5M2", torch.int64: "I64", torch.int32: "I32",
               torch.int16: "I16", torch.int8: "I8", torch.uint8: "U8", torch.bool: "BOOL"}
Planned = Mapping[str, tuple[torch.dtype, tuple[int, ...]]]  # name -> (dtype, shape), in the file's order
TORCH_DTYPES = {name: dtype for dtype, name in DTYPE_NAMES.items()}


class TensorReader:
    """One tensor at a time from a .safetensors file whose header ``read_safetensors_header`` checked already."""

    def __init__(self, path: Path):
        self._file = open(path, "rb")  # noqa: SIM115  (closed by close / the context manager)
        (length,) = struct.unpack("<Q", self._file.read(8))
        header = json.loads(self._file.read(length))
        header.pop("__metadata__", None)
        self._start = 8 + length
        self._entries = {name: (TORCH_DTYPES[entry["dtype"]], tuple(entry["shape"]), *entry["data_offsets"])
                         for name, entry in header.items()}

    def get_tensor(self, name: str) -> torch.Tensor:
        dtype, shape, begin, end = self._entries[name]
        data = bytearray(end - begin)
        self._file.seek(self._start + begin)
        if self._file.readinto(data) != len(data):
            raise OSError(f"{self._file.name} ended inside tensor {name}")
        if not data:
            return torch.empty(shape, dtype=dtype)
        return torch.frombuffer(data, dtype=dtype).reshape(shape)

    def close(self) -> None:
        self._file.close()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def write_safetensors(path: Path, planned: Planned, tensors: Iterable[tuple[str, torch.Tensor]],
                      metadata: Mapping[str, str]) -> Path:
    """Write the ``planned`` tensors, given one by one in that order by ``tensors``, with ``metadata``."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, (dtype, shape) in planned.items():
        size = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
        header[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)  # the data starts 8-byte aligned, as safetensors writes it
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(struct.pack("<Q", len(encoded)))
            f.write(encoded)
            names = iter(planned.items())
            for name, tensor in tensors:
                expected, (dtype, shape) = next(names)
                if name != expected or tensor.dtype != dtype or tuple(tensor.shape) != shape:
                    raise ValueError(f"{name} {tensor.dtype} {list(tensor.shape)} came where {expected} {dtype} "
                                     f"{list(shape)} was planned")
                f.write(memoryview(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()))
            if next(names, None) is not None:
                raise ValueError("fewer tensors came than were planned")
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
