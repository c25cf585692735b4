"""GGUF files read without trusting them and without copying their tensor data.

``gguf.GGUFReader`` memory-maps the file and parses its metadata; each tensor here is a uint8
view of that mapping (private copy-on-write, so torch can wrap it as is), and its bytes are read
from disk only when something uses them. Every tensor's description is checked before any
view is made: its type must be one we can dequantize, its values whole blocks, its data inside
the file, aligned, and clear of the next tensor's. A file that fails gets a ``ModelFileError``
naming the file, the tensor and what to do.

Before that, every count and length the file gives (metadata entries, arrays, strings, tensors) is
checked against the bytes left and the maxima below before GGUFReader reads by it: it makes numpy
objects per array value (a 20 MB file claiming 20 million values took 6 minutes and 14 GB).
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, GGUFEndian, GGUFReader, GGUFValueType, ReaderField

from webui.engine.formats.files import open_model_file
from webui.engine.weights.quant import SUPPORTED_TYPES
from webui.errors import ModelFileError

MAX_DIMS = 4  # ggml's GGML_MAX_DIMS
MAX_METADATA_ENTRIES = 8192  # real files have dozens, plus a comfy.gguf.orig_shape per reshaped tensor
MAX_TENSORS = 16384  # real files have up to a few thousand (an SDXL UNet 1,700)
MAX_ARRAY_VALUES = 1_000_000  # all arrays together; a tokenizer's vocabulary is up to ~256k strings
# Array values parsed into numpy objects (GGUFReader's way: 0.6-1.3 kB and ~30 us each); arrays past this are checked
# and left out of the metadata (tokenizer vocabularies: nothing here reads them).
MAX_PARSED_VALUES = 65536
# The fewest bytes a metadata entry (key length, type, a 1-byte value) and a tensor info (name length, dimension
# count, type, offset) can take: a count that would need more than the bytes left is a lie.
MIN_ENTRY_BYTES = 8 + 4 + 1
MIN_TENSOR_INFO_BYTES = 8 + 4 + 4 + 8
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
    """A GGUF file's metadata (key -> value; arrays past ``MAX_PARSED_VALUES`` left out) and its tensors by name, in
    file order."""

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
        self._reading = "the header"  # what is being read, for messages
        self._array_values = self._parsed_values = 0
        with open_model_file(path) as file:  # a regular file (the mapping outlives the file object)
            super().__init__(file, mode="c")

    def _build_fields(self, offs: int, count: int) -> int:
        """GGUFReader's metadata step, each entry's key, type and value checked before they are read; an array
        past MAX_PARSED_VALUES is stepped over, not kept."""
        count = int(count)  # numpy's uint64 would wrap in the checks
        self._check_room(offs, count, MIN_ENTRY_BYTES, "metadata entries")
        self._check_most(count, MAX_METADATA_ENTRIES, "metadata entries")
        for _ in range(count):
            self._reading = "a metadata key"
            key_length, key_bytes = self._get_str(offs)
            key = str(bytes(key_bytes), "utf-8")
            self._reading = f"metadata {key[:80]!r}"
            raw_type = self._get(offs + 8 + len(key_bytes), np.uint32)
            value_at = offs + 12 + len(key_bytes)
            size, parts, data, types = self._value(value_at, int(raw_type[0]))
            if parts is not None:
                self._push_field(ReaderField(offs, key, [key_length, key_bytes, raw_type, *parts],
                                             [3 + i for i in data], types), skip_sum=True)
            offs = value_at + size
        self._reading = "the header"
        return offs

    def _value(self, offs: int, raw_type: int) -> tuple[int, list | None, list[int], list[GGUFValueType]]:
        """GGUFReader's (size, parts, data indices, types) of one value; an array's count is checked first, and
        one past MAX_PARSED_VALUES is only measured (parts None)."""
        if raw_type != GGUFValueType.ARRAY:
            return self._get_field_parts(offs, raw_type)
        item_type, count = int(self._get(offs, np.uint32)[0]), int(self._get(offs + 4, np.uint64)[0])
        self._check_room(offs + 12, count, self._item_bytes(item_type), "values")
        self._array_values += count
        self._check_most(self._array_values, MAX_ARRAY_VALUES, "array values (with the arrays before it)")
        if self._parsed_values + count <= MAX_PARSED_VALUES:
            self._parsed_values += count
            return self._get_field_parts(offs, raw_type)
        return 12 + self._array_bytes(offs + 12, item_type, count), None, [], []

    def _item_bytes(self, item_type: int) -> int:
        """The fewest bytes one array value of this type takes (a string: its length)."""
        if item_type == GGUFValueType.ARRAY:
            raise ModelFileError(f"{self.path.name}: {self._reading} is an array of arrays, which GGUF readers do "
                                 "not take. The file is corrupt.")
        if item_type == GGUFValueType.STRING:
            return 8
        return np.dtype(self.gguf_scalar_to_np[GGUFValueType(item_type)]).itemsize

    def _array_bytes(self, offs: int, item_type: int, count: int) -> int:
        """The size of an array that is not parsed; a string array's lengths are walked, each checked."""
        if item_type != GGUFValueType.STRING:
            return count * self._item_bytes(item_type)
        length = struct.Struct("<Q" if self.endianess == GGUFEndian.LITTLE else ">Q")
        at, end = offs, len(self.data)
        for _ in range(count):
            if at + 8 > end:
                break
            at += 8 + length.unpack_from(self.data, at)[0]
        else:
            if at <= end:
                return at - offs
        raise ModelFileError(f"{self.path.name}: the strings of {self._reading} run past the end of the file. The "
                             "file is truncated or corrupt.")

    def _get_str(self, offset: int) -> tuple[np.ndarray, np.ndarray]:
        """GGUFReader's string (length, bytes), its length checked against the bytes left first."""
        length = self._get(offset, np.uint64)
        self._check_room(offset + 8, int(length[0]), 1, "bytes of text")
        return length, self._get(offset + 8, np.uint8, length[0])

    def _build_tensor_info(self, offs: int, count: int) -> tuple[int, list[ReaderField]]:
        count = int(count)
        self._check_room(offs, count, MIN_TENSOR_INFO_BYTES, "tensors")
        self._check_most(count, MAX_TENSORS, "tensors")
        self._reading = "a tensor name"
        return super()._build_tensor_info(offs, count)

    def _check_room(self, offs: int, count: int, least_bytes: int, what: str) -> None:
        """Refuse a count from the file that the bytes left from ``offs`` cannot hold."""
        left = len(self.data) - offs
        if count * least_bytes > left:
            raise ModelFileError(f"{self.path.name}: {self._reading} claims {count} {what}, more than the "
                                 f"{max(left, 0)} bytes left in the file can hold. The file is truncated or corrupt.")

    def _check_most(self, count: int, most: int, what: str) -> None:
        if count > most:
            raise ModelFileError(f"{self.path.name}: {self._reading} claims {count} {what}, more than this app "
                                 f"reads ({most:,}). The file is corrupt or not a model.")

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        file_size, names = len(self.data), set()
        for info in fields:
            _, name_bytes, _, dims, raw_type, offset = info.parts
            name = str(bytes(name_bytes), "utf-8")
            if name in names:
                raise ModelFileError(f"{self.path.name} has two tensors named {name!r}. The file is corrupt.")
            names.add(name)
            self.described.append(self._describe(name, dims, int(raw_type[0]), start_offs, int(offset[0]),
                                                 file_size))
        _check_overlaps(self.path, self.described)

    def _describe(self, name: str, stored_dims: np.ndarray, raw_type: int, data_start: int, offset: int,
                  file_size: int) -> _Described:
        where = f"{self.path.name}: tensor {name!r}"
        qtype = _quant_type(where, raw_type)
        if not 1 <= len(stored_dims) <= MAX_DIMS:
            raise ModelFileError(f"{where} has {len(stored_dims)} dimensions; GGUF tensors have 1 to {MAX_DIMS}. "
                                 "The file is corrupt.")
        dims = stored_dims.tolist()
        if min(dims) < 1:
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
