"""Models from GGUF files, their weights kept quantized; and a GGUF writer for tests and tools.

GGUF files for image models (city96's, ComfyUI-GGUF's, Forge's) keep the checkpoint's original
tensor names: a Flux file has BFL's ``double_blocks.0.img_attn.qkv.weight``, an SD UNet LDM's
``input_blocks.1.1.proj_in.weight``. Such a file is converted with the same key conversion as a
safetensors file (``flux.convert_flux_to_diffusers``, diffusers' ``convert_ldm_unet_checkpoint``,
which only renames): quantized tensors support the row splits and joins they make (see
``quant.QuantTensor``).

The family comes from the tensors, as for checkpoints; ``general.architecture`` is only checked
against it. ComfyUI-GGUF's converter writes "sd1" for SD2.x UNets too (it cannot tell them apart);
SD2's are the ones with linear ``proj_in`` layers.
"""
from __future__ import annotations

import itertools
import math
import os
from collections.abc import Callable, Collection, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import gguf
import numpy as np
import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from webui.engine.formats.detect import FLUX_MARKER, FLUX_PREFIXES, UNET, Family, strip_prefix, unet_config
from webui.engine.formats.files import TensorInfo
from webui.engine.formats.gguf_file import ORIG_SHAPE_KEY, GGUFContents, GGUFTensor, read_gguf
from webui.engine.weights.quant import PLAIN_TYPES, QuantTensor, replace_with_quantized
from webui.errors import ModelFileError

QK_K = 256
QTypeFor = Callable[[str, torch.Tensor], Q]
V = TypeVar("V")

UNET_MARKER = "input_blocks.0.0.weight"
UNET_PREFIXES = (UNET, "")
SD3_MARKER = "joint_blocks.0.context_block.attn.qkv.weight"
UNET_FAMILIES = (Family.SD1, Family.SD2, Family.SDXL)
# What each tool's ``general.architecture`` may say for each family (ComfyUI-GGUF: "sd1" for SD2 as well).
DECLARED_FAMILIES = {"flux": (Family.FLUX,), "sd3": (Family.SD3,), "sd1": (Family.SD1, Family.SD2),
                     "sdxl": (Family.SDXL,)}
# SDXL embeds each of its 6 size/crop numbers in 256 channels (ComfyUI and Forge fix it there); files do not say.
SDXL_TIME_EMBED_DIM = 256
SDXL_TIME_IDS = 6
# ComfyUI-GGUF's converter stores these architectures' tensors in rows of 256 (its ``shape_fix``), never Flux's.
SHAPE_FIX_ARCHS = ("sd1", "sdxl")
SHAPE_FIX_MIN_VALUES = 512  # its REARRANGE_THRESHOLD: smaller tensors keep their shape


def to_torch(tensor: GGUFTensor) -> QuantTensor | torch.Tensor:
    """A GGUF tensor as torch sees it, sharing the file mapping: plain types as typed views, others packed."""
    data = torch.from_numpy(tensor.data)
    if tensor.qtype in PLAIN_TYPES:
        return data.view(PLAIN_TYPES[tensor.qtype]).view(tensor.shape)
    return QuantTensor(data.view(math.prod(tensor.stored_shape[:-1]), -1), tensor.qtype, tensor.shape)


def gguf_state_dict(contents: GGUFContents) -> dict[str, QuantTensor | torch.Tensor]:
    """Every tensor of a read GGUF file under its stored name; nothing is copied."""
    return {name: to_torch(tensor) for name, tensor in contents.tensors.items()}


def _infos(contents: GGUFContents) -> dict[str, TensorInfo]:
    """Each tensor's type and real shape, for the architecture functions of ``detect``."""
    return {name: TensorInfo(t.qtype.name, t.shape) for name, t in contents.tensors.items()}


def load_gguf_transformer(path: str | Path, arch: str, cls: type[torch.nn.Module], what: str,
                          prefix_of: Callable[[Mapping], str], config_of: Callable[[Mapping], dict],
                          convert: Callable[[dict, dict], dict], dtype: torch.dtype) -> torch.nn.Module:
    """A transformer of a GGUF file with its original names (bare or ``model.diffusion_model.``), on the CPU.

    ``arch`` is the ``general.architecture`` it must declare (or none); ``prefix_of``, ``config_of`` and
    ``convert`` are the family's, as for its safetensors files. Quantized linear weights stay packed and
    memory-mapped (``GGUFLinear``); plain tensors (norms, biases, whatever the file keeps in F16/F32) are
    cast to ``dtype``. The quantized layers compute in their input's dtype.
    """
    path = Path(path)
    contents = read_gguf(path)
    if contents.architecture not in (None, arch):
        raise ModelFileError(f"{path.name} holds a {contents.architecture!r} model, not {what}.")
    infos = _infos(contents)
    try:
        prefix, config = prefix_of(infos), config_of(infos)
        tensors = convert(strip_prefix(gguf_state_dict(contents), prefix), config)
    except ModelFileError as e:
        raise ModelFileError(f"{path.name}: {e.message}") from e
    except ValueError as e:  # a fused tensor stored in rows that cannot be split
        raise ModelFileError(f"{path.name}: {e}. The file is not {what} as GGUF tools write it.") from e
    with init_empty_weights():
        model = cls(**config)
    return replace_with_quantized(model, tensors, dtype, path.name).requires_grad_(False).eval()


def gguf_family(path: str | Path) -> Family:
    """Which model a GGUF file holds, so that the engine picks its loader; from the header, no tensor data read.

    The family comes from the tensors' names and shapes, checked against ``general.architecture``.
    """
    contents = read_gguf(path)
    return _checked_family(contents, _infos(contents))


def load_gguf_unet(path: str | Path, dtype: torch.dtype = torch.float16,
                   pooled_dim: int | None = None) -> tuple[UNet2DConditionModel, Family]:
    """The SD1.x/SD2.x/SDXL UNet of a GGUF file with LDM names (bare or ``model.diffusion_model.``), on the CPU.

    Quantized Linear/Conv2d weights stay packed and memory-mapped (``GGUFLinear``/``GGUFConv2d``);
    plain tensors are cast to ``dtype``. ``pooled_dim`` is SDXL's pooled text embedding width (its
    second text encoder's projection), which the UNet file does not store; None takes SDXL's 256
    channels per size/crop number.
    """
    path = Path(path)
    contents = read_gguf(path)
    infos = _infos(contents)
    family = _checked_family(contents, infos)
    if family not in UNET_FAMILIES:
        raise ModelFileError(f"{path.name} holds a {family.value} transformer, not an SD1.x/SD2.x/SDXL UNet: "
                             f"load it as a {family.value} model.")
    prefix = _unet_prefix(infos)
    infos = _with_unet_prefix(infos, prefix)
    config = _unet_config(path.name, infos, family, pooled_dim)
    tensors = convert_ldm_unet_checkpoint(_with_unet_prefix(gguf_state_dict(contents), prefix), config)
    with init_empty_weights():
        model = UNet2DConditionModel(**config)
    return replace_with_quantized(model, tensors, dtype, path.name).requires_grad_(False).eval(), family


def _unet_prefix(keys: Collection[str]) -> str | None:
    return next((p for p in UNET_PREFIXES if p + UNET_MARKER in keys), None)


def _with_unet_prefix(mapping: Mapping[str, V], prefix: str) -> dict[str, V]:
    """The UNet's entries under ``model.diffusion_model.``, where diffusers' conversion and ``detect`` look."""
    return {UNET + key: value for key, value in strip_prefix(mapping, prefix).items()}


def _family_from_tensors(filename: str, infos: Mapping[str, TensorInfo]) -> Family:
    """Flux or SD3 by their marker tensors; a UNet is SDXL with ``label_emb``, else SD2 with linear ``proj_in``."""
    if any(p + FLUX_MARKER in infos for p in FLUX_PREFIXES):
        return Family.FLUX
    if any(k.endswith(SD3_MARKER) for k in infos):
        return Family.SD3
    prefix = _unet_prefix(infos)
    if prefix is None:
        sample = ", ".join(sorted(infos)[:3]) or "none"
        raise ModelFileError(
            f"{filename} holds no model this app loads from GGUF: its tensors are not those of an SD1.x/SD2.x/SDXL "
            f"UNet with the original (LDM) names, nor of a Flux or SD3 transformer ({len(infos)} tensors, e.g. "
            f"{sample}). Convert the model from its original checkpoint.")
    if prefix + "label_emb.0.0.weight" in infos:
        return Family.SDXL
    proj_in = next((info for k, info in infos.items() if k.startswith(prefix) and k.endswith(".proj_in.weight")), None)
    if proj_in is None:
        raise ModelFileError(f"{filename}: this UNet has no transformer blocks (no proj_in tensor), so it is not an "
                             "SD1.x/SD2.x/SDXL UNet.")
    return Family.SD2 if len(proj_in.shape) == 2 else Family.SD1


def _checked_family(contents: GGUFContents, infos: Mapping[str, TensorInfo]) -> Family:
    """The family of the tensors, refused where the file declares an architecture that disagrees or that we lack."""
    name, declared = contents.path.name, contents.architecture
    if declared and declared not in DECLARED_FAMILIES:
        raise ModelFileError(f"{name} holds a {declared!r} model, which this app cannot load from GGUF (the GGUF "
                             f"architectures it knows are {', '.join(DECLARED_FAMILIES)}).")
    family = _family_from_tensors(name, infos)
    if declared and family not in DECLARED_FAMILIES[declared]:
        raise ModelFileError(f"{name} says it holds a {declared!r} model, but its tensors are those of a "
                             f"{family.value}-family model. The file's metadata or tensors are wrong: convert it "
                             "again.")
    return family


def _unet_config(filename: str, infos: Mapping[str, TensorInfo], family: Family, pooled_dim: int | None) -> dict:
    """``detect.unet_config`` with SDXL's pooled width checked, and a missing tensor named as a file error."""
    if family is Family.SDXL:  # recognised by its label_emb
        pooled_dim = _sdxl_pooled_dim(filename, infos[UNET + "label_emb.0.0.weight"].shape[1], pooled_dim)
    try:
        return unet_config(infos, family, pooled_dim)
    except KeyError as e:
        missing = str(e.args[0]).removeprefix(UNET)
        raise ModelFileError(f"{filename}: the {family.value} UNet has no tensor {missing!r}. The file is incomplete "
                             "or of an unsupported variant.") from e
    except (IndexError, StopIteration) as e:
        raise ModelFileError(f"{filename}: the blocks of this {family.value} UNet are not laid out as in SD's "
                             "UNets. The file is of an unsupported variant.") from e
    except ModelFileError as e:
        raise ModelFileError(f"{filename}: {e}") from e


def _sdxl_pooled_dim(filename: str, adm_in: int, pooled_dim: int | None) -> int:
    """The pooled text embedding width: ``label_emb`` takes it plus 6 embedded size/crop numbers."""
    pooled = adm_in - SDXL_TIME_IDS * SDXL_TIME_EMBED_DIM if pooled_dim is None else pooled_dim
    spare = adm_in - pooled
    if pooled < 1 or spare < SDXL_TIME_IDS or spare % SDXL_TIME_IDS:
        width = "" if pooled_dim is None else f" {pooled_dim} wide"
        raise ModelFileError(
            f"{filename}: this SDXL UNet's label_emb takes {adm_in} values, which are not a pooled text embedding"
            f"{width} plus {SDXL_TIME_IDS} equal size/crop embeddings (SDXL base: 1280 + {SDXL_TIME_IDS} x "
            f"{SDXL_TIME_EMBED_DIM}). It is an SDXL refiner or another variant, which cannot be loaded.")
    return pooled


def stored_shape(qtype: Q, shape: tuple[int, ...], shape_fix: bool = False) -> tuple[int, ...] | None:
    """The shape a GGUF converter stores a ``shape`` tensor in as ``qtype``, or None if it cannot.

    Rows must be whole blocks. A tensor whose rows are not (a 3x3 convolution's) but whose values
    fill rows of 256 is stored as such rows, its shape kept in ``comfy.gguf.orig_shape.<name>``.
    With ``shape_fix`` (ComfyUI-GGUF's converter for SD1/SDXL UNets) every matrix or kernel of at
    least 512 values whose rows are not multiples of 256 is, whatever its type, if its values fill
    such rows.
    """
    count = math.prod(shape)
    rows_of_256 = (count // QK_K, QK_K) if count % QK_K == 0 and shape[-1] % QK_K else None
    if shape_fix and len(shape) > 1 and count >= SHAPE_FIX_MIN_VALUES and rows_of_256:
        return rows_of_256
    if shape[-1] % GGML_QUANT_SIZES[qtype][0] == 0:
        return shape
    return rows_of_256 if len(shape) > 2 else None


def quantize_where_possible(target: Q, shape_fix: bool = False) -> QTypeFor:
    """A ``qtype_for`` as GGUF converters choose: F32 for 1-D tensors, ``target`` where it fits, else F16."""
    def qtype_for(name: str, tensor: torch.Tensor) -> Q:
        if tensor.dim() < 2:
            return Q.F32
        return target if stored_shape(target, tuple(tensor.shape), shape_fix) else Q.F16
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


def write_gguf(path: str | Path, state_dict: Mapping[str, torch.Tensor] | Iterable[tuple[str, torch.Tensor]],
               qtype_for: QTypeFor, arch: str = "flux") -> Path:
    """Write ``state_dict`` (original key names; or (name, tensor) pairs, made as they are read) as a GGUF file, each
    tensor in ``qtype_for(name, tensor)``.

    Tensors are stored as ``stored_shape`` says (with ``shape_fix`` for SD1/SDXL UNets, as ComfyUI-GGUF's
    converter does); one stored reshaped gets its ``orig_shape`` entry. A window of tensors (one per core) is
    quantized at a time and spooled to a temporary file, so memory holds a window, not the model (the merger writes
    merged tensors as they come).
    """
    path = Path(path)
    writer = gguf.GGUFWriter(path, arch, use_temp_file=True)

    def quantized(item: tuple[str, torch.Tensor]) -> tuple[str, tuple[int, ...], tuple[int, ...], Q, np.ndarray]:
        name, tensor = item
        qtype, shape = qtype_for(name, tensor), tuple(tensor.shape)
        stored = stored_shape(qtype, shape, arch in SHAPE_FIX_ARCHS)
        if stored is None:
            raise ValueError(f"{name} of shape {list(shape)} cannot be stored as {qtype.name}")
        return name, shape, stored, qtype, quantize(tensor.detach().float().cpu().numpy().reshape(stored), qtype)

    items = iter(state_dict.items() if isinstance(state_dict, Mapping) else state_dict)
    window = os.cpu_count() or 1
    # numpy's quantizers release the GIL: a full-size Flux is quantized on every core (211 s on one)
    with ThreadPoolExecutor(max_workers=window) as pool:
        while batch := list(itertools.islice(items, window)):
            for name, shape, stored, qtype, data in pool.map(quantized, batch):
                if stored != shape:
                    writer.add_array(ORIG_SHAPE_KEY + name, list(shape))
                writer.add_tensor(name, data, raw_dtype=qtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
