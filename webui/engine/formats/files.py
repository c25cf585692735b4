"""Model files on disk: finding them, hashing them, and reading them without trusting them.

Every header is checked before a byte of tensor data is used, so a truncated or lying file
gives a clear message instead of a crash or a silent garbage load.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import stat
import struct
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import torch
from safetensors.torch import load_file

from webui.errors import ModelFileError, UserError

log = logging.getLogger(__name__)
V = TypeVar("V")
# A model part given as a file, or as tensors already read (a part of an all-in-one checkpoint).
Source = str | Path | Mapping[str, torch.Tensor]

CHECKPOINT_SUFFIXES = (".safetensors", ".gguf", ".ckpt", ".pt")
SAFETENSORS_DTYPE_BYTES = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
    "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "U16": 2, "U32": 4, "U64": 8,
}
MAX_HEADER_BYTES = 32 * 1024 * 1024  # real headers are kB to a few MB (kohya's tag counts); 100 MB took 13 s to refuse
NONBLOCK = getattr(os, "O_NONBLOCK", 0)  # not on Windows, which has no fifos to wait on
STATE_DICT_WRAPPERS = ("state_dict", "params_ema", "params")  # the first found holds the weights
HASH_CHUNK = 1 << 20  # hashing checks for an Interrupt between chunks of this many bytes


@dataclass(frozen=True)
class TensorInfo:
    """Name, dtype and shape of a stored tensor, known before its data is read."""

    dtype: str
    shape: tuple[int, ...]


@dataclass(frozen=True)
class CheckpointInfo:
    """One model the user can pick: a single file or a diffusers folder."""

    name: str
    path: Path
    kind: str  # "safetensors" | "gguf" | "ckpt" | "diffusers"

    @property
    def model_name(self) -> str:
        """A1111's "Model:" value: the file name without folder and extension."""
        return Path(self.name).stem if self.kind != "diffusers" else Path(self.name).name


def declared_resolution(info: CheckpointInfo) -> tuple[int, int] | None:
    """The (width, height) a single-file checkpoint says it was trained at (ModelSpec's ``modelspec.resolution``,
    e.g. "1024x1024"); None where it does not say."""
    if info.kind != "safetensors":
        return None
    try:
        text = read_safetensors_header(info.path)[1].get("modelspec.resolution", "")
    except ModelFileError:
        return None
    match = re.fullmatch(r"\s*(\d+)\s*x\s*(\d+)\s*", text)
    return (int(match.group(1)), int(match.group(2))) if match else None


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Tensor infos and metadata of a .safetensors file, after checking that its header is honest."""
    with open_model_file(path) as f:
        size = os.fstat(f.fileno()).st_size
        prefix = f.read(8)
        if len(prefix) < 8:
            raise ModelFileError(f"{path.name} is not a safetensors file: it is only {size} bytes long.")
        (header_len,) = struct.unpack("<Q", prefix)
        if header_len > MAX_HEADER_BYTES or 8 + header_len > size:
            # the length itself is not said: for a file that is no safetensors it is the file's first 8 bytes
            raise ModelFileError(
                f"{path.name} is truncated or not a safetensors file: the header length it starts with does not fit "
                f"the file ({size} bytes) or passes {MAX_HEADER_BYTES // 2**20} MB. Download or copy the file again."
            )
        try:
            header = json.loads(f.read(header_len))
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
            what = "nested too deep" if isinstance(e, RecursionError) else e
            raise ModelFileError(f"{path.name} has a corrupt safetensors header ({what}). Download it again.") from e
    metadata = (header.pop("__metadata__", None) or {}) if isinstance(header, dict) else None
    if not isinstance(metadata, dict):
        raise ModelFileError(f"{path.name} has a corrupt safetensors header. Download it again.")
    data_len = size - 8 - header_len
    tensors = {name: _checked_entry(path, name, entry, data_len) for name, entry in header.items()}
    return tensors, {_text(k): _text(v) for k, v in metadata.items()}


def _text(value: object) -> str:
    """A metadata value as text that can be sent as UTF-8: JSON's "\\ud800" escapes give lone surrogates, which made
    the JSON answers listing the file (/sdapi/v1/loras) fail."""
    return str(value).encode("utf-8", "replace").decode("utf-8")


def _unreadable(path: Path, error: OSError) -> ModelFileError:
    return ModelFileError(f"{path.name} could not be read ({error.strerror}).")


def open_model_file(path: Path) -> BinaryIO:
    """A model file opened for reading, refused unless it is a regular file: opening a fifo blocks until a writer
    comes, a device (a symlink to /dev/zero) never ends, and either can take a listed file's place. The open itself
    does not wait for a fifo (O_NONBLOCK, then cleared); the check is on what was opened."""
    try:
        fd = os.open(path, os.O_RDONLY | NONBLOCK | getattr(os, "O_BINARY", 0))
    except OSError as e:
        raise _unreadable(path, e) from e
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise ModelFileError(f"{path.name} is not a regular file (it is a fifo, a device, a folder or a link to one); "
                             "a model file must be a regular file.")
    if NONBLOCK:
        os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def _checked_entry(path: Path, name: str, entry: object, data_len: int) -> TensorInfo:
    try:
        dtype, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
    except (TypeError, KeyError, ValueError) as e:
        raise ModelFileError(f"{path.name}: the header entry for tensor {name!r} is malformed.") from e
    if not all(type(n) is int for n in (*shape, begin, end)):
        raise ModelFileError(f"{path.name}: the header entry for tensor {name!r} has sizes or offsets that are not "
                             "whole numbers. The file is corrupt.")
    if not isinstance(dtype, str) or dtype not in SAFETENSORS_DTYPE_BYTES:
        raise ModelFileError(f"{path.name}: tensor {name!r} has unknown dtype {dtype!r}.")
    count = 1
    for d in shape:
        count *= d
    if not (0 <= begin <= end) or end - begin != count * SAFETENSORS_DTYPE_BYTES[dtype]:
        raise ModelFileError(
            f"{path.name}: the header lies about tensor {name!r} (shape {list(shape)} {dtype} needs "
            f"{count * SAFETENSORS_DTYPE_BYTES[dtype]} bytes, offsets give {end - begin}). The file is corrupt."
        )
    if end > data_len:
        raise ModelFileError(
            f"{path.name} is truncated: tensor {name!r} ends at byte {end} of the data but only {data_len} "
            "bytes are there. Download or copy the file again."
        )
    return TensorInfo(dtype, shape)


def read_tensor_infos(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Names, dtypes and shapes of the tensors in a model file, plus its metadata, without loading data."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        return read_safetensors_header(path)
    if suffix == ".gguf":
        return _read_gguf_infos(path)
    if suffix in (".ckpt", ".pt"):
        sd = load_pickled_state_dict(path)
        return {k: TensorInfo(str(v.dtype), tuple(v.shape)) for k, v in sd.items()}, {}
    raise ModelFileError(f"{path.name}: unsupported file type {suffix!r}; use .safetensors, .gguf or .ckpt.")


def _read_gguf_infos(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    from webui.engine.formats.gguf_file import read_gguf

    contents = read_gguf(path)
    metadata = {"general.architecture": contents.architecture} if contents.architecture else {}
    return {name: TensorInfo(t.qtype.name, t.shape) for name, t in contents.tensors.items()}, metadata


def load_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a .safetensors file, or of a weights-only pickle (.ckpt, .pt, .pth, .bin), on the CPU (headers
    are checked first)."""
    suffix = path.suffix.lower()
    if suffix == ".safetensors":
        read_safetensors_header(path)
        try:
            return load_file(path, device="cpu")
        except Exception as e:  # safetensors raises its own error types
            raise ModelFileError(f"{path.name} could not be read ({e}). The file may be corrupt.") from e
    if suffix in (".ckpt", ".pt", ".pth", ".bin"):
        return load_pickled_state_dict(path)
    if suffix == ".gguf":
        raise ModelFileError(f"{path.name} is a GGUF file: it is read quantized by gguf_load, not as a state dict.")
    raise ModelFileError(f"{path.name}: unsupported file type {suffix!r}.")


def strip_prefix(mapping: Mapping[str, V], prefix: str) -> dict[str, V]:
    """The entries of ``mapping`` under ``prefix``, renamed without it; the others are left out."""
    return {k[len(prefix):]: v for k, v in mapping.items() if k.startswith(prefix)}


def source_infos(source: Source) -> tuple[str, dict[str, TensorInfo]]:
    """A name for messages and the tensor infos, read from the header before any data is."""
    if isinstance(source, Mapping):
        return "This state dict", {k: TensorInfo(str(v.dtype), tuple(v.shape)) for k, v in source.items()}
    path = Path(source)
    return path.name, read_tensor_infos(path)[0]


def source_tensors(source: Source, prefix: str = "") -> dict[str, torch.Tensor]:
    """The tensors under ``prefix`` (renamed without it), read from the file if ``source`` is one."""
    state_dict = source if isinstance(source, Mapping) else load_state_dict(Path(source))
    return strip_prefix(state_dict, prefix)


def load_pickled_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """A .ckpt/.pt state dict (``load_weights_pickle``)."""
    obj = load_weights_pickle(path)
    # A1111's checkpoints keep their weights under "state_dict"; BasicSR's upscalers under "params_ema" or "params"
    if isinstance(obj, dict):
        obj = next((obj[key] for key in STATE_DICT_WRAPPERS if isinstance(obj.get(key), dict)), obj)
    if not isinstance(obj, dict):
        raise ModelFileError(f"{path.name} does not hold a state dict.")
    return {k: v for k, v in obj.items() if isinstance(v, torch.Tensor)}


def load_weights_pickle(path: Path) -> Any:
    """What a .ckpt/.pt/.bin file holds, unpickled with ``weights_only=True``: a file that carries code is refused.
    The unpickler's message is not passed on: it quotes the file (the names of a global, a byte), which may be any
    file a symlink points at."""
    with open_model_file(path) as f:
        try:
            obj = torch.load(f, map_location="cpu", weights_only=True)
        except Exception as e:  # the unpickler fails on a file that is no pickle with IndexError, KeyError, ...
            raise ModelFileError(
                f"{path.name} was refused: it is not a plain weights pickle (it may carry code, or be corrupt). "
                "Only weights are loaded from .ckpt files. Convert it to .safetensors."
            ) from e
    return obj


def is_diffusers_folder(path: Path) -> bool:
    return (path / "model_index.json").is_file()


def walk_folder(root: Path) -> Iterator[tuple[Path, list[str], list[str]]]:
    """``os.walk`` of a models folder, the walk every listing of model files uses: symlinked folders are followed, but
    each real folder is entered once (a symlink loop was walked forever), names come sorted, and names that are not
    UTF-8 are left out (they made the JSON lists of models fail). A caller may empty the folder names to not go
    deeper."""
    seen: set[tuple[int, int]] = set()
    if not _first_visit(root, seen):
        return
    for dirpath, dirnames, filenames in os.walk(root, followlinks=True):
        here = Path(dirpath)
        dirnames[:] = [d for d in sorted(dirnames) if _is_text(here, d) and _first_visit(here / d, seen)]
        yield here, dirnames, [f for f in sorted(filenames) if _is_text(here, f)]


def _first_visit(folder: Path, seen: set[tuple[int, int]]) -> bool:
    """Whether this real folder (device, inode) is not walked yet, marking it walked; False for one that cannot be
    read."""
    try:
        status = folder.stat()
    except OSError:
        return False
    identity = (status.st_dev, status.st_ino)
    if identity in seen:
        return False
    seen.add(identity)
    return True


def _is_text(folder: Path, name: str) -> bool:
    try:
        name.encode("utf-8")
        return True
    except UnicodeEncodeError:
        log.warning("Skipped %r in %s: its name is not UTF-8.", name, folder)
        return False


def regular_files(root: Path) -> Iterator[Path]:
    """The regular files under a models folder (symlinks to them too), as ``walk_folder`` finds them: a fifo or a
    device (a symlink to /dev/zero) is never listed, its reading would not end."""
    for here, _, filenames in walk_folder(root):
        yield from (here / name for name in filenames if (here / name).is_file())


def find_checkpoints(roots: list[Path]) -> list[CheckpointInfo]:
    """Every checkpoint under the given folders, recursively, named by path relative to its root."""
    found: dict[str, CheckpointInfo] = {}
    for root in roots:
        for here, dirnames, filenames in walk_folder(root):
            if is_diffusers_folder(here) and here != root:
                name = here.relative_to(root).as_posix()
                found.setdefault(name, CheckpointInfo(name, here, "diffusers"))
                dirnames.clear()
                continue
            for path in (here / filename for filename in filenames):
                kind = checkpoint_kind(path) if path.is_file() else None
                if kind:
                    name = path.relative_to(root).as_posix()
                    found.setdefault(name, CheckpointInfo(name, path, kind))
    return sorted(found.values(), key=lambda c: c.name.lower())


def checkpoint_kind(path: Path) -> str | None:
    """CheckpointInfo's kind of a checkpoint file (by its suffix) or diffusers folder; None for anything else."""
    suffix = path.suffix.lower()
    if suffix in CHECKPOINT_SUFFIXES:
        return "ckpt" if suffix == ".pt" else suffix[1:]
    return "diffusers" if is_diffusers_folder(path) else None


def find_files(root: Path, suffixes: tuple[str, ...]) -> list[Path]:
    """Regular files with the given suffixes under a folder, recursively, sorted by name."""
    return sorted((p for p in regular_files(root) if p.suffix.lower() in suffixes), key=lambda p: str(p).lower())


class HashCache:
    """sha256 of model files, computed once and kept in a JSON file keyed by path, size and mtime.

    Hashing runs inside the job that needs the hash (a model's load, a LoRA's infotext) and stops at the job's
    Interrupt (``interrupted``, checked between chunks): a huge file never holds the queue past one."""

    def __init__(self, path: Path, interrupted: Callable[[], bool]):
        self.path = path
        self.interrupted = interrupted
        self._lock = threading.Lock()
        self._data = self._read()

    def _read(self) -> dict:
        try:
            return dict(json.loads(self.path.read_text(encoding="utf-8")).get("hashes", {}))
        except (OSError, ValueError, AttributeError, TypeError):
            return {}

    def sha256(self, target: Path) -> str:
        try:
            stamp = _stamp(target)
        except OSError as e:  # gone, or no longer readable, since it was listed
            raise _unreadable(target, e) from e
        key = str(target.resolve())
        with self._lock:
            entry = self._data.get(key)
            if entry and entry.get("stamp") == stamp:
                return entry["sha256"]
        digest = _sha256_of(target, self.interrupted)
        with self._lock:
            self._data[key] = {"stamp": stamp, "sha256": digest}
            self._save()
        return digest

    def cached(self, target: Path) -> str | None:
        """The hash if it is already known and still valid; never reads the file."""
        try:
            stamp = _stamp(target)
        except OSError:
            return None
        entry = self._data.get(str(target.resolve()))
        return entry["sha256"] if entry and entry.get("stamp") == stamp else None

    def _save(self) -> None:
        """Write the file, with what other processes wrote to it meanwhile (the engines of several Ray Serve
        replicas share one data dir): each writes its own temporary file, then replaces the file at once."""
        self._data = {**self._read(), **self._data}
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"hashes": self._data}, indent=1), encoding="utf-8")
        os.replace(tmp, self.path)


def short_hash(sha256: str) -> str:
    """A1111's model hash: the first 10 hex digits of the file's sha256."""
    return sha256[:10]


def checkpoint_title(info: CheckpointInfo, sha256: str | None) -> str:
    """A1111's checkpoint title: "name [hash]" once the hash is known, else the name."""
    return f"{info.name} [{short_hash(sha256)}]" if sha256 else info.name


def _stamp(target: Path) -> list:
    files = _hashed_files(target)
    return [[str(f.relative_to(target)) if target.is_dir() else "", f.stat().st_size, f.stat().st_mtime_ns] for f in files]


def _hashed_files(target: Path) -> list[Path]:
    if target.is_dir():
        return sorted(p for p in regular_files(target) if p.suffix in (".safetensors", ".bin", ".json"))
    return [target]


def _sha256_of(target: Path, interrupted: Callable[[], bool]) -> str:
    h = hashlib.sha256()
    for f in _hashed_files(target):
        with open_model_file(f) as fh:
            while chunk := fh.read(HASH_CHUNK):
                if interrupted():
                    raise UserError(f"Interrupted while hashing {target.name}; it is hashed from the start the next "
                                    "time it is used.")
                h.update(chunk)
    return h.hexdigest()
