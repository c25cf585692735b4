"""SD3 / SD3.5 transformers (MMDiT, the denoiser alone) from single files in Stability AI's original layout.

Stability's files (``sd3.5_large.safetensors``, ``sd3.5_medium.safetensors``, ``sd3_medium.safetensors``)
name tensors ``joint_blocks.N.x_block.attn.qkv.weight``, ``x_embedder.proj.weight``, ``pos_embed`` ...
under ``model.diffusion_model.`` (or bare, as in GGUF files of them); other components they carry
(VAE, text encoders) are ignored here.

The architecture comes from tensor shapes, as in ``flux``:

* Widths (image stream, text stream, text input, pooled input) come from the embedders' shapes;
  heads are 64 channels wide, SD3's convention, so a 2432-wide SD3.5 Large has 38 of them.
* ``pos_embed`` holds a square grid of positions, ``pos_embed_max_size`` on a side.
* SD3.5 normalizes queries and keys (RMSNorm scales ``attn.ln_q``/``ln_k``); SD3.5 Medium's blocks
  listed in ``dual_attention_layers`` add a second image self-attention (``x_block.attn2``).
* The last block's text stream is "pre only": it feeds the joint attention and stops (modulation
  and q/k/v, no output projection or MLP).
* ``sample_size`` is 128 (1024 px images), the default size of every released SD3; files do not store it.

diffusers' ``convert_sd3_transformer_checkpoint_to_diffusers`` copies every fused tensor it splits; the
conversion here cuts them into views, so no weight is copied and quantized GGUF weights convert unchanged.
"""
from __future__ import annotations

import math
from collections.abc import Collection, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import SD3Transformer2DModel
from transformers import CLIPTextModelWithProjection

from webui.engine.conditioning.prompts import Conditioning, encode_prompts
from webui.engine.conditioning.t5_prompts import MIN_LENGTH as T5_MIN_LENGTH
from webui.engine.conditioning.t5_prompts import encode_t5
from webui.engine.families.base import FlowFamily, FlowFiles
from webui.engine.families.protocol import FamilyFields
from webui.engine.families.flux import LINEAR_PARAMS, cast_in_place, rename_by_table
from webui.engine.formats.detect import UNET, Family, block_count, find_prefix, strip_prefix, tensor_shape
from webui.engine.formats.files import Source, TensorInfo, source_infos, source_tensors
from webui.engine.loading.load import build_module
from webui.engine.lora.layout import LoraTextEncoder
from webui.engine.weights.gguf_load import load_gguf_transformer
from webui.errors import ModelFileError

if TYPE_CHECKING:
    from webui.engine.generate import Resolved
    from webui.engine.loading.load import LoadedModel

StateDict = dict[str, torch.Tensor]

# A tensor every SD3 transformer has (``detect`` recognises the family by it), bare or under UNET.
SD3_MARKER = "joint_blocks.0.context_block.attn.qkv.weight"
SD3_PREFIXES = (UNET, "")
HEAD_DIM = 64
SAMPLE_SIZE = 128
WHAT = "SD3 transformer"  # named in messages about missing tensors

# Stability name -> diffusers names, as in ``flux``: names ending in "." are modules (weight and bias
# follow), the others whole tensors; several diffusers names mean q/k/v fused along dim 0.
TOP_LEVEL: dict[str, tuple[str, ...]] = {
    "pos_embed": ("pos_embed.pos_embed",),
    "x_embedder.proj.": ("pos_embed.proj.",),
    "t_embedder.mlp.0.": ("time_text_embed.timestep_embedder.linear_1.",),
    "t_embedder.mlp.2.": ("time_text_embed.timestep_embedder.linear_2.",),
    "y_embedder.mlp.0.": ("time_text_embed.text_embedder.linear_1.",),
    "y_embedder.mlp.2.": ("time_text_embed.text_embedder.linear_2.",),
    "context_embedder.": ("context_embedder.",),
    "final_layer.linear.": ("proj_out.",),
    "final_layer.adaLN_modulation.1.": ("norm_out.linear.",),
}
X_BLOCK: dict[str, tuple[str, ...]] = {
    "x_block.adaLN_modulation.1.": ("norm1.linear.",),
    "x_block.attn.qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
    "x_block.attn.proj.": ("attn.to_out.0.",),
    "x_block.mlp.fc1.": ("ff.net.0.proj.",),
    "x_block.mlp.fc2.": ("ff.net.2.",),
}
CONTEXT_PRE_ONLY: dict[str, tuple[str, ...]] = {
    "context_block.adaLN_modulation.1.": ("norm1_context.linear.",),
    "context_block.attn.qkv.": ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."),
}
CONTEXT_BLOCK: dict[str, tuple[str, ...]] = CONTEXT_PRE_ONLY | {
    "context_block.attn.proj.": ("attn.to_add_out.",),
    "context_block.mlp.fc1.": ("ff_context.net.0.proj.",),
    "context_block.mlp.fc2.": ("ff_context.net.2.",),
}
QK_NORM: dict[str, tuple[str, ...]] = {
    "x_block.attn.ln_q.weight": ("attn.norm_q.weight",),
    "x_block.attn.ln_k.weight": ("attn.norm_k.weight",),
    "context_block.attn.ln_q.weight": ("attn.norm_added_q.weight",),
    "context_block.attn.ln_k.weight": ("attn.norm_added_k.weight",),
}
DUAL_ATTENTION: dict[str, tuple[str, ...]] = {
    "x_block.attn2.qkv.": ("attn2.to_q.", "attn2.to_k.", "attn2.to_v."),
    "x_block.attn2.proj.": ("attn2.to_out.0.",),
}
DUAL_QK_NORM: dict[str, tuple[str, ...]] = {
    "x_block.attn2.ln_q.weight": ("attn2.norm_q.weight",),
    "x_block.attn2.ln_k.weight": ("attn2.norm_k.weight",),
}
DUAL_MARKER = "x_block.attn2.qkv.weight"
QK_NORM_MARKER = "joint_blocks.0.x_block.attn.ln_q.weight"


def sd3_prefix(keys: Collection[str]) -> str:
    """The prefix of an SD3 transformer's tensors in a file: ``model.diffusion_model.`` or "" (bare)."""
    return find_prefix(keys, SD3_PREFIXES, SD3_MARKER, "an SD3 transformer in Stability AI's layout")


def sd3_config(infos: Mapping[str, TensorInfo]) -> dict:
    """A diffusers ``SD3Transformer2DModel`` config from the tensor shapes of a Stability-layout transformer.

    ``infos`` may carry the ``model.diffusion_model.`` prefix; tensors outside it are ignored.
    """
    infos = strip_prefix(infos, sd3_prefix(infos.keys()))
    inner, in_channels, patch_size, _ = tensor_shape(infos, "x_embedder.proj.weight", WHAT)
    caption_width, joint_attention_dim = tensor_shape(infos, "context_embedder.weight", WHAT)
    _check_widths(inner, caption_width)
    num_layers = block_count(infos, "joint_blocks")
    return {
        "sample_size": SAMPLE_SIZE,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "num_layers": num_layers,
        "attention_head_dim": HEAD_DIM,
        "num_attention_heads": inner // HEAD_DIM,
        "joint_attention_dim": joint_attention_dim,
        "caption_projection_dim": caption_width,
        "pooled_projection_dim": tensor_shape(infos, "y_embedder.mlp.0.weight", WHAT)[1],
        "out_channels": tensor_shape(infos, "final_layer.linear.weight", WHAT)[0] // patch_size**2,
        "pos_embed_max_size": _grid_side(tensor_shape(infos, "pos_embed", WHAT)[1]),
        "dual_attention_layers": tuple(i for i in range(num_layers) if f"joint_blocks.{i}.{DUAL_MARKER}" in infos),
        "qk_norm": "rms_norm" if QK_NORM_MARKER in infos else None,
    }


def _check_widths(inner: int, caption_width: int) -> None:
    """MMDiT's two streams attend jointly, so they must be equally wide, in whole heads."""
    if inner % HEAD_DIM:
        raise ModelFileError(f"This SD3 transformer's width {inner} is not a whole number of {HEAD_DIM}-channel "
                             "attention heads; the file is inconsistent or not an SD3 model.")
    if caption_width != inner:
        raise ModelFileError(f"This SD3 transformer's text stream is {caption_width} channels wide (context_embedder) "
                             f"but its image stream {inner} (x_embedder); the file is inconsistent.")


def _grid_side(positions: int) -> int:
    side = math.isqrt(positions)
    if side * side != positions:
        raise ModelFileError(f"This SD3 transformer's pos_embed holds {positions} positions, not a square grid; "
                             "the file is inconsistent.")
    return side


def _block_table(config: Mapping[str, Any], i: int) -> dict[str, tuple[str, ...]]:
    """Block ``i``'s Stability names (after ``joint_blocks.i.``) -> diffusers names (after ``transformer_blocks.i.``)."""
    qk_norm = config["qk_norm"] is not None
    dual = i in config["dual_attention_layers"]
    context = CONTEXT_PRE_ONLY if i == config["num_layers"] - 1 else CONTEXT_BLOCK
    return (X_BLOCK | context | (QK_NORM if qk_norm else {}) | (DUAL_ATTENTION if dual else {})
            | (DUAL_QK_NORM if dual and qk_norm else {}))


def sd3_key_table(config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Every Stability name of a model with ``config``'s blocks -> its diffusers names (see ``TOP_LEVEL``)."""
    table = dict(TOP_LEVEL)
    for i in range(config["num_layers"]):
        for old, new in _block_table(config, i).items():
            table[f"joint_blocks.{i}.{old}"] = tuple(f"transformer_blocks.{i}.{n}" for n in new)
    return table


def swap_shift_scale(state_dict: StateDict, config: Mapping[str, Any]) -> None:
    """Swap the halves of the modulations Stability stores as (shift, scale), diffusers as (scale, shift); in place.

    Both are ``AdaLayerNormContinuous``: the final layer's and the last block's pre-only text stream's. The swap
    is its own inverse, and the one copy the conversion makes: a linear layer's rows must be in output order.
    """
    modules = ("norm_out.linear.", f"transformer_blocks.{config['num_layers'] - 1}.norm1_context.linear.")
    for key in (module + param for module in modules for param in LINEAR_PARAMS):
        if key in state_dict:
            first, second = state_dict[key].chunk(2)
            state_dict[key] = torch.cat([second, first])


def _split(key: str, tensor: torch.Tensor, inner: int, parts: int) -> tuple[torch.Tensor, ...]:
    """``tensor`` cut along dim 0 into ``parts`` views of ``inner`` rows each (q, k, v)."""
    if tensor.shape[0] != inner * parts:
        raise ModelFileError(f"SD3 tensor {key} has {tensor.shape[0]} rows, not {parts} x {inner} as the model's "
                             "width says; the file is inconsistent.")
    return torch.split(tensor, inner)


def convert_sd3_to_diffusers(state_dict: StateDict, config: Mapping[str, Any]) -> StateDict:
    """Stability names (without prefix) -> ``SD3Transformer2DModel`` names, for any width and depth.

    Consumes ``state_dict`` (``flux.rename_by_table``); q/k/v are views of the fused tensor, so no weight is
    copied except the two swapped modulations (see ``swap_shift_scale``).
    """
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    out = rename_by_table(state_dict, sd3_key_table(config),
                          lambda key, t, parts: _split(key, t, inner, parts) if parts > 1 else (t,))
    swap_shift_scale(out, config)
    return out


@contextmanager
def _naming(name: str) -> Iterator[None]:
    """Prefix the file's name to the ``ModelFileError``s raised inside, which speak of "this transformer"."""
    try:
        yield
    except ModelFileError as e:
        raise ModelFileError(f"{name}: {e.message}") from e


def load_sd3_transformer(source: Source, dtype: torch.dtype = torch.bfloat16) -> SD3Transformer2DModel:
    """The SD3 transformer of a Stability-layout single file (bare or ``model.diffusion_model.``) or of the
    tensors read from one, on the CPU.

    The architecture is checked against the header before any tensor data is read. Tensors of other
    components (VAE, text encoders) are dropped. Peak memory is one copy of the weights plus one tensor.
    """
    name, infos = source_infos(source)
    with _naming(name):
        prefix = sd3_prefix(infos.keys())
        config = sd3_config(infos)
    state_dict = source_tensors(source, prefix)
    cast_in_place(state_dict, dtype)
    with _naming(name):
        converted = convert_sd3_to_diffusers(state_dict, config)
    return build_module(SD3Transformer2DModel, config, converted, name, dtype).requires_grad_(False).eval()


def load_gguf_sd3_transformer(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> SD3Transformer2DModel:
    """The SD3 transformer of a GGUF file with Stability's names (see ``gguf_load.load_gguf_transformer``)."""
    return load_gguf_transformer(path, "sd3", SD3Transformer2DModel, "an SD3 transformer", sd3_prefix, sd3_config,
                                 convert_sd3_to_diffusers, dtype)


class StableDiffusion3(FlowFamily):
    """Both CLIPs' tokens side by side, widened to T5's width and followed by T5's tokens (zeros without T5), and
    the two CLIPs' pooled outputs; the flow shift is a setting (``sd3_shift``)."""

    family = Family.SD3
    activation_per_pixel = 20_000
    clip_kinds = ("clip_l", "clip_g")
    form_fields = FamilyFields(shift=True)
    clip_penultimate = True
    files = FlowFiles(SD3Transformer2DModel, (CLIPTextModelWithProjection,) * 2, load_sd3_transformer,
                      load_gguf_sd3_transformer, t5_required=False)
    lora_text_encoders = (LoraTextEncoder("text_encoder", "clip_l", ("lora_te1_",)),
                          LoraTextEncoder("text_encoder_2", "clip_g", ("lora_te2_",)),
                          LoraTextEncoder("text_encoder_3", "t5xxl", ("lora_te3_",)))

    def key_table(self, config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        return sd3_key_table(config)

    def swap_stored_halves(self, state_dict: StateDict, config: Mapping[str, Any]) -> None:
        swap_shift_scale(state_dict, config)

    def encode(self, model: LoadedModel, prompts: list[str], clip_skip: int, device: torch.device,
               dtype: torch.dtype) -> Conditioning:
        clip = encode_prompts(prompts, model.text_encoders, clip_skip, device=device, dtype=dtype)
        width = model.denoiser.config.joint_attention_dim
        t5 = encode_t5(prompts, model.t5, device, dtype) if model.t5 is not None else \
            torch.zeros(len(prompts), T5_MIN_LENGTH, width, device=device, dtype=dtype)
        widened = torch.nn.functional.pad(clip.embeds, (0, width - clip.embeds.shape[-1]))
        return Conditioning(torch.cat([widened, t5], dim=1), clip.pooled)

    def shift(self, model: LoadedModel, job: Resolved) -> float:
        return job.shift

    def infotext_fields(self, model: LoadedModel, job: Resolved) -> dict:
        return {"Shift": job.shift}
