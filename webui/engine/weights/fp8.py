"""FP8 weight storage: weights kept in float8 (e4m3fn or e5m2), computed in the input's dtype.

Two ways in:

* a 16-bit model converted after loading (Forge's "Diffusion in Low Bits"): ``cast_weights_fp8``;
* fp8 tensors read from a file, kept as stored: ``fp8_state_dict_split`` before the module takes the
  tensors, ``enable_fp8_compute`` after.

Only the weights of ``nn.Linear`` and ``nn.Conv2d`` layers are stored in fp8: they are nearly all of a
denoiser's bytes. Biases, norms, embeddings and small layers stay in the compute dtype.

Compute: an fp8 layer's class is swapped in place for ``Fp8Linear`` / ``Fp8Conv2d``, whose forward
upcasts the weight to the input's dtype and device for that one call (the copy is a local, freed when
the call returns). This is chosen over a pre/post hook pair because torch runs every forward pre-hook
before ``forward``: the memory manager's streamer, which registers its hooks later (at placement time)
and swaps ``param.data`` for a device copy, has always run by the time the weight is read. Hooks would
have to be ordered against the streamer's and restore the fp8 tensor on every exit path. The swap keeps
the module object, its parameters (ordinary ``nn.Parameter`` holding fp8 data, so fp8 bytes are what the
streamer moves) and ``isinstance(layer, nn.Linear)``.

Scaled fp8 (ComfyUI): a ``<layer>.scale_weight`` scalar per layer; the weight used is ``weight * scale``.
``<layer>.scale_input`` (for fp8 matmuls) and the ``scaled_fp8`` marker are not needed here and dropped.
"""
from __future__ import annotations

import logging

import torch
import torch.nn.functional as F
from torch import nn

from webui.engine.memory import host_pages
from webui.errors import ModelFileError

FP8_DTYPES = (torch.float8_e4m3fn, torch.float8_e5m2)
SCALE_SUFFIX = ".scale_weight"
UNUSED_SUFFIXES = (".scale_input",)
UNUSED_KEYS = ("scaled_fp8",)
# Below this many elements a layer saves under 64 KB in fp8; the small first and last convolutions of a
# UNet are also the layers most sensitive to rounding.
MIN_NUMEL = 65_536

StateDict = dict[str, torch.Tensor]
log = logging.getLogger(__name__)


def is_fp8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in FP8_DTYPES


def upcast_weight(layer: nn.Module, like: torch.Tensor) -> torch.Tensor:
    """The layer's weight in ``like``'s dtype on ``like``'s device, scaled if the file gave a scale."""
    weight = layer.weight.to(like.device, like.dtype)
    if layer.scale_weight is not None:
        weight = weight * layer.scale_weight.to(like.device, like.dtype)
    return weight


def _bias(layer: nn.Module, like: torch.Tensor) -> torch.Tensor | None:
    return None if layer.bias is None else layer.bias.to(like.device, like.dtype)


class Fp8Linear(nn.Linear):
    """A Linear whose weight is stored in fp8 (made by swapping ``__class__``, never constructed). With
    ``fp8_matmul`` (``use_fp8_matmul``) and an e4m3fn weight it multiplies in fp8 on the GPU's tensor cores."""

    scale_weight: torch.Tensor | None
    fp8_matmul: bool = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.fp8_matmul and x.is_cuda and x.dtype in (torch.float16, torch.bfloat16):
            return fp8_linear(x, self.weight, self.scale_weight, _bias(self, x))
        return F.linear(x, upcast_weight(self, x), _bias(self, x))


def fp8_linear(x: torch.Tensor, weight: torch.Tensor, weight_scale: torch.Tensor | None,
               bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ weight.T + bias`` with both in e4m3fn (``torch._scaled_mm``): the input scaled to fp8's range per
    tensor on the device (no synchronisation), the weight as stored with its file scale; the result in ``x``'s
    dtype."""
    rows = x.reshape(-1, x.shape[-1])
    x_scale = (rows.abs().amax().float() / torch.finfo(torch.float8_e4m3fn).max).clamp(min=1e-12)
    quantized = (rows / x_scale.to(rows.dtype)).to(torch.float8_e4m3fn)
    w_scale = (torch.ones((), device=x.device) if weight_scale is None
               else weight_scale.to(x.device, torch.float32).reshape(()))
    out = torch._scaled_mm(quantized, weight.t(), scale_a=x_scale, scale_b=w_scale, bias=bias, out_dtype=x.dtype)
    return out.reshape(*x.shape[:-1], weight.shape[0])


def use_fp8_matmul(module: nn.Module, wanted: bool, device: torch.device) -> bool:
    """Let ``module``'s e4m3fn Linear layers (both sides a multiple of 16, as the tensor cores take them) multiply in
    fp8 (ComfyUI's fp8_matrix_mult) where the device has fp8 tensor cores (compute capability 8.9 and up); whether
    any does. Where it was wanted and cannot, the log says why, once."""
    if not wanted and not getattr(module, "_webui_fp8_matmul", False):
        return False  # off, and never turned on: its layers are not walked at every job
    reason = None
    if wanted and device.type != "cuda":
        reason = "runs on CUDA GPUs only"
    elif wanted and torch.cuda.get_device_capability(device) < (8, 9):
        reason = "needs fp8 tensor cores (compute capability 8.9 and up)"
    layers = [layer for layer in module.modules() if isinstance(layer, Fp8Linear)]
    for layer in layers:
        layer.fp8_matmul = (wanted and reason is None and layer.weight.dtype == torch.float8_e4m3fn
                            and layer.in_features % 16 == 0 and layer.out_features % 16 == 0)
    active = module._webui_fp8_matmul = any(layer.fp8_matmul for layer in layers)
    if wanted and not active:
        reason = reason or "needs weights stored in float8-e4m3fn (Diffusion in Low Bits, or an fp8 file)"
        if getattr(module, "_webui_fp8_matmul_noted", None) != reason:
            log.info("fp8 matrix multiplication %s: the fp8 layers upcast their weights instead.", reason)
    module._webui_fp8_matmul_noted = reason
    return active


class Fp8Conv2d(nn.Conv2d):
    """A Conv2d whose weight is stored in fp8 (made by swapping ``__class__``, never constructed)."""

    scale_weight: torch.Tensor | None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, upcast_weight(self, x), _bias(self, x))


# Exact types: a subclass of Linear (a LoRA layer, say) has its own forward, which a swap would lose.
FP8_CLASSES: dict[type, type] = {nn.Linear: Fp8Linear, nn.Conv2d: Fp8Conv2d, Fp8Linear: Fp8Linear,
                                 Fp8Conv2d: Fp8Conv2d}


def _fp8_class(layer: nn.Module) -> type | None:
    return FP8_CLASSES.get(type(layer))


def _make_fp8_layer(layer: nn.Module, scale: torch.Tensor | None) -> None:
    layer.__class__ = _fp8_class(layer)
    layer.register_buffer("scale_weight", scale)


def to_fp8(tensor: torch.Tensor, fp8_dtype: torch.dtype) -> torch.Tensor:
    """``tensor`` rounded to ``fp8_dtype``, saturating: out-of-range values become the largest finite one
    (a plain cast gives inf in e5m2, and NaN in e4m3fn on CUDA, where the CPU saturates)."""
    limit = torch.finfo(fp8_dtype).max
    return tensor.clamp(-limit, limit).to(fp8_dtype)


@torch.no_grad()
def cast_weights_fp8(module: nn.Module, fp8_dtype: torch.dtype = torch.float8_e4m3fn,
                     min_numel: int = MIN_NUMEL) -> int:
    """Store the weights of ``module``'s Linear and Conv2d layers of at least ``min_numel`` elements in
    ``fp8_dtype``, in place; everything else keeps its dtype. Returns the bytes saved.

    Call it before the memory manager registers the module: units and streamers record tensor sizes
    and host tensors when they are made.
    """
    if fp8_dtype not in FP8_DTYPES:
        raise ValueError(f"fp8_dtype must be one of {FP8_DTYPES}, not {fp8_dtype}")
    saved = 0
    for layer in module.modules():
        if _fp8_class(layer) is None or layer.weight.numel() < min_numel or is_fp8(layer.weight):
            continue
        weight = layer.weight
        saved += weight.numel() * (weight.element_size() - 1)
        weight.data = to_fp8(weight.data, fp8_dtype)
        _make_fp8_layer(layer, None)
    return saved


def fp8_state_dict_split(state_dict: StateDict, dtype: torch.dtype) -> tuple[StateDict, StateDict]:
    """A file's tensors, ready for a module, and its fp8 scales.

    Returns ``(weights, scales)``: in ``weights`` fp8 tensors are kept as stored, other floating tensors
    are cast to ``dtype`` (the file pages of those copied released), the rest left alone; ``scales`` maps a layer's name to its
    ``scale_weight`` (kept in float32). Keys only fp8 matmuls use are dropped.
    """
    weights, scales, spans = {}, {}, host_pages.model_file_mappings()
    for key, tensor in state_dict.items():
        if key.endswith(SCALE_SUFFIX):
            scales[key.removesuffix(SCALE_SUFFIX)] = tensor.float()
        elif key.endswith(UNUSED_SUFFIXES) or key in UNUSED_KEYS:
            continue
        elif tensor.is_floating_point() and not is_fp8(tensor):
            weights[key] = host_pages.cast(tensor, dtype, spans)
        else:
            weights[key] = tensor
    return weights, scales


@torch.no_grad()
def enable_fp8_compute(module: nn.Module, scales: StateDict, dtype: torch.dtype,
                       filename: str = "This file") -> None:
    """Make a module loaded with fp8 tensors computable: Linear/Conv2d layers with fp8 weights compute
    through an upcast (with their scale, if any); any other fp8 tensor (bias, norm, embedding) is cast to
    ``dtype`` once. A scale for a layer that has no fp8 weight is a clear error, not a silent
    garbage model."""
    layers = dict(module.named_modules())
    unused = sorted(name for name in scales if name not in layers or not _stores_fp8(layers[name]))
    if unused:
        raise ModelFileError(
            f"{filename} is a scaled fp8 checkpoint whose scales do not match this model's fp8 layers "
            f"({len(unused)} unmatched, e.g. {unused[:2]}). This layout of scaled fp8 is not supported yet; "
            "use an unscaled fp8 or a 16-bit file."
        )
    for name, layer in layers.items():
        if _stores_fp8(layer):
            _make_fp8_layer(layer, scales.get(name))
        for tensor_name, tensor in [*layer.named_parameters(recurse=False), *layer.named_buffers(recurse=False)]:
            if is_fp8(tensor) and not (tensor_name == "weight" and _stores_fp8(layer)):
                tensor.data = tensor.data.to(dtype)


def _stores_fp8(layer: nn.Module) -> bool:
    return _fp8_class(layer) is not None and is_fp8(layer.weight)


def compute_dtype(module: nn.Module) -> torch.dtype:
    """The dtype a module computes in. diffusers' and transformers' ``module.dtype`` report the first
    floating parameter's dtype, which is fp8 when the first layer is stored in fp8."""
    return next((p.dtype for p in module.parameters() if p.is_floating_point() and not is_fp8(p)), torch.float32)
