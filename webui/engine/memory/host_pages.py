"""Give back a model file's pages once its bytes have been copied elsewhere.

Safetensors and GGUF files are memory-mapped: a tensor's bytes are read from disk when first
touched, and the pages read stay in this process's resident set for as long as the mapping
lives, which is as long as any tensor of the file does. When the memory manager copies a weight
to the GPU, or into pinned memory to stream it, those pages become a second copy of the same
bytes, and host RSS would grow to the files' size plus every copy made.

``release`` tells the kernel (``madvise(MADV_DONTNEED)``) that this process no longer needs the
whole pages under tensors whose bytes now live elsewhere. They leave the resident set but stay in
the page cache while memory lasts, so reading the tensor again (a model reloaded) costs no disk
access and returns the file's bytes. Only mappings of model files are touched. The caller
guarantees the tensors are no longer used as they are: a page of a private mapping that was
written to in place would read back as the file has it. Linux only; elsewhere nothing happens.

The C heap is the other place freed host memory can stay resident: ``limit_heap_arenas`` and
``trim_heap`` keep glibc from holding on to what a model that left had allocated.
"""
from __future__ import annotations

import ctypes
import mmap
import sys
from bisect import bisect_right
from collections.abc import Iterable
from functools import cache

import torch

MODEL_FILE_SUFFIXES = (".safetensors", ".sft", ".gguf")
MADV_DONTNEED = 4  # <sys/mman.h> on Linux


def model_file_mappings() -> list[tuple[int, int]]:
    """(start, end) of this process's mappings of model files, sorted; empty where /proc is not there."""
    try:
        with open("/proc/self/maps") as maps:
            lines = maps.readlines()
    except OSError:
        return []
    spans = []
    for line in lines:
        fields = line.split(maxsplit=5)
        if len(fields) == 6 and fields[5].rstrip("\n").lower().endswith(MODEL_FILE_SUFFIXES):
            start, end = (int(x, 16) for x in fields[0].split("-"))
            spans.append((start, end))
    return sorted(spans)


@cache
def _madvise():
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None, use_errno=True)
    libc.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
    return libc.madvise


def release(tensors: Iterable[torch.Tensor], spans: list[tuple[int, int]] | None = None) -> int:
    """Drop from the resident set the whole pages of model-file mappings under ``tensors``; the bytes released.

    Tensors not on the CPU, not contiguous, or not in a mapped model file (copies, pinned memory) are skipped.
    ``spans`` are ``model_file_mappings()`` when the caller releases tensor by tensor (reading them costs ~1 ms).
    """
    tensors = [t for t in tensors if t.device.type == "cpu" and t.numel() and t.is_contiguous()]
    madvise = _madvise()
    if not tensors or madvise is None:  # nothing to give back: /proc is not read
        return 0
    spans = model_file_mappings() if spans is None else spans
    if not spans:
        return 0
    starts = [s for s, _ in spans]
    released = 0
    for tensor in tensors:
        begin = tensor.data_ptr()
        i = bisect_right(starts, begin) - 1
        if i < 0 or begin >= spans[i][1]:
            continue
        end = min(begin + tensor.numel() * tensor.element_size(), spans[i][1])
        first = -(-begin // mmap.PAGESIZE) * mmap.PAGESIZE  # inward: a neighbour's bytes on a shared page stay
        last = end // mmap.PAGESIZE * mmap.PAGESIZE
        if last > first and madvise(first, last - first, MADV_DONTNEED) == 0:
            released += last - first
    return released


def cast(tensor: torch.Tensor, dtype: torch.dtype, spans: list[tuple[int, int]]) -> torch.Tensor:
    """``tensor.to(dtype)``; where that made a copy, the original's file pages are released (see ``release``)."""
    copy = tensor.to(dtype)
    if copy is not tensor:
        release([tensor], spans)
    return copy


M_ARENA_MAX = -8  # glibc's <malloc.h>
HEAP_ARENAS = 2


@cache
def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    libc = ctypes.CDLL(None)
    return libc if hasattr(libc, "malloc_trim") and hasattr(libc, "mallopt") else None  # musl has neither


def limit_heap_arenas() -> None:
    """Let the C heap keep at most HEAP_ARENAS arenas. glibc gives threads arenas of their own (up to 8 a core),
    and every model load runs on new threads (transformers reads weights with a pool of four): memory freed in
    one arena is not reused by the next load's threads, and switching models grows the resident set by several
    MB a load before it levels off. Large blocks (weights) are mmapped and unaffected."""
    libc = _glibc()
    if libc is not None:
        libc.mallopt(M_ARENA_MAX, HEAP_ARENAS)


def trim_heap() -> None:
    """Give the C heap's free pages back to the system (glibc's ``malloc_trim``). Memory a model freed otherwise
    stays in this process's resident set, kept by the allocator for reuse, and switching models looks like a leak."""
    libc = _glibc()
    if libc is not None:
        libc.malloc_trim(0)
