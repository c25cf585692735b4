"""Triton kernels that unpack GGUF blocks on CUDA, launched directly.

A GGUF layer unpacks its weight at every call: some 500 calls in one Flux step. ``torch.compile``
fuses a type's unpacking into one kernel, but calling a compiled function costs ~140 us of host
time (guards, the compiled graph's wrapper, the launch), 70 ms a Flux step: more than the GPU
spends unpacking, enough to make a Q8_0 step wait on the host, and a streamed one lose the lead
that hides its copies. A Triton kernel launched directly costs a fraction of that.

Each kernel reads the packed blocks once and writes the weight once, computing in float32 and
rounding once: the float32 unpacking (bit-identical to ``gguf``'s) rounded to the compute dtype.
Types without a kernel here use the compiled ops (``quant._Fused``).

A LoRA on a Q8_0 layer is added by a second kernel while the weight is unpacked: ``up @ down``
for a tile is a small ``tl.dot`` on data the program already holds, so the merged weight costs
little more than the plain one (H100, Flux's 12288x3072 MLP layer over 4032 tokens, rank 32:
+28 us on the layer's 434 us; unpacking then ``addmm_`` onto the weight: +87 us; adding
``up(down(x))`` to the output: +183 us — ``benchmarks.lora_layers``).
"""
from __future__ import annotations

import logging
from collections.abc import Callable

import torch
from gguf import GGMLQuantizationType as Q

try:
    import triton
    import triton.language as tl
except ImportError:  # CPU-only installs: the compiled or eager ops are used
    triton = None

log = logging.getLogger(__name__)

BLOCKS_PER_PROGRAM = 64  # ggml blocks of 32 values each program unpacks: 2048 values
TILE_ROWS, TILE_BLOCKS = 64, 2  # a tile of the weight each program unpacks with a low-rank update (H100: fastest)

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

    @triton.jit
    def _q8_0_plus_low_rank_kernel(src, up, down, dst, n_rows, n_cols, rank, TILE_ROWS: tl.constexpr,
                                   TILE_BLOCKS: tl.constexpr):
        """A (rows, cols) Q8_0 weight plus ``up @ down`` ((rows, rank) @ (rank, cols)): each program one tile of
        TILE_ROWS rows by TILE_BLOCKS blocks of 32 columns. The rank is a plain argument (one compiled kernel for
        every LoRA), taken 16 at a time: tl.dot's smallest size."""
        rows = tl.program_id(0).to(tl.int64) * TILE_ROWS + tl.arange(0, TILE_ROWS)
        blocks = tl.program_id(1).to(tl.int64) * TILE_BLOCKS + tl.arange(0, TILE_BLOCKS)
        row_in, block_in = rows < n_rows, blocks < n_cols // 32
        at = src + (rows[:, None] * (n_cols // 32) + blocks[None, :]) * 34  # (rows, blocks)
        inside = row_in[:, None] & block_in[None, :]
        scale = tl.load(at.to(tl.pointer_type(tl.float16)), mask=inside, other=0.0).to(tl.float32)
        lane = tl.arange(0, 32)
        values = tl.load((at[:, :, None] + 2 + lane[None, None, :]).to(tl.pointer_type(tl.int8)),
                         mask=inside[:, :, None], other=0)
        weight = tl.reshape(values.to(tl.float32) * scale[:, :, None], (TILE_ROWS, TILE_BLOCKS * 32))
        cols = tl.program_id(1).to(tl.int64) * TILE_BLOCKS * 32 + tl.arange(0, TILE_BLOCKS * 32)
        col_in = cols < n_cols
        for start in range(0, rank, 16):
            k = start + tl.arange(0, 16)
            k_in = k < rank
            u = tl.load(up + rows[:, None] * rank + k[None, :], mask=row_in[:, None] & k_in[None, :], other=0.0)
            d = tl.load(down + k[:, None] * n_cols + cols[None, :], mask=k_in[:, None] & col_in[None, :], other=0.0)
            weight += tl.dot(u, d, input_precision="ieee")
        tl.store(dst + rows[:, None] * n_cols + cols[None, :], weight.to(dst.dtype.element_ty),
                 mask=row_in[:, None] & col_in[None, :])


def q8_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """(n, 34) uint8 Q8_0 blocks on CUDA -> their (n, 32) values in ``dtype``."""
    blocks, n_blocks = blocks.contiguous(), blocks.shape[0]
    out = torch.empty((n_blocks, 32), dtype=dtype, device=blocks.device)
    if n_blocks:
        grid = (triton.cdiv(n_blocks, BLOCKS_PER_PROGRAM),)
        _q8_0_kernel[grid](blocks, out, n_blocks, BLOCKS=BLOCKS_PER_PROGRAM)
    return out


def q8_0_plus_low_rank(blocks: torch.Tensor, shape: tuple[int, int], up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """A (rows, cols) weight from its Q8_0 blocks on CUDA, plus ``up @ down``, in up's dtype: in one pass, the
    float32 sum rounded once. ``cols`` must be a multiple of 32 (whole blocks per row); all three contiguous."""
    rows, cols = shape
    out = torch.empty(shape, dtype=up.dtype, device=blocks.device)
    grid = (triton.cdiv(rows, TILE_ROWS), triton.cdiv(cols // 32, TILE_BLOCKS))
    _q8_0_plus_low_rank_kernel[grid](blocks, up, down, out, rows, cols, up.shape[1], TILE_ROWS=TILE_ROWS,
                                     TILE_BLOCKS=TILE_BLOCKS)
    return out


def compile_low_rank_kernels(device: torch.device, dtypes: tuple[torch.dtype, ...]) -> None:
    """Compile (or load from Triton's cache) the low-rank kernels for ``dtypes`` now, so that a LoRA's first
    step does not wait for it (~0.5 s the first time on a machine)."""
    blocks = torch.zeros((32, 34), dtype=torch.uint8, device=device)
    for dtype in dtypes:
        q8_0_plus_low_rank(blocks, (32, 32), torch.zeros((32, 16), dtype=dtype, device=device),
                           torch.zeros((16, 32), dtype=dtype, device=device))


class LowRankKernels:
    """The kernels that add a low-rank update while unpacking a weight, by type. This object alone turns them off:
    there are none without Triton, and none once compiling them failed on this machine (LoRAs are then added after
    unpacking: the same weights, slower)."""

    def __init__(self, kernels: dict[Q, Callable[..., torch.Tensor]]) -> None:
        self._kernels = dict(kernels)

    def __contains__(self, qtype: object) -> bool:
        return qtype in self._kernels

    def __getitem__(self, qtype: Q) -> Callable[..., torch.Tensor]:
        return self._kernels[qtype]

    def prepare(self, device: torch.device, dtypes: tuple[torch.dtype, ...], qtypes: set[Q]) -> None:
        """Compile the kernels now for a model with weights of ``qtypes`` computing in ``dtypes``, where there is one
        for them (``compile_low_rank_kernels``); where compiling fails, say so and use none from now on."""
        if not qtypes & self._kernels.keys():
            return
        try:
            compile_low_rank_kernels(device, dtypes)
        except Exception as e:  # compilers' failures have many types; unpacking then adding gives the same weights
            log.warning("Compiling the LoRA unpacking kernel failed (%s); LoRAs on GGUF weights are added after "
                        "unpacking instead, which is slower.", e)
            self._kernels = {}


KERNELS: dict[Q, Callable[[torch.Tensor, torch.dtype], torch.Tensor]] = {Q.Q8_0: q8_0} if triton is not None else {}
low_rank_kernels = LowRankKernels({Q.Q8_0: q8_0_plus_low_rank} if triton is not None else {})
