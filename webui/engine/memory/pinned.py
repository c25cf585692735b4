"""Page-locked host memory of exactly the size asked for.

Weights streamed to the GPU every step must sit in page-locked ("pinned") host memory: copies
from it run at full bus speed and asynchronously, from ordinary memory at 40 % of that and
blocking. torch's own pinned memory (``Tensor.pin_memory``) comes from a caching allocator that
rounds every block up to a power of two and keeps freed blocks for reuse: a 40 MB weight takes
64 MB, a 70 MB one 128 MB, and nothing goes back to the system when a model is unloaded.

A ``PinnedBlock`` holds one unit's weights in one ordinary host allocation, page-locked in place
(``cudaHostRegister``): their bytes, each weight 64-byte aligned, the whole rounded to pages.
It is unlocked when the block object is collected; tensors carved from it stay valid, as
ordinary memory, for as long as anyone holds them.
"""
from __future__ import annotations

import ctypes
import functools
import mmap
import weakref
from collections.abc import Sequence

import torch

ALIGN = 64  # every weight starts on a cache line (and on any element size)
PAGE = mmap.PAGESIZE


def _aligned(nbytes: int, to: int) -> int:
    return -(-nbytes // to) * to


def _register(address: int, length: int) -> None:
    """Page-lock ``length`` bytes at ``address``, or raise MemoryError saying why the system refused.

    A refusal is also left as the CUDA runtime's "last error", which torch's check after its next kernel launch
    would raise as that kernel's failure; it is read away here. Where the runtime cannot be reached to do so, the
    refusal is a RuntimeError (not a MemoryError, which callers take as "go on unpinned")."""
    error = torch.cuda.cudart().cudaHostRegister(address, length, 0)
    if int(error):
        message = (f"Could not page-lock {length / 2**20:.0f} MB of host memory for streaming "
                   f"({torch.cuda.cudart().cudaGetErrorString(error)}): free some RAM, or set Swap Location "
                   "(forge_pin_shared_memory) to CPU.")
        runtime = _cuda_runtime()
        if runtime is None:
            raise RuntimeError(message)
        runtime.cudaGetLastError()
        raise MemoryError(message)


@functools.cache
def _cuda_runtime() -> ctypes.CDLL | None:
    """The CUDA runtime library torch uses (the one already mapped into this process), or None where it is not a
    separate library that can be found (a static build, no /proc)."""
    try:
        with open("/proc/self/maps") as maps:
            paths = sorted({line.split()[-1] for line in maps if "/libcudart" in line})
    except OSError:
        return None
    for path in paths:
        try:
            return ctypes.CDLL(path)
        except OSError:
            continue
    return None


def _unregister(address: int) -> None:
    torch.cuda.cudart().cudaHostUnregister(address)


class PinnedBlock:
    """One page-locked host allocation of ``nbytes`` (rounded up to pages), carved into tensors in order."""

    def __init__(self, nbytes: int):
        length = _aligned(max(nbytes, 1), PAGE)
        self._storage = torch.empty(length + PAGE, dtype=torch.uint8)  # room to start on a page boundary
        start = -self._storage.data_ptr() % PAGE
        self._bytes = self._storage[start:start + length]
        address = self._bytes.data_ptr()
        _register(address, length)
        weakref.finalize(self, _unregister, address).atexit = False  # at exit the process's memory goes anyway
        self._used = 0

    @property
    def nbytes(self) -> int:
        return self._bytes.numel()

    def holds(self, tensor: torch.Tensor) -> bool:
        """Whether ``tensor``'s bytes lie in this block (torch's ``is_pinned`` knows only its own allocator's)."""
        start = self._bytes.data_ptr()
        return start <= tensor.data_ptr() and tensor.data_ptr() + tensor.nbytes <= start + self.nbytes

    def take(self, shape: torch.Size, dtype: torch.dtype) -> torch.Tensor:
        """The next free, aligned span of the block as an uninitialised tensor."""
        nbytes = torch.Size(shape).numel() * dtype.itemsize
        span = self._bytes[self._used:self._used + nbytes]
        if span.numel() < nbytes:
            raise ValueError(f"pinned block of {self.nbytes} bytes is full")
        self._used += _aligned(nbytes, ALIGN)
        return span.view(dtype).view(shape)


def pinned_copies(tensors: Sequence[torch.Tensor]) -> tuple[PinnedBlock, list[torch.Tensor]]:
    """Copies of ``tensors`` in one new page-locked block. Copies from the GPU are asynchronous: synchronise
    before reading them. The caller keeps the block as long as the copies should stay page-locked."""
    block = PinnedBlock(sum(_aligned(t.numel() * t.element_size(), ALIGN) for t in tensors))
    copies = [block.take(t.shape, t.dtype).copy_(t, non_blocking=True) for t in tensors]
    return block, copies
