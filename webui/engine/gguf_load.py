"""Models from GGUF files, their weights kept quantized; and a GGUF writer for tests and tools.

GGUF files for image models (city96's, ComfyUI-GGUF's, Forge's) keep the checkpoint's original
tensor names: a Flux file has BFL's ``double_blocks.0.img_attn.qkv.weight``. Such a file is
converted with the same key conversion as a safetensors file (``flux.convert_flux_to_diffusers``):
quantized tensors support the row splits and joins it makes (see ``quant.QuantTensor``).
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

import gguf
import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers import FluxTransformer2DModel
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from webui.engine.detect import flux_prefix, strip_prefix
from webui.engine.files import TensorInfo
from webui.engine.flux import convert_flux_to_diffusers, flux_config
from webui.engine.gguf_file import ORIG_SHAPE_KEY, GGUFContents, GGUFTensor, read_gguf
from webui.engine.quant import PLAIN_TYPES, QuantTensor, replace_with_quantized
from webui.errors import ModelFileError

QK_K = 256
QTypeFor = Callable[[str, torch.Tensor], Q]


def to_torch(tensor: GGUFTensor) -> QuantTensor | torch.Tensor:
    """A GGUF tensor as torch sees it, sharing the file mapping: plain types as typed views, others packed."""
    data = torch.from_numpy(tensor.data)
    if tensor.qtype in PLAIN_TYPES:
        return data.view(PLAIN_TYPES[tensor.qtype]).view(tensor.shape)
    return QuantTensor(data.view(math.prod(tensor.stored_shape[:-1]), -1), tensor.qtype, tensor.shape)


def gguf_state_dict(contents: GGUFContents) -> dict[str, QuantTensor | torch.Tensor]:
    """Every tensor of a read GGUF file under its stored name; nothing is copied."""
    return {name: to_torch(tensor) for name, tensor in contents.tensors.items()}


def load_gguf_flux_transformer(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> FluxTransformer2DModel:
    """The Flux transformer of a GGUF file with BFL names (bare or ``model.diffusion_model.``), on the CPU.

    Quantized linear weights stay packed and memory-mapped (``GGUFLinear``); plain tensors (norms,
    biases, whatever the file keeps in F16/F32) are cast to ``dtype``. The compute dtype of the
    quantized layers is their input's.
    """
    path = Path(path)
    contents = read_gguf(path)
    if contents.architecture not in (None, "flux"):
        raise ModelFileError(f"{path.name} holds a {contents.architecture!r} model, not a Flux transformer.")
    infos = {name: TensorInfo(t.qtype.name, t.shape) for name, t in contents.tensors.items()}
    prefix = flux_prefix(infos)
    config = flux_config(infos)
    try:
        tensors = convert_flux_to_diffusers(strip_prefix(gguf_state_dict(contents), prefix), config)
    except ValueError as e:  # a fused tensor stored in rows that cannot be split
        raise ModelFileError(f"{path.name}: {e}. The file is not a Flux transformer as GGUF tools write it.") from e
    with init_empty_weights():
        model = FluxTransformer2DModel(**config)
    return replace_with_quantized(model, tensors, dtype, path.name).requires_grad_(False).eval()


def stored_shape(qtype: Q, shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The shape a GGUF converter stores a ``shape`` tensor in as ``qtype``, or None if it cannot.

    Rows must be whole blocks. A tensor whose rows are not (a 3x3 convolution's) but whose values
    fill rows of 256 is stored as such rows, its shape kept in ``comfy.gguf.orig_shape.<name>``:
    what ComfyUI-GGUF's converter does for SD1/SDXL UNets.
    """
    block_size = GGML_QUANT_SIZES[qtype][0]
    if shape[-1] % block_size == 0:
        return shape
    count = math.prod(shape)
    return (count // QK_K, QK_K) if len(shape) > 2 and count % QK_K == 0 else None


def quantize_where_possible(target: Q) -> QTypeFor:
    """A ``qtype_for`` as GGUF converters choose: F32 for 1-D tensors, ``target`` where it fits, else F16."""
    def qtype_for(name: str, tensor: torch.Tensor) -> Q:
        if tensor.dim() < 2:
            return Q.F32
        return target if stored_shape(target, tuple(tensor.shape)) else Q.F16
    return qtype_for


def _quantize_q4_k(values: np.ndarray) -> np.ndarray:
    """Q4_K blocks (gguf's numpy package only unpacks them): per 32 values a 6-bit scale and minimum, per 256
    an fp16 scale for each. Round-to-nearest, without llama.cpp's search for the best scales."""
    sub = values.astype(np.float32).reshape(-1, 8, 32)
    low, high = np.minimum(sub.min(-1), 0), sub.max(-1)
    scales, mins = (high - low) / 15, -low
    d = (scales.max(-1, keepdims=True) / 63).astype(np.float16)
    dmin = (mins.max(-1, keepdims=True) / 63).astype(np.float16)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.nan_to_num(np.rint(scales / d.astype(np.float32))).clip(0, 63).astype(np.uint8)
        m = np.nan_to_num(np.rint(mins / dmin.astype(np.float32))).clip(0, 63).astype(np.uint8)
        step = (d.astype(np.float32) * sc)[..., None]
        offset = (dmin.astype(np.float32) * m)[..., None]
        q = np.nan_to_num(np.rint((sub + offset) / step)).clip(0, 15).astype(np.uint8)
    packed_scales = np.concatenate([sc[:, :4] | (sc[:, 4:] >> 4) << 6, m[:, :4] | (m[:, 4:] >> 4) << 6,
                                    (sc[:, 4:] & 0x0F) | (m[:, 4:] & 0x0F) << 4], axis=-1)
    pairs = q.reshape(-1, 4, 2, 32)
    qs = (pairs[:, :, 0] | pairs[:, :, 1] << 4).reshape(-1, QK_K // 2)
    blocks = np.concatenate([d.view(np.uint8), dmin.view(np.uint8), packed_scales, qs], axis=-1)
    return blocks.reshape(*values.shape[:-1], values.shape[-1] // QK_K * GGML_QUANT_SIZES[Q.Q4_K][1])


def quantize(values: np.ndarray, qtype: Q) -> np.ndarray:
    """``values`` (float) in ``qtype``, as GGUFWriter takes them: typed arrays for F32/F16, packed uint8 otherwise."""
    if qtype == Q.Q4_K:
        return _quantize_q4_k(values)
    return gguf.quants.quantize(values.astype(np.float32), qtype)


def write_gguf(path: str | Path, state_dict: Mapping[str, torch.Tensor], qtype_for: QTypeFor,
               arch: str = "flux") -> Path:
    """Write ``state_dict`` (original key names) as a GGUF file, each tensor in ``qtype_for(name, tensor)``.

    Tensors are stored as ``stored_shape`` says; one stored reshaped gets its ``orig_shape`` entry.
    """
    path = Path(path)
    writer = gguf.GGUFWriter(path, arch)
    for name, tensor in state_dict.items():
        qtype, shape = qtype_for(name, tensor), tuple(tensor.shape)
        stored = stored_shape(qtype, shape)
        if stored is None:
            raise ValueError(f"{name} of shape {list(shape)} cannot be stored as {qtype.name}")
        if stored != shape:
            writer.add_array(ORIG_SHAPE_KEY + name, list(shape))
        values = tensor.detach().float().cpu().numpy().reshape(stored)
        writer.add_tensor(name, quantize(values, qtype), raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
