"""Quantized weights that stay quantized until their layer runs.

A GGUF weight is a run of ggml *blocks*: each block packs ``block_size`` consecutive values of a
row as small integers plus one or a few fp16 scales. Here those bytes live in an ordinary
``nn.Parameter`` of dtype uint8, so everything that moves parameters (the memory manager, the
streamer's ``param.data`` swaps, pinning) moves exactly the quantized bytes. A layer unpacks its
weight on the input's device, in the input's dtype, at the start of its forward, and the
unpacked copy is freed as soon as the matmul is done: no dequantized copy of the model exists.

Dequantization is a handful of whole-tensor torch ops per type (no loop over blocks). In
float32 it is bit-identical to ``gguf.quants.dequantize`` (the same operations in the same
order). In a 16-bit dtype the scales are rounded to that dtype before they multiply, which is
within an ulp or two of the float32 result rounded.

On CUDA the layers run each type's ops compiled (``torch.compile``, the number of blocks
dynamic: one graph per type and dtype, a few seconds once per process) into one kernel that
reads the packed bytes once and writes the weight once, computing in float32 and rounding once
(so it equals the float32 result rounded to the compute dtype). Q8_0 has a hand-written Triton
kernel instead (``gguf_kernels``): the same arithmetic, at a fraction of a compiled call's host
overhead. Measured on an H200 (torch
2.11), Flux-dev at full size, 1344x768, 512 text tokens, one step, random weights:

    unpack one 3072x12288 weight   Q8_0 eager 173 us, fused 80 us; Q4_K eager 474 us, fused 96 us
                                   (the bf16 matmul it feeds: 431 us)
    step                           bf16 179 ms; Q8_0 fused 185-191 ms (1.03-1.07x), eager 217 ms (1.22x);
                                   Q4_K fused 194-200 ms (1.08-1.12x), eager 319 ms (1.83x)

Compiling with every size dynamic was slower (Q8_0 217 ms: symbolic block strides). Should
compiling fail (no Triton, say), the eager ops are used, with a warning.

Q8_0 is not "baked" (Forge splits its fp16 scales into a separate compute-dtype tensor once):
the scales and the int8 values are read in place through two strided views of the packed
bytes. Baked, the eager multiply took 154 us instead of 168; the fused kernel beats both,
without a second representation of the weights or a copy at load.
"""
from __future__ import annotations

import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import cache

import torch
import torch.nn.functional as F
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from torch import nn

from webui.engine.weights import gguf_kernels
from webui.errors import ModelFileError

log = logging.getLogger(__name__)

PLAIN_TYPES = {Q.F32: torch.float32, Q.F16: torch.float16, Q.BF16: torch.bfloat16}
QUANTIZED_TYPES = (Q.Q8_0, Q.Q6_K, Q.Q5_K, Q.Q5_1, Q.Q5_0, Q.Q4_K, Q.Q4_1, Q.Q4_0)
SUPPORTED_TYPES = (*PLAIN_TYPES, *QUANTIZED_TYPES)
LowRank = tuple[torch.Tensor, torch.Tensor]  # (up, down): a (rows, rank) and a (rank, columns) matrix


def _unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:
    """Each byte's ``bits``-wide fields, lowest first: (..., k) uint8 -> (..., 8 // bits, k)."""
    shifts = torch.arange(0, 8, bits, dtype=torch.uint8, device=packed.device).view(-1, 1)
    return (packed.unsqueeze(-2) >> shifts) & ((1 << bits) - 1)


def _half(blocks: torch.Tensor, offset: int, dtype: torch.dtype) -> torch.Tensor:
    """The fp16 stored at ``offset`` of every block, as an (n, 1) column in ``dtype`` (read in place)."""
    return blocks[:, offset:offset + 2].view(torch.float16).to(dtype)


def _plain(stored: torch.dtype) -> Callable[[torch.Tensor, torch.dtype], torch.Tensor]:
    return lambda blocks, dtype: blocks.view(stored).to(dtype)


def _q8_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return blocks[:, 2:].view(torch.int8) * _half(blocks, 0, dtype)


def _q4_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = _unpack(blocks[:, 2:], 4).flatten(1).view(torch.int8) - 8
    return _half(blocks, 0, dtype) * q


def _q4_1(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    q = _unpack(blocks[:, 4:], 4).flatten(1)
    return _half(blocks, 0, dtype) * q + _half(blocks, 2, dtype)


def _five_bits(blocks: torch.Tensor, qh_at: int) -> torch.Tensor:
    """Q5_0/Q5_1's 32 values: low nibbles from the 16 bytes after ``qh``, fifth bits from the little-endian ``qh``."""
    low = _unpack(blocks[:, qh_at + 4:], 4).flatten(1)
    high = _unpack(blocks[:, qh_at:qh_at + 4].unsqueeze(-1), 1).flatten(1)
    return low | (high << 4)


def _q5_0(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _half(blocks, 0, dtype) * (_five_bits(blocks, 2).view(torch.int8) - 16)


def _q5_1(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return _half(blocks, 0, dtype) * _five_bits(blocks, 4) + _half(blocks, 2, dtype)


def _k_scales(blocks: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's per-sub-block scale and minimum, (n, 8, 1) each, from d, dmin and 12 bytes of 6-bit fields.

    Bytes 0-3 hold scales 0-3 (low 6 bits), 4-7 mins 0-3; bytes 8-11 the low 4 bits of scales and
    mins 4-7, whose top 2 bits are the top bits of bytes 0-3 and 4-7.
    """
    packed = blocks[:, 4:16].unflatten(-1, (3, 4))
    d, m, low = packed[:, 0], packed[:, 1], packed[:, 2]
    scale = torch.cat((d & 0x3F, (low & 0x0F) | ((d >> 2) & 0x30)), dim=-1)
    minimum = torch.cat((m & 0x3F, (low >> 4) | ((m >> 2) & 0x30)), dim=-1)
    return (_half(blocks, 0, dtype) * scale).unsqueeze(-1), (_half(blocks, 2, dtype) * minimum).unsqueeze(-1)


def _q4_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    scale, minimum = _k_scales(blocks, dtype)
    q = _unpack(blocks[:, 16:].unflatten(-1, (4, 32)), 4).flatten(1, 2)
    return (scale * q - minimum).flatten(1)


def _q5_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    scale, minimum = _k_scales(blocks, dtype)
    low = _unpack(blocks[:, 48:].unflatten(-1, (4, 32)), 4).flatten(1, 2)
    high = _unpack(blocks[:, 16:48], 1)
    return (scale * (low | (high << 4)) - minimum).flatten(1)


def _q6_k(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    low = _unpack(blocks[:, :128].unflatten(-1, (2, 64)), 4).reshape(-1, 8, 32)
    high = _unpack(blocks[:, 128:192].unflatten(-1, (2, 32)), 2).flatten(1, 2)
    q = ((low | (high << 4)).view(torch.int8) - 32).view(-1, 16, 16)
    scale = (_half(blocks, 208, dtype) * blocks[:, 192:208].view(torch.int8)).unsqueeze(-1)
    return (scale * q).flatten(1)


_DEQUANTIZE: dict[Q, Callable[[torch.Tensor, torch.dtype], torch.Tensor]] = {
    **{qtype: _plain(stored) for qtype, stored in PLAIN_TYPES.items()},
    Q.Q8_0: _q8_0, Q.Q4_0: _q4_0, Q.Q4_1: _q4_1, Q.Q5_0: _q5_0, Q.Q5_1: _q5_1,
    Q.Q4_K: _q4_k, Q.Q5_K: _q5_k, Q.Q6_K: _q6_k,
}


def packed_bytes(qtype: Q, shape: Sequence[int]) -> int:
    """Bytes that ``shape`` values take in ``qtype``; a ValueError when they are not whole blocks."""
    block_size, type_size = GGML_QUANT_SIZES[qtype]
    count = math.prod(shape)
    if count % block_size:
        raise ValueError(f"{count} values are not a whole number of {qtype.name} blocks of {block_size}")
    return count // block_size * type_size


class _Fused:
    """One type's unpacking in a single kernel: a Triton kernel where ``gguf_kernels`` has one, else the type's
    ops compiled on first use; the eager ops if either fails."""

    def __init__(self, qtype: Q):
        self.qtype = qtype
        self.kernel = gguf_kernels.KERNELS.get(qtype) or self._compiled(torch.compile(_DEQUANTIZE[qtype]))

    @staticmethod
    def _compiled(compiled: Callable[[torch.Tensor, torch.dtype], torch.Tensor]):
        def unpack(blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
            torch._dynamo.maybe_mark_dynamic(blocks, 0)  # any number of blocks; the block layout stays static
            return compiled(blocks, dtype)
        return unpack

    def __call__(self, blocks: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        if self.kernel is not None:
            try:
                return self.kernel(blocks, dtype)
            except torch.OutOfMemoryError:
                raise
            except Exception as e:  # compilers' failures have many types; the eager ops give the same weights
                log.warning("Compiling %s dequantization failed (%s); using eager torch ops, which are slower.",
                            self.qtype.name, e)
                self.kernel = None
        return _DEQUANTIZE[self.qtype](blocks, dtype)


@cache
def _fused(qtype: Q) -> _Fused:
    return _Fused(qtype)


def dequantize(raw: torch.Tensor, qtype: Q, shape: Sequence[int], dtype: torch.dtype = torch.float32,
               fused: bool = False, plus: LowRank | None = None) -> torch.Tensor:
    """The values packed in ``raw`` (uint8 ggml blocks, any shape) as a ``shape`` tensor of ``dtype``, on raw's device.

    ``fused`` on a CUDA tensor: one compiled kernel instead of eager ops (see the module's docstring).
    ``plus``, ``(up, down)`` in ``dtype``: ``up @ down`` is added to the weight (its rows by the rest) — in the
    unpacking kernel itself where ``fuses_low_rank`` says so, else onto the unpacked copy in place.
    """
    if qtype not in _DEQUANTIZE:
        supported = ", ".join(t.name for t in SUPPORTED_TYPES)
        raise ValueError(f"{qtype.name} is not a supported GGUF type; supported: {supported}")
    if raw.dtype != torch.uint8 or raw.numel() != packed_bytes(qtype, shape):
        raise ValueError(f"{raw.numel()} bytes of {raw.dtype} cannot hold a {qtype.name} tensor of shape "
                         f"{list(shape)}")
    return _unpacked(raw, qtype, shape, dtype, fused, plus)


def _unpacked(raw: torch.Tensor, qtype: Q, shape: Sequence[int], dtype: torch.dtype, fused: bool,
              plus: LowRank | None) -> torch.Tensor:
    """``dequantize`` without its checks, for layers: their bytes were checked once, when made (``QuantTensor``),
    and some 500 calls a step would repeat them."""
    blocks = raw.reshape(-1, GGML_QUANT_SIZES[qtype][1])
    if plus is not None and fused and fuses_low_rank(raw, qtype, shape):
        return gguf_kernels.low_rank_kernels[qtype](blocks, (shape[0], math.prod(shape[1:])), *plus).reshape(shape)
    if not (fused and raw.is_cuda and qtype not in PLAIN_TYPES):
        unpack = _DEQUANTIZE[qtype]
    elif torch.compiler.is_compiling():  # in a compiled block: the type's Triton kernel, else the ops it fuses
        unpack = gguf_kernels.KERNELS.get(qtype, _DEQUANTIZE[qtype])
    else:
        unpack = _fused(qtype)
    weight = unpack(blocks, dtype).reshape(shape)
    if plus is not None:
        weight.view(shape[0], -1).addmm_(*plus)
    return weight


def fuses_low_rank(raw: torch.Tensor, qtype: Q, shape: Sequence[int]) -> bool:
    """Whether unpacking this weight can add a low-rank product in the same kernel: a Triton kernel for the type, on
    CUDA, and rows made of whole blocks."""
    return raw.is_cuda and qtype in gguf_kernels.low_rank_kernels and math.prod(shape[1:]) % 32 == 0


@dataclass(eq=False)
class QuantTensor:
    """One tensor's packed blocks (uint8, one row of ``raw`` per stored row) with its type and logical shape.

    ``shape`` is the tensor's shape in PyTorch order. Usually the stored rows are its rows; files
    for UNets may store conv weights reshaped to rows of 256 (ComfyUI-GGUF's ``orig_shape``), and
    then only whole-tensor operations are valid.

    Row operations (split, chunk and cat along dim 0) work on the packed bytes: rows are whole
    blocks, so they stay exact and split parts are views (no copy). They are also what
    ``torch.split``/``torch.cat`` do on a QuantTensor (``__torch_function__``), so that a key
    conversion written for plain tensors, like ``flux.convert_flux_to_diffusers``, converts
    quantized files unchanged.
    """

    raw: torch.Tensor
    qtype: Q
    shape: torch.Size

    def __post_init__(self) -> None:
        self.shape = torch.Size(self.shape)
        packed = packed_bytes(self.qtype, self.shape)
        if self.raw.dtype != torch.uint8 or self.raw.dim() != 2 or self.raw.numel() != packed:
            raise ValueError(f"{tuple(self.raw.shape)} {self.raw.dtype} bytes do not pack a {self.qtype.name} "
                             f"tensor of shape {list(self.shape)}")

    @property
    def nbytes(self) -> int:
        return self.raw.numel()

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        return dequantize(self.raw, self.qtype, self.shape, dtype)

    def _check_rows(self) -> None:
        if not self.shape or self.raw.shape[0] != self.shape[0]:
            raise ValueError(f"this {self.qtype.name} tensor of shape {list(self.shape)} is stored in rows of "
                             f"another length, so it cannot be cut or joined by rows")

    def _with_rows(self, raw: torch.Tensor) -> QuantTensor:
        return QuantTensor(raw, self.qtype, (raw.shape[0], *self.shape[1:]))

    def split(self, sizes: int | Sequence[int], dim: int = 0) -> tuple[QuantTensor, ...]:
        if dim != 0:
            raise ValueError("a quantized tensor can only be split along dim 0 (whole rows)")
        self._check_rows()
        return tuple(self._with_rows(part) for part in self.raw.split(sizes))

    def chunk(self, chunks: int, dim: int = 0) -> tuple[QuantTensor, ...]:
        return self.split(-(-self.shape[0] // chunks), dim)

    @staticmethod
    def cat(parts: Sequence[QuantTensor], dim: int = 0) -> QuantTensor:
        if dim != 0 or len({(p.qtype, p.shape[1:]) for p in parts}) != 1:
            raise ValueError("quantized tensors can only be joined along dim 0, with the same type and row shape")
        for part in parts:
            part._check_rows()
        return parts[0]._with_rows(torch.cat([p.raw for p in parts]))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.split:
            return args[0].split(*args[1:], **kwargs)
        if func is torch.cat and all(isinstance(p, QuantTensor) for p in args[0]):
            return cls.cat(*args, **kwargs)
        return NotImplemented


class QuantizedLayer(nn.Module):
    """Base of layers whose ``weight`` parameter holds packed GGUF blocks (uint8, never trained)."""

    def __init__(self, weight: QuantTensor, bias: torch.Tensor | None):
        super().__init__()
        self.qtype = weight.qtype
        self.weight_shape = weight.shape
        self.weight = nn.Parameter(weight.raw, requires_grad=False)
        # Fixed sizes to compiled code, however dynamic the rest: symbolic, each layer's unpacking reshapes cost
        # dynamo ~0.7 s of proofs (a Flux Q8_0 block has 14 layers: 11 of a warm start's 19 s on an H100)
        torch._dynamo.mark_static(self.weight)
        self.bias = None if bias is None else nn.Parameter(bias, requires_grad=False)

    def weight_and_bias(self, x: torch.Tensor, plus: LowRank | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The weight unpacked for ``x`` (its device and dtype), plus ``up @ down`` if given, and the bias in x's
        dtype."""
        weight = _unpacked(self.weight, self.qtype, self.weight_shape, x.dtype, True, plus)
        return weight, None if self.bias is None else self.bias.to(x.dtype)

    def extra_repr(self) -> str:
        return f"{self.qtype.name}, shape={list(self.weight_shape)}, bias={self.bias is not None}"


class GGUFLinear(QuantizedLayer):
    """``nn.Linear`` with a quantized weight."""

    def __init__(self, weight: QuantTensor, bias: torch.Tensor | None = None):
        super().__init__(weight, bias)
        self.out_features, self.in_features = weight.shape

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, *self.weight_and_bias(x))


class GGUFConv2d(QuantizedLayer):
    """``nn.Conv2d`` (zero padding) with a quantized weight; takes its geometry from the layer it replaces."""

    def __init__(self, weight: QuantTensor, like: nn.Conv2d):
        if like.padding_mode != "zeros":
            raise ValueError(f"padding mode {like.padding_mode!r} is not supported for quantized convolutions")
        super().__init__(weight, like.bias)
        self.stride, self.padding, self.dilation, self.groups = like.stride, like.padding, like.dilation, like.groups

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weight, bias = self.weight_and_bias(x)
        return F.conv2d(x, weight, bias, self.stride, self.padding, self.dilation, self.groups)


def _quantized_layer(owner: nn.Module, weight: QuantTensor) -> QuantizedLayer | None:
    if type(owner) is nn.Linear:
        return GGUFLinear(weight, owner.bias)
    if type(owner) is nn.Conv2d and owner.padding_mode == "zeros":
        return GGUFConv2d(weight, owner)
    return None


def replace_with_quantized(module: nn.Module, tensors: Mapping[str, QuantTensor | torch.Tensor], dtype: torch.dtype,
                           filename: str) -> nn.Module:
    """Fill ``module`` (built with ``accelerate.init_empty_weights``: parameters on the meta device) with ``tensors``.

    Every ``nn.Linear``/``nn.Conv2d`` whose weight is a QuantTensor becomes a GGUFLinear/GGUFConv2d
    holding the packed bytes; plain tensors are assigned (floating ones in ``dtype``). A quantized
    tensor anywhere else (rare: a positional embedding, say) is dequantized once, here. Tensors
    are taken as they are, so memory-mapped file data stays mapped. Keys, then shapes, are checked
    against the module first: a clear ``ModelFileError`` instead of a half-filled model.
    """
    expected = module.state_dict()
    _check_keys(type(module).__name__, expected, tensors, filename)
    plain: dict[str, torch.Tensor] = {}
    for key, tensor in tensors.items():
        owner_name, _, param = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        layer = _quantized_layer(owner, tensor) if isinstance(tensor, QuantTensor) and param == "weight" else None
        if layer is not None and owner_name:
            parent_name, _, child = owner_name.rpartition(".")
            setattr(module.get_submodule(parent_name), child, layer)
        else:
            plain[key] = tensor.dequantize(dtype) if isinstance(tensor, QuantTensor) else tensor
    for key, tensor in plain.items():
        owner_name, _, name = key.rpartition(".")
        owner = module.get_submodule(owner_name)
        value = tensor.to(dtype) if tensor.is_floating_point() else tensor
        if name in owner._buffers:
            owner._buffers[name] = value
        else:
            owner._parameters[name] = nn.Parameter(value, requires_grad=False)
    return module


def _check_keys(kind: str, expected: Mapping[str, torch.Tensor], tensors: Mapping[str, QuantTensor | torch.Tensor],
                filename: str) -> None:
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    if missing or unexpected:
        raise ModelFileError(
            f"{filename}: the {kind} in this file does not match its inferred architecture ({len(missing)} tensors "
            f"missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}). The file may be "
            "incomplete or of an unsupported variant.")
    for key, tensor in tensors.items():
        if tuple(tensor.shape) != tuple(expected[key].shape):
            raise ModelFileError(f"{filename}: tensor {key} has shape {list(tensor.shape)}, expected "
                                 f"{list(expected[key].shape)}. The file is inconsistent.")
