"""GGUF files read without trusting them and without copying their tensor data.

``gguf.GGUFReader`` memory-maps the file and parses its metadata; each tensor here is a uint8
view of that mapping (private copy-on-write, so torch can wrap it as is), and its bytes are read
from disk only when something uses them. Every tensor's description is checked before any
view is made: its type must be one we can dequantize, its values whole blocks, its data inside
the file, aligned, and clear of the next tensor's. A file that fails gets a ``ModelFileError``
naming the file, the tensor and what to do.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFReader

from webui.engine.files import open_model_file
from webui.engine.quant import SUPPORTED_TYPES
from webui.errors import ModelFileError

MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
ORIG_SHAPE_KEY = "comfy.gguf.orig_shape."  # ComfyUI-GGUF: the shape of a tensor stored reshaped to rows of 256
ARCHITECTURE_KEY = "general.architecture"
# What GGUFReader raises on a malformed file (it checks little itself: sizes come from the file).
READER_ERRORS = (ValueError, TypeError, KeyError, IndexError, OverflowError, UnicodeDecodeError, AssertionError,
                 struct.error)


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file: its name as stored, type, shapes in PyTorch order, and its bytes.

    ``stored_shape`` is the shape in the file; ``shape`` is the tensor's own, different only when a
    converter reshaped it to quantize (``comfy.gguf.orig_shape``). ``data`` is a 1-D uint8 view of
    the memory-mapped file.
    """

    name: str
    qtype: GGMLQuantizationType
    shape: tuple[int, ...]
    stored_shape: tuple[int, ...]
    data: np.ndarray

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)


@dataclass
class GGUFContents:
    """A GGUF file's metadata (key -> value) and its tensors by name, in file order."""

    path: Path
    metadata: dict[str, Any]
    tensors: dict[str, GGUFTensor] = field(default_factory=dict)

    @property
    def architecture(self) -> str | None:
        value = self.metadata.get(ARCHITECTURE_KEY)
        return value if isinstance(value, str) else None

    def tensor_bytes(self) -> int:
        return sum(t.nbytes for t in self.tensors.values())


@dataclass(frozen=True)
class _Described:
    """A tensor as its info record describes it, checked against the file."""

    name: str
    qtype: GGMLQuantizationType
    stored_shape: tuple[int, ...]
    start: int
    nbytes: int


class _CheckedReader(GGUFReader):
    """GGUFReader whose tensor infos are checked, then kept as ``described`` instead of being mapped.

    GGUFReader's own tensor step reshapes views of the file without checking that they fit,
    which fails with an unrelated numpy message on a truncated file and accepts types we cannot
    read. Overriding that step (the parsed infos arrive as fields of parts: name length, name,
    dimension count, dimensions, type, offset) puts the checks before any view exists.
    """

    def __init__(self, path: Path):
        self.path = path
        self.described: list[_Described] = []
        with open_model_file(path) as file:  # a regular file (the mapping outlives the file object)
            super().__init__(file, mode="c")

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        file_size, names = len(self.data), set()
        for info in fields:
            _, name_bytes, _, dims, raw_type, offset = info.parts
            name = str(bytes(name_bytes), "utf-8")
            if name in names:
                raise ModelFileError(f"{self.path.name} has two tensors named {name!r}. The file is corrupt.")
            names.add(name)
            self.described.append(self._describe(name, dims.tolist(), int(raw_type[0]), start_offs, int(offset[0]),
                                                 file_size))
        _check_overlaps(self.path, self.described)

    def _describe(self, name: str, dims: list[int], raw_type: int, data_start: int, offset: int,
                  file_size: int) -> _Described:
        where = f"{self.path.name}: tensor {name!r}"
        qtype = _quant_type(where, raw_type)
        if not 1 <= len(dims) <= MAX_DIMS or min(dims) < 1:
            raise ModelFileError(f"{where} has an impossible shape {list(reversed(dims))}. The file is corrupt.")
        block_size, type_size = GGML_QUANT_SIZES[qtype]
        if dims[0] % block_size:
            raise ModelFileError(f"{where}: rows of {dims[0]} values are not whole {qtype.name} blocks of "
                                 f"{block_size}; its byte count cannot match its shape. The file is corrupt.")
        nbytes = math.prod(dims) // block_size * type_size
        start = data_start + offset
        if offset % self.alignment:
            raise ModelFileError(f"{where} starts at offset {offset}, not a multiple of the file's alignment "
                                 f"{self.alignment}. The file is corrupt.")
        if start >= file_size:
            raise ModelFileError(f"{where} starts at byte {start}, past the end of the {file_size}-byte file. "
                                 "The file is truncated or corrupt: download or copy it again.")
        if start + nbytes > file_size:
            raise ModelFileError(f"{self.path.name} is truncated: tensor {name!r} needs bytes {start} to "
                                 f"{start + nbytes} but the file ends at {file_size}. Download or copy it again.")
        return _Described(name, qtype, tuple(reversed(dims)), start, nbytes)


def _quant_type(where: str, raw_type: int) -> GGMLQuantizationType:
    supported = ", ".join(t.name for t in SUPPORTED_TYPES)
    try:
        qtype = GGMLQuantizationType(raw_type)
    except ValueError:
        raise ModelFileError(f"{where} has unknown GGUF type id {raw_type}. The file is corrupt or from a newer "
                             f"tool; supported types are {supported}.") from None
    if qtype not in SUPPORTED_TYPES:
        raise ModelFileError(f"{where} is quantized as {qtype.name}, which this version cannot read. Supported "
                             f"types are {supported}: pick a file quantized to one of them.")
    return qtype


def _check_overlaps(path: Path, described: list[_Described]) -> None:
    """Tensors whose data overlap mean the offsets or the shapes lie."""
    ordered = sorted(described, key=lambda d: d.start)
    for before, after in pairwise(ordered):
        if before.start + before.nbytes > after.start:
            raise ModelFileError(f"{path.name}: tensor {before.name!r} ({before.qtype.name}, "
                                 f"{list(before.stored_shape)}) runs into tensor {after.name!r}: their offsets "
                                 "and sizes disagree. The file is corrupt.")


def _logical_shape(path: Path, described: _Described, metadata: dict[str, Any]) -> tuple[int, ...]:
    declared = metadata.get(ORIG_SHAPE_KEY + described.name)
    if declared is None:
        return described.stored_shape
    if (not isinstance(declared, list) or not all(isinstance(d, int) and d > 0 for d in declared)
            or math.prod(declared) != math.prod(described.stored_shape)):
        raise ModelFileError(f"{path.name}: the original shape {declared} given for tensor {described.name!r} does "
                             f"not hold its {math.prod(described.stored_shape)} values. The file is corrupt.")
    return tuple(declared)


def read_gguf(path: str | Path) -> GGUFContents:
    """The metadata and tensors of a GGUF file, every tensor checked, none of their data read yet."""
    path = Path(path)
    try:
        reader = _CheckedReader(path)
        metadata = {name: f.contents() for name, f in reader.fields.items() if not name.startswith("GGUF.")}
    except ModelFileError:
        raise
    except OSError as e:
        raise ModelFileError(f"{path.name} could not be mapped into memory ({e.strerror}).") from e
    except READER_ERRORS as e:  # its message is not passed on: it may quote the file (a byte, a key)
        raise ModelFileError(f"{path.name} is not a readable GGUF file ({type(e).__name__} reading its header). It "
                             "may be truncated or corrupt: download or copy it again.") from e
    contents = GGUFContents(path, metadata)
    for described in reader.described:
        data = reader.data[described.start:described.start + described.nbytes]
        shape = _logical_shape(path, described, metadata)
        contents.tensors[described.name] = GGUFTensor(described.name, described.qtype, shape, described.stored_shape,
                                                      data)
    return contents
