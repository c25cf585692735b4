"""Triton kernels that unpack GGUF blocks on CUDA, launched directly.

A GGUF layer unpacks its weight at every call: some 500 calls in one Flux step. ``torch.compile``
fuses a type's unpacking into one kernel, but calling a compiled function costs ~140 us of host
time (guards, the compiled graph's wrapper, the launch), 70 ms a Flux step: more than the GPU
spends unpacking, enough to make a Q8_0 step wait on the host, and a streamed one lose the lead
that hides its copies. A Triton kernel launched directly costs a fraction of that.

Each kernel reads the packed blocks once and writes the weight once, computing in float32 and
rounding once: the float32 unpacking (bit-identical to ``gguf``'s) rounded to the compute dtype.
Types without a kernel here use the compiled ops (``quant._Fused``).
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType as Q

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled or eager ops are used
    triton = None

BLOCKS_PER_PROGRAM = 64  # ggml blocks of 32 values each program unpacks: 2048 values

if triton is not None:
    @triton.jit
    def _q8_0_kernel(src, dst, n_blocks, BLOCKS: tl.constexpr):
        """Q8_0: each 34-byte block is an fp16 scale and 32 int8 values."""
        rows = tl.program_id(0).to(tl.int64) * BLOCKS + tl.arange(0, BLOCKS)
        inside = rows < n_blocks
        block = src + rows * 34
        scale = tl.load(block.to(tl.pointer_type(tl.float16)), mask=inside, other=0.0).to(tl.float32)
        cols = tl.arange(0, 32)
        values = tl.load((block[:, None] + 2 + cols[None, :]).to(tl.pointer_type(tl.int8)), mask=inside[:, None],
                         other=0)
        unpacked = values.to(tl.float32) * scale[:, None]
        tl.store(dst + rows[:, None] * 32 + cols[None, :], unpacked.to(dst.dtype.element_ty), mask=inside[:, None])


def q8_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, 34) uint8 Q8_0 blocks on CUDA -> their (n, 32) values in ``dtype``."""
    blocks, n_blocks = blocks.contiguous(), blocks.shape[0]
    out = torch.empty((n_blocks, 32), dtype=dtype, device=blocks.device)
    if n_blocks:
        grid = (triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)
        _q8_0_kernel[grid](blocks, out, n_blocks, BLOCKS=BLOCKS_PER_PROGRAM)
    return out


KERNELS: dict[Q, Callable[[torch.Tensor, torch.dtype], torch.Tensor]] = {Q.Q8_0: q8_0} if triton is not None else {}
