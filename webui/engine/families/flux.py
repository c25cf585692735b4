"""Flux transformers (the denoiser alone) from single files in Black Forest Labs' original layout.

BFL's files name tensors ``double_blocks.N.img_attn.qkv.weight``, ``single_blocks.N.linear1.weight``,
``img_in.weight`` ...; ComfyUI/Forge save the same names under ``model.diffusion_model.``.

The architecture comes from tensor shapes, as in ``detect``:

* Widths (inner, input, text, pooled, output) come from the embedders' and final layer's shapes.
* The head dim is the size of a q-norm scale (an RMSNorm over one head): 128 in every released Flux.
* The rotary axes split each head's channels 1 : 3.5 : 3.5 between (time, row, column), as Flux's
  (16, 56, 56) does for 128 channels; other head dims keep that ratio, rounded to even sizes since
  rotary embeddings rotate channel pairs (see ``rope_axes``).
* ``patch_size`` is 1: Flux packs 2x2 latent patches into 64 channels before the transformer.

diffusers' own ``convert_flux_transformer_checkpoint_to_diffusers`` hard-codes a 3072-wide model;
the conversion here takes the width from the config, so tiny test models take the same path.
"""
from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from transformers import CLIPTextModel

from webui.engine.conditioning.prompts import Conditioning, encode_prompts
from webui.engine.conditioning.t5_prompts import encode_t5
from webui.engine.families.base import FlowFamily, FlowFiles
from webui.engine.families.protocol import FamilyFields
from webui.engine.formats.detect import Family, block_count, flux_prefix, strip_prefix, tensor_shape
from webui.engine.formats.files import Source, TensorInfo, source_infos, source_tensors
from webui.engine.loading.load import build_module
from webui.engine.lora.layout import LoraTextEncoder
from webui.engine.memory import host_pages
from webui.engine.weights.fp8 import is_fp8
from webui.engine.weights.gguf_load import load_gguf_transformer
from webui.errors import ModelFileError

if TYPE_CHECKING:
    from webui.engine.generate import Resolved
    from webui.engine.loading.load import LoadedModel

StateDict = dict[str, torch.Tensor]
Splitter = Callable[[str, torch.Tensor, int], tuple[torch.Tensor, ...]]

# BFL name -> diffusers names. Names ending in "." are modules (their weight and bias follow); the
# others are whole tensor names. Several diffusers names mean a fused tensor split along dim 0: every
# part but the last is one inner width, the last takes the rest (q/k/v, or q/k/v/mlp in linear1).
TOP_LEVEL: dict[str, tuple[str, ...]] = {
    "img_in.": ("x_embedder.",),
    "txt_in.": ("context_embedder.",),
    "time_in.in_layer.": ("time_text_embed.timestep_embedder.linear_1.",),
    "time_in.out_layer.": ("time_text_embed.timestep_embedder.linear_2.",),
    "vector_in.in_layer.": ("time_text_embed.text_embedder.linear_1.",),
    "vector_in.out_layer.": ("time_text_embed.text_embedder.linear_2.",),
    "final_layer.linear.": ("proj_out.",),
    "final_layer.adaLN_modulation.1.": ("norm_out.linear.",),
}
GUIDANCE: dict[str, tuple[str, ...]] = {
    "guidance_in.in_layer.": ("time_text_embed.guidance_embedder.linear_1.",),
    "guidance_in.out_layer.": ("time_text_embed.guidance_embedder.linear_2.",),
}
DOUBLE_BLOCK: dict[str, tuple[str, ...]] = {
    "img_mod.lin.": ("norm1.linear.",),
    "txt_mod.lin.": ("norm1_context.linear.",),
    "img_attn.qkv.": ("attn.to_q.", "attn.to_k.", "attn.to_v."),
    "txt_attn.qkv.": ("attn.add_q_proj.", "attn.add_k_proj.", "attn.add_v_proj."),
    "img_attn.norm.query_norm.scale": ("attn.norm_q.weight",),
    "img_attn.norm.key_norm.scale": ("attn.norm_k.weight",),
    "txt_attn.norm.query_norm.scale": ("attn.norm_added_q.weight",),
    "txt_attn.norm.key_norm.scale": ("attn.norm_added_k.weight",),
    "img_attn.proj.": ("attn.to_out.0.",),
    "txt_attn.proj.": ("attn.to_add_out.",),
    "img_mlp.0.": ("ff.net.0.proj.",),
    "img_mlp.2.": ("ff.net.2.",),
    "txt_mlp.0.": ("ff_context.net.0.proj.",),
    "txt_mlp.2.": ("ff_context.net.2.",),
}
SINGLE_BLOCK: dict[str, tuple[str, ...]] = {
    "modulation.lin.": ("norm.linear.",),
    "linear1.": ("attn.to_q.", "attn.to_k.", "attn.to_v.", "proj_mlp."),
    "norm.query_norm.scale": ("attn.norm_q.weight",),
    "norm.key_norm.scale": ("attn.norm_k.weight",),
    "linear2.": ("proj_out.",),
}
# BFL's final modulation outputs (shift, scale); diffusers' AdaLayerNormContinuous expects (scale, shift).
SWAPPED_HALVES = ("norm_out.linear.weight", "norm_out.linear.bias")
LINEAR_PARAMS = ("weight", "bias")
WHAT = "Flux transformer"  # named in messages about missing tensors
# Flux-dev's scheduler config: mu runs linearly from 0.5 at 256 image tokens to 1.15 at 4096.
FLUX_BASE_SHIFT, FLUX_MAX_SHIFT, FLUX_BASE_SEQ, FLUX_MAX_SEQ = 0.5, 1.15, 256, 4096
FILL_MASK_PATCH = 8  # Flux Fill sees its mask as 8x8-pixel patches, one latent each


def rope_axes(head_dim: int) -> tuple[int, int, int]:
    """Rotary channels per (time, row, column) axis: Flux's (16, 56, 56) at 128, the same ratio elsewhere.

    Each spatial axis gets 7/16 of the channels rounded down to an even count, time the rest.
    """
    spatial = head_dim * 7 // 16 // 2 * 2
    return (head_dim - 2 * spatial, spatial, spatial)


def flux_config(infos: dict[str, TensorInfo]) -> dict:
    """A diffusers ``FluxTransformer2DModel`` config from the tensor shapes of a BFL-layout transformer.

    ``infos`` may carry the ``model.diffusion_model.`` prefix; tensors outside it are ignored.
    """
    infos = strip_prefix(infos, flux_prefix(infos))
    inner, in_channels = tensor_shape(infos, "img_in.weight", WHAT)
    (head_dim,) = tensor_shape(infos, "double_blocks.0.img_attn.norm.query_norm.scale", WHAT)
    if inner % head_dim:
        raise ModelFileError(f"This Flux transformer's width {inner} is not a whole number of {head_dim}-channel "
                             "attention heads; the file is inconsistent.")
    return {
        "patch_size": 1,
        "in_channels": in_channels,
        "out_channels": tensor_shape(infos, "final_layer.linear.weight", WHAT)[0],
        "num_layers": block_count(infos, "double_blocks"),
        "num_single_layers": block_count(infos, "single_blocks"),
        "attention_head_dim": head_dim,
        "num_attention_heads": inner // head_dim,
        "joint_attention_dim": tensor_shape(infos, "txt_in.weight", WHAT)[1],
        "pooled_projection_dim": tensor_shape(infos, "vector_in.in_layer.weight", WHAT)[1],
        "guidance_embeds": "guidance_in.in_layer.weight" in infos,
        "axes_dims_rope": rope_axes(head_dim),
    }


def flux_key_table(config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
    """Every BFL name of a model with ``config``'s depth -> its diffusers names (see ``TOP_LEVEL``)."""
    table = dict(TOP_LEVEL) | (GUIDANCE if config["guidance_embeds"] else {})
    blocks = (("double_blocks", "transformer_blocks", DOUBLE_BLOCK, config["num_layers"]),
              ("single_blocks", "single_transformer_blocks", SINGLE_BLOCK, config["num_single_layers"]))
    for bfl, diffusers, names, count in blocks:
        for i in range(count):
            for old, new in names.items():
                table[f"{bfl}.{i}.{old}"] = tuple(f"{diffusers}.{i}.{n}" for n in new)
    return table


def swap_halves(state_dict: StateDict) -> None:
    """Swap the two halves of the final modulation (its own inverse), in place."""
    for key in SWAPPED_HALVES:
        if key in state_dict:
            first, second = state_dict[key].chunk(2)
            state_dict[key] = torch.cat([second, first])


def _split(key: str, tensor: torch.Tensor, inner: int, parts: int) -> tuple[torch.Tensor, ...]:
    """``tensor`` cut along dim 0 into ``parts`` (views): all but the last ``inner`` rows, the last the rest."""
    rest = tensor.shape[0] - inner * (parts - 1)
    if rest <= 0:
        raise ModelFileError(f"Flux tensor {key} has {tensor.shape[0]} rows, too few for {parts} parts of "
                             f"width {inner}; the file is inconsistent.")
    return torch.split(tensor, [inner] * (parts - 1) + [rest])


def rename_by_table(state_dict: StateDict, table: Mapping[str, tuple[str, ...]], split: Splitter) -> StateDict:
    """Original names -> diffusers names by ``table`` (see ``TOP_LEVEL``); a fused tensor is cut by
    ``split(key, tensor, parts)`` into views, one per target.

    Consumes ``state_dict``: each tensor is popped as it is renamed. Names the table does not know pass
    through unchanged, for ``build_module`` to report.
    """
    out: StateDict = {}
    for key in list(state_dict):
        tensor = state_dict.pop(key)
        module, _, param = key.rpartition(".")
        if key in table:
            out[table[key][0]] = tensor
        elif module + "." in table and param in LINEAR_PARAMS:
            targets = table[module + "."]
            out.update((t + param, part) for t, part in zip(targets, split(key, tensor, len(targets))))
        else:
            out[key] = tensor
    return out


def convert_flux_to_diffusers(state_dict: StateDict, config: Mapping[str, Any]) -> StateDict:
    """BFL names (without prefix) -> ``FluxTransformer2DModel`` names, for any width and depth.

    Consumes ``state_dict``; split parts are views of the fused tensor (sharing its storage), so no weight
    is ever copied.
    """
    inner = config["num_attention_heads"] * config["attention_head_dim"]
    out = rename_by_table(state_dict, flux_key_table(config), lambda key, t, parts: _split(key, t, inner, parts))
    swap_halves(out)
    return out


def cast_in_place(state_dict: StateDict, dtype: torch.dtype) -> None:
    """Float tensors to ``dtype`` one at a time, each original dropped (its file pages too) as soon as its copy exists."""
    spans = host_pages.model_file_mappings()
    for key, tensor in state_dict.items():
        if tensor.is_floating_point() and not is_fp8(tensor):
            state_dict[key] = host_pages.cast(tensor, dtype, spans)


def load_flux_transformer(source: Source, dtype: torch.dtype = torch.bfloat16) -> FluxTransformer2DModel:
    """The Flux transformer of a BFL-layout single file (bare or ``model.diffusion_model.``) or of the tensors
    read from one, on the CPU.

    The architecture is checked against the header before any tensor data is read (a ``.ckpt`` is
    unpickled twice for that; Flux ships as safetensors). Tensors of other components in the file
    (VAE, text encoders) are dropped. Peak memory is one copy of the weights plus one tensor.
    """
    name, infos = source_infos(source)
    config = flux_config(infos)
    state_dict = source_tensors(source, flux_prefix(infos))
    cast_in_place(state_dict, dtype)
    converted = convert_flux_to_diffusers(state_dict, config)
    return build_module(FluxTransformer2DModel, config, converted, name, dtype).requires_grad_(False).eval()



def load_gguf_flux_transformer(path: str | Path, dtype: torch.dtype = torch.bfloat16) -> FluxTransformer2DModel:
    """The Flux transformer of a GGUF file with BFL names (see ``gguf_load.load_gguf_transformer``)."""
    return load_gguf_transformer(path, "flux", FluxTransformer2DModel, "a Flux transformer", flux_prefix,
                                 flux_config, convert_flux_to_diffusers, dtype)


class Flux(FlowFamily):
    """T5's tokens and CLIP-L's pooled output; Flux dev's shift grows with the image (diffusers'
    ``calculate_shift``) and its distilled guidance scale is an input of the transformer; Flux schnell (no
    guidance embedder) runs unshifted."""

    family = Family.FLUX
    activation_per_pixel = 20_000
    clip_kinds = ("clip_l",)
    form_fields = FamilyFields(distilled_cfg=True)
    files = FlowFiles(FluxTransformer2DModel, (CLIPTextModel,), load_flux_transformer, load_gguf_flux_transformer,
                      t5_required=True)
    lora_text_encoders = (LoraTextEncoder("text_encoder", "clip_l", ("lora_te1_", "lora_te_")),
                          LoraTextEncoder("text_encoder_2", "t5xxl", ("lora_te3_", "lora_te2_")))
    lora_prefixes = replace(FlowFamily.lora_prefixes, kohya_original=("lora_unet_", "lora_flux_"))

    def key_table(self, config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        return flux_key_table(config)

    def swap_stored_halves(self, state_dict: StateDict, config: Mapping[str, Any]) -> None:
        swap_halves(state_dict)

    def encode(self, model: LoadedModel, prompts: list[str], clip_skip: int, device: torch.device,
               dtype: torch.dtype) -> Conditioning:
        clip = encode_prompts(prompts, model.text_encoders, clip_skip, device=device, dtype=dtype)
        return Conditioning(encode_t5(prompts, model.t5, device, dtype), clip.pooled)

    def shift(self, model: LoadedModel, job: Resolved) -> float:
        req = job.request
        return flux_shift(req.width, req.height) if model.denoiser.config.get("guidance_embeds", False) else 1.0

    def pack(self, noise: torch.Tensor) -> torch.Tensor:
        """Flux sees the latent image as a sequence of 2x2 patches."""
        batch, channels, h, w = noise.shape
        return FluxPipeline._pack_latents(noise, batch, channels, h, w)

    def unpack(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        _, _, h, w = noise.shape
        return FluxPipeline._unpack_latents(latents, h * 8, w * 8, 8)

    def inputs(self, denoiser: torch.nn.Module, noise: torch.Tensor, context: torch.Tensor, copies: int,
               distilled_cfg: float) -> dict:
        """(0, row, column) position ids of the patches, zeros for the text tokens, and Flux dev's distilled
        guidance scale."""
        batch, _, h, w = noise.shape
        inputs = {"img_ids": FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, noise.device, noise.dtype),
                  "txt_ids": torch.zeros(context.shape[1], 3, device=noise.device, dtype=noise.dtype)}
        if denoiser.config.guidance_embeds:
            inputs["guidance"] = torch.full((batch * copies,), distilled_cfg, device=noise.device, dtype=torch.float32)
        return inputs

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t / 1000

    def infotext_fields(self, model: LoadedModel, job: Resolved) -> dict:
        return {"Distilled CFG Scale": job.request.distilled_cfg_scale} if model.denoiser.config.guidance_embeds else {}

    def is_inpainting(self, denoiser: torch.nn.Module) -> bool:
        return denoiser.config.in_channels == 4 * (2 * self.latent_channels + FILL_MASK_PATCH ** 2)

    def inpainting_input(self, denoiser: torch.nn.Module, mask: torch.Tensor,
                         masked: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """Flux Fill's (a transformer whose input is 384 wide, not 64): the masked picture's latents, then the mask's
        8x8-pixel patches as 64 channels at the latents' size, in the order diffusers' FluxFillPipeline packs them
        (``pack`` makes its 320 input channels of them)."""
        if not self.is_inpainting(denoiser):
            return None
        patch = FILL_MASK_PATCH
        latents = masked()
        _, _, h, w = latents.shape
        patches = mask[:, 0].view(1, h, patch, w, patch).permute(0, 2, 4, 1, 3).reshape(1, patch * patch, h, w)
        return torch.cat([latents, patches.to(latents).expand(len(latents), -1, -1, -1)], dim=1)


def flux_shift(width: int, height: int) -> float:
    """Flux-dev's resolution-dependent shift: exp(mu), mu linear in the number of image tokens."""
    tokens = (height // 16) * (width // 16)
    slope = (FLUX_MAX_SHIFT - FLUX_BASE_SHIFT) / (FLUX_MAX_SEQ - FLUX_BASE_SEQ)
    return math.exp(FLUX_BASE_SHIFT + slope * (tokens - FLUX_BASE_SEQ))
