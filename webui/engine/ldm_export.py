"""Write a ``SyntheticModel`` as an A1111/LDM single-file checkpoint or as a diffusers folder.

The single-file writer is the inverse of diffusers' single-file conversion
(``diffusers.loaders.single_file_utils.convert_ldm_*``): it maps diffusers state dicts back to the
original LDM/SGM key names, with the tensor layouts real files use (VAE attention as 1x1 convs,
OpenCLIP's fused ``in_proj`` and ``[width, proj]`` text projection), plus the extra tensors real files
carry and loaders must tolerate (noise schedule buffers, CLIP ``position_ids``, OpenCLIP ``logit_scale``).

Flux transformers are written in Black Forest Labs' layout, the inverse of ``flux.convert_flux_to_diffusers``.
"""
from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    EulerDiscreteScheduler,
    FluxTransformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file

from webui.engine.flux import LINEAR_PARAMS, flux_key_table, swap_halves
from webui.engine.synthetic import SyntheticModel, build_flux_transformer
from webui.engine.tokenizer import clip_tokenizer

StateDict = dict[str, torch.Tensor]

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
# Where each family's text encoders live in a single file, and whether they use OpenCLIP's layout.
TEXT_ENCODER_PREFIXES: dict[str, tuple[tuple[str, bool], ...]] = {
    "sd1": (("cond_stage_model.transformer.", False),),
    "sd2": (("cond_stage_model.model.", True),),
    "sdxl": (("conditioner.embedders.0.transformer.", False), ("conditioner.embedders.1.model.", True)),
}
# Noise schedule buffers of LDM's DDPM (SD1/SD2 files; SDXL's SGM files have none). Kept in float32.
LDM_SCHEDULE_KEYS = (
    "betas",
    "alphas_cumprod",
    "alphas_cumprod_prev",
    "sqrt_alphas_cumprod",
    "sqrt_one_minus_alphas_cumprod",
    "log_one_minus_alphas_cumprod",
    "sqrt_recip_alphas_cumprod",
    "sqrt_recipm1_alphas_cumprod",
    "posterior_variance",
    "posterior_log_variance_clipped",
    "posterior_mean_coef1",
    "posterior_mean_coef2",
)
# Families saved by LDM's DDPM class, whose files carry the LDM_SCHEDULE_KEYS buffers.
LDM_DDPM_FAMILIES = ("sd1", "sd2")
# Forge/ComfyUI's marker of a v-prediction model: an empty tensor under this key.
V_PREDICTION_KEY = "v_pred"
# OpenCLIP's trained temperature, ln(100).
OPEN_CLIP_LOGIT_SCALE = math.log(100.0)

_UNET_RESNET = {
    "norm1.": "in_layers.0.",
    "conv1.": "in_layers.2.",
    "time_emb_proj.": "emb_layers.1.",
    "norm2.": "out_layers.0.",
    "conv2.": "out_layers.3.",
    "conv_shortcut.": "skip_connection.",
}
_VAE_RESNET = {"conv_shortcut.": "nin_shortcut."}
_VAE_ATTENTION = {"group_norm.": "norm.", "to_q.": "q.", "to_k.": "k.", "to_v.": "v.", "to_out.0.": "proj_out."}
_OPEN_CLIP_LAYER = {
    "self_attn.out_proj.": "attn.out_proj.",
    "layer_norm1.": "ln_1.",
    "layer_norm2.": "ln_2.",
    "mlp.fc1.": "mlp.c_fc.",
    "mlp.fc2.": "mlp.c_proj.",
}
# Whole-key OpenCLIP names from diffusers' own table; the text projection is handled apart (transposed).
_OPEN_CLIP_EXACT = {
    d: ldm for d, ldm in DIFFUSERS_TO_LDM_MAPPING["openclip"]["layers"].items() if d != "text_projection.weight"
}

# A block map: diffusers prefix -> (LDM prefix, renames applied to what follows the prefix).
BlockMap = dict[str, tuple[str, dict[str, str]]]


def _remap(state_dict: StateDict, blocks: BlockMap, exact: dict[str, str]) -> StateDict:
    """Rename every key through ``exact`` (whole keys) or ``blocks``; fail on a key neither covers."""
    out = {}
    for key, value in state_dict.items():
        if key in exact:
            out[exact[key]] = value
            continue
        prefix = next((p for p in blocks if key.startswith(p)), None)
        if prefix is None:
            raise KeyError(f"no LDM name for diffusers key {key!r}")
        ldm_prefix, renames = blocks[prefix]
        rest = key[len(prefix) :]
        old = next((o for o in renames if rest.startswith(o)), None)
        out[ldm_prefix + (renames[old] + rest[len(old) :] if old else rest)] = value
    return out


def _unet_blocks(config) -> BlockMap:
    """Diffusers' down/mid/up blocks → LDM's flat input_blocks / middle_block / output_blocks."""
    per_level = config["layers_per_block"]
    levels = len(config["down_block_types"])
    blocks: BlockMap = {}
    index = 1  # input_blocks.0 is conv_in
    for level in range(levels):
        for layer in range(per_level):
            blocks[f"down_blocks.{level}.resnets.{layer}."] = (f"input_blocks.{index}.0.", _UNET_RESNET)
            blocks[f"down_blocks.{level}.attentions.{layer}."] = (f"input_blocks.{index}.1.", {})
            index += 1
        if level < levels - 1:
            blocks[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", {})
            index += 1
    blocks["mid_block.resnets.0."] = ("middle_block.0.", _UNET_RESNET)
    blocks["mid_block.attentions.0."] = ("middle_block.1.", {})
    blocks["mid_block.resnets.1."] = ("middle_block.2.", _UNET_RESNET)
    index = 0
    for level, block_type in enumerate(config["up_block_types"]):
        for layer in range(per_level + 1):
            blocks[f"up_blocks.{level}.resnets.{layer}."] = (f"output_blocks.{index}.0.", _UNET_RESNET)
            blocks[f"up_blocks.{level}.attentions.{layer}."] = (f"output_blocks.{index}.1.", {})
            index += 1
        if level < levels - 1:
            # The upsampler follows the last resnet (and its attention, if the level has one).
            slot = 2 if "CrossAttn" in block_type else 1
            blocks[f"up_blocks.{level}.upsamplers.0.conv."] = (f"output_blocks.{index - 1}.{slot}.conv.", {})
    return blocks


def unet_to_ldm(state_dict: StateDict, config) -> StateDict:
    """Diffusers ``UNet2DConditionModel`` state dict → LDM names, without the ``model.diffusion_model.`` prefix."""
    exact = dict(DIFFUSERS_TO_LDM_MAPPING["unet"]["layers"])
    if config.get("addition_embed_type") == "text_time":
        exact.update(DIFFUSERS_TO_LDM_MAPPING["unet"]["addition_embed_type"])
    return _remap(state_dict, _unet_blocks(config), exact)


def _vae_blocks(config) -> BlockMap:
    levels = len(config["down_block_types"])
    blocks: BlockMap = {}
    for level in range(levels):
        blocks[f"encoder.down_blocks.{level}.resnets."] = (f"encoder.down.{level}.block.", _VAE_RESNET)
        blocks[f"encoder.down_blocks.{level}.downsamplers.0."] = (f"encoder.down.{level}.downsample.", {})
        # LDM numbers decoder levels from the lowest resolution up; diffusers in execution order.
        up = levels - 1 - level
        blocks[f"decoder.up_blocks.{level}.resnets."] = (f"decoder.up.{up}.block.", _VAE_RESNET)
        blocks[f"decoder.up_blocks.{level}.upsamplers.0."] = (f"decoder.up.{up}.upsample.", {})
    for part in ("encoder", "decoder"):
        blocks[f"{part}.mid_block.resnets.0."] = (f"{part}.mid.block_1.", _VAE_RESNET)
        blocks[f"{part}.mid_block.resnets.1."] = (f"{part}.mid.block_2.", _VAE_RESNET)
        blocks[f"{part}.mid_block.attentions.0."] = (f"{part}.mid.attn_1.", _VAE_ATTENTION)
    return blocks


def vae_to_ldm(state_dict: StateDict, config) -> StateDict:
    """Diffusers ``AutoencoderKL`` state dict → LDM names, without the ``first_stage_model.`` prefix.

    The mid-block attention projections become 1x1 conv weights ``[C, C, 1, 1]``, as in real files.
    """
    exact = DIFFUSERS_TO_LDM_MAPPING["vae"]
    out = _remap(state_dict, _vae_blocks(config), exact)
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out


def text_state_dict(encoder: torch.nn.Module) -> StateDict:
    """A CLIP text model's state dict with the ``text_model.`` prefix that checkpoints use.

    Recent transformers flatten ``CLIPTextModel`` (no ``text_model.`` prefix) but not
    ``CLIPTextModelWithProjection``; this gives both the same layout.
    """
    return {
        k if k.startswith(("text_model.", "text_projection.")) else f"text_model.{k}": v
        for k, v in encoder.state_dict().items()
    }


def clip_to_ldm(state_dict: StateDict) -> StateDict:
    """OpenAI CLIP keeps the transformers layout in LDM files; only ``position_ids`` is added, as real files have."""
    embedding = state_dict["text_model.embeddings.position_embedding.weight"]
    position_ids = torch.arange(embedding.shape[0], dtype=torch.int64, device=embedding.device)[None]
    return {**state_dict, "text_model.embeddings.position_ids": position_ids}


def open_clip_to_ldm(state_dict: StateDict) -> StateDict:
    """Transformers CLIP layout (``text_state_dict``) → OpenCLIP's, without the ``...model.`` prefix.

    q/k/v projections are fused into ``attn.in_proj_*``; the text projection is stored ``[width, proj]``
    (the transpose of ``nn.Linear.weight``); ``logit_scale`` is added as real files have it.
    """
    rest = dict(state_dict)
    layers = sorted({int(k.split(".")[3]) for k in rest if k.startswith("text_model.encoder.layers.")})
    out: StateDict = {}
    for i in layers:
        attn = f"text_model.encoder.layers.{i}.self_attn."
        for kind in ("weight", "bias"):
            qkv = [rest.pop(f"{attn}{p}_proj.{kind}") for p in "qkv"]
            out[f"transformer.resblocks.{i}.attn.in_proj_{kind}"] = torch.cat(qkv)
    projection = rest.pop("text_projection.weight", None)
    if projection is not None:
        out["text_projection"] = projection.T.contiguous()
    blocks = {f"text_model.encoder.layers.{i}.": (f"transformer.resblocks.{i}.", _OPEN_CLIP_LAYER) for i in layers}
    out.update(_remap(rest, blocks, _OPEN_CLIP_EXACT))
    device = state_dict["text_model.embeddings.token_embedding.weight"].device
    out["logit_scale"] = torch.tensor(OPEN_CLIP_LOGIT_SCALE, device=device)
    return out


def _ldm_schedule() -> StateDict:
    """The DDPM buffers LDM saves with SD1/SD2 (scaled-linear betas 0.00085..0.012), as float32."""
    betas = torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64) ** 2
    alphas_cumprod = torch.cumprod(1.0 - betas, dim=0)
    prev = torch.cat([torch.ones(1, dtype=torch.float64), alphas_cumprod[:-1]])
    posterior_variance = betas * (1.0 - prev) / (1.0 - alphas_cumprod)
    schedule = {
        "betas": betas,
        "alphas_cumprod": alphas_cumprod,
        "alphas_cumprod_prev": prev,
        "sqrt_alphas_cumprod": alphas_cumprod.sqrt(),
        "sqrt_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).sqrt(),
        "log_one_minus_alphas_cumprod": (1.0 - alphas_cumprod).log(),
        "sqrt_recip_alphas_cumprod": (1.0 / alphas_cumprod).sqrt(),
        "sqrt_recipm1_alphas_cumprod": (1.0 / alphas_cumprod - 1.0).sqrt(),
        "posterior_variance": posterior_variance,
        "posterior_log_variance_clipped": posterior_variance.clamp(min=1e-20).log(),
        "posterior_mean_coef1": betas * prev.sqrt() / (1.0 - alphas_cumprod),
        "posterior_mean_coef2": (1.0 - prev) * (1.0 - betas).sqrt() / (1.0 - alphas_cumprod),
    }
    return {k: schedule[k].float() for k in LDM_SCHEDULE_KEYS}


def _prefixed(prefix: str, state_dict: StateDict) -> StateDict:
    return {prefix + k: v for k, v in state_dict.items()}


def ldm_state_dict(model: SyntheticModel) -> StateDict:
    """The complete single-file state dict of ``model`` in the components' own dtypes and devices.

    A v-prediction model gets the ``v_pred`` marker key, since LDM files hold no scheduler config.
    """
    out = _prefixed(UNET_PREFIX, unet_to_ldm(model.unet.state_dict(), model.unet.config))
    out.update(_prefixed(VAE_PREFIX, vae_to_ldm(model.vae.state_dict(), model.vae.config)))
    for i, (encoder, (prefix, open_clip)) in enumerate(zip(model.text_encoders, TEXT_ENCODER_PREFIXES[model.family])):
        weights = text_state_dict(encoder) | (model.text_encoder_extras if i == 0 else {})
        out.update(_prefixed(prefix, open_clip_to_ldm(weights) if open_clip else clip_to_ldm(weights)))
    if model.family in LDM_DDPM_FAMILIES:
        out.update(_ldm_schedule())
    if model.prediction_type == "v_prediction":
        out[V_PREDICTION_KEY] = torch.empty(0)
    return out


def _for_file(key: str, value: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    value = value.detach().cpu()
    if value.is_floating_point() and key not in LDM_SCHEDULE_KEYS:
        value = value.to(dtype)
    return value.contiguous()


def write_a1111_checkpoint(
    path: str | Path,
    model: SyntheticModel,
    dtype: torch.dtype = torch.float16,
    metadata: dict[str, str] | None = None,
) -> Path:
    """Write ``model`` as one A1111-style ``.safetensors`` file; weights in ``dtype``, schedule in float32."""
    path = Path(path)
    tensors = {k: _for_file(k, v, dtype) for k, v in ldm_state_dict(model).items()}
    save_file(tensors, str(path), metadata=metadata)
    return path


def _in_dtype(module: torch.nn.Module, dtype: torch.dtype) -> torch.nn.Module:
    """``module`` itself if already in ``dtype``, else a converted copy (the model is left as it is)."""
    if all(p.dtype == dtype for p in module.parameters()):
        return module
    return copy.deepcopy(module).to(dtype)


def _scheduler(prediction_type: str) -> EulerDiscreteScheduler:
    return EulerDiscreteScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type=prediction_type,
        steps_offset=1,
        timestep_spacing="leading",
    )


def write_diffusers_folder(path: str | Path, model: SyntheticModel, dtype: torch.dtype = torch.float32) -> Path:
    """Write ``model`` as a diffusers pipeline folder that ``from_pretrained`` loads offline.

    No safety checker. Tokenizers are the project's offline CLIP tokenizers: CLIP-L pads with
    end-of-text, OpenCLIP (SD2, SDXL's second encoder) with "!".
    """
    path = Path(path)
    unet, vae, *encoders = (_in_dtype(m, dtype) for m in (model.unet, model.vae, *model.text_encoders))
    scheduler = _scheduler(model.prediction_type)
    if model.family == "sdxl":
        pipe = StableDiffusionXLPipeline(
            vae=vae,
            text_encoder=encoders[0],
            text_encoder_2=encoders[1],
            tokenizer=clip_tokenizer(),
            tokenizer_2=clip_tokenizer("!"),
            unet=unet,
            scheduler=scheduler,
            add_watermarker=False,
        )
    else:
        pipe = StableDiffusionPipeline(
            vae=vae,
            text_encoder=encoders[0],
            tokenizer=clip_tokenizer("!" if model.family == "sd2" else "<|endoftext|>"),
            unet=unet,
            scheduler=scheduler,
            safety_checker=None,
            feature_extractor=None,
            requires_safety_checker=False,
        )
    pipe.save_pretrained(path, safe_serialization=True)
    return path


def flux_to_bfl(state_dict: StateDict, config: Mapping[str, Any]) -> StateDict:
    """``FluxTransformer2DModel`` names -> BFL's (without prefix); split tensors are fused back.

    Consumes ``state_dict`` (tensors are popped as they are renamed or fused).
    """
    swap_halves(state_dict)
    out: StateDict = {}
    for bfl, targets in flux_key_table(config).items():
        for param in LINEAR_PARAMS if bfl.endswith(".") else ("",):
            parts = [state_dict.pop(t + param) for t in targets]
            out[bfl + param] = parts[0] if len(parts) == 1 else torch.cat(parts)
    if state_dict:
        raise KeyError(f"no BFL name for diffusers keys {sorted(state_dict)[:3]}")
    return out


def write_flux_transformer(
    path: str | Path,
    model: FluxTransformer2DModel,
    dtype: torch.dtype = torch.bfloat16,
    prefix: str = "",
) -> Path:
    """Write ``model`` as a BFL-layout ``.safetensors`` file in ``dtype``, its names under ``prefix``.

    ``prefix=""`` is BFL's own layout; ``"model.diffusion_model."`` is how ComfyUI/Forge save it.
    Each tensor is moved to the CPU before fusing, so the GPU needs nothing beyond the model.
    """
    path = Path(path)
    tensors = {k: _for_file(k, v, dtype) for k, v in model.state_dict().items()}
    save_file(_prefixed(prefix, flux_to_bfl(tensors, model.config)), str(path))
    return path


def write_flux_checkpoint(
    path: str | Path,
    size: str = "full",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    prefix: str = "",
) -> Path:
    """A random Flux transformer (``build_flux_transformer``) written in BFL's layout, for benchmarks.

    Full size in bfloat16 takes 23.8 GB on ``device`` and about as much host memory while writing.
    """
    return write_flux_transformer(path, build_flux_transformer(size, seed, device, dtype), dtype, prefix)
