"""Write a ``SyntheticModel`` as an A1111/LDM single-file checkpoint or as a diffusers folder.

The single-file writer is the inverse of diffusers' single-file conversion
(``diffusers.loaders.single_file_utils.convert_ldm_*``): it maps diffusers state dicts back to the
original LDM/SGM key names, with the tensor layouts real files use (VAE attention as 1x1 convs,
OpenCLIP's fused ``in_proj`` and ``[width, proj]`` text projection), plus the extra tensors real files
carry and loaders must tolerate (noise schedule buffers, CLIP ``position_ids``, OpenCLIP ``logit_scale``).

Flux transformers are written in Black Forest Labs' layout, the inverse of ``flux.convert_flux_to_diffusers``;
SD3 transformers in Stability AI's, the inverse of ``sd3.convert_sd3_to_diffusers``.

Flux's and SD3's other components are written as the files users download: the separate T5, CLIP and VAE
files (``write_t5_file``, ``write_clip_file``, ``write_vae_file``) and the all-in-one checkpoints of
Comfy-Org and Stability AI (``write_flux_all_in_one``, ``write_sd3_all_in_one``).
"""
from __future__ import annotations

import copy
import math
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    EulerDiscreteScheduler,
    FluxTransformer2DModel,
    SD3Transformer2DModel,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING
from safetensors.torch import save_file
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel

from webui.engine.conditioning.text_encoders import T5_EMBEDDINGS
from webui.engine.conditioning.tokenizer import clip_tokenizer
from webui.engine.control.models import XLABS_NAMES
from webui.engine.families.flux import LINEAR_PARAMS, flux_key_table, swap_halves
from webui.engine.families.sd3 import sd3_key_table, swap_shift_scale
from webui.engine.formats.ldm_keys import controlnet_to_ldm, remap, unet_to_ldm, vae_to_ldm
from webui.engine.weights.fp8 import FP8_DTYPES, to_fp8
from webui.synthetic.builders import SyntheticModel, build_flux_transformer, build_sd3_transformer

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
# ComfyUI's all-in-one layout, which Stability's SD3 files share: each text encoder's weights under
# TEXT_ENCODER_FILE_PREFIX and, in ComfyUI's files, a float32 logit scale beside them.
TEXT_ENCODER_FILE_PREFIX = "text_encoders.{}.transformer."
LOGIT_SCALE_KEY = "text_encoders.{}.logit_scale"
FLUX_VAE_PREFIX = "vae."
# T5's token embedding: files store it as the first name; the model ties the second to it.
T5_SHARED, T5_TIED = T5_EMBEDDINGS

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
    out.update(remap(rest, blocks, _OPEN_CLIP_EXACT))
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
    out = _prefixed(UNET_PREFIX, unet_to_ldm(model.denoiser.state_dict(), model.denoiser.config))
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
        value = to_fp8(value, dtype) if dtype in FP8_DTYPES else value.to(dtype)
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
    unet, vae, *encoders = (_in_dtype(m, dtype) for m in (model.denoiser, model.vae, *model.text_encoders))
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
    return _fuse_by_table(state_dict, flux_key_table(config), "BFL")


def flux_controlnet_to_xlabs(state_dict: StateDict, config: Mapping[str, Any]) -> StateDict:
    """A hint-block ``FluxControlNetModel``'s names (double blocks only) -> XLabs' (BFL's for the transformer's parts,
    ``input_hint_block.N`` and ``pos_embed_input``), as XLabs' ControlNets are shared. Consumes ``state_dict``."""
    if config["num_single_layers"] or config["conditioning_embedding_channels"] is None:
        raise ValueError("XLabs' layout has an input hint block and double blocks only")
    out = {}
    for key in [k for k in state_dict if k.startswith(("controlnet_blocks.", "controlnet_x_embedder.",
                                                       "input_hint_block."))]:
        xlabs = next((old for old, new in XLABS_NAMES.items() if key.startswith(new)), None)
        out[key if xlabs is None else xlabs + key.removeprefix(XLABS_NAMES[xlabs])] = state_dict.pop(key)
    table = {name: targets for name, targets in flux_key_table(config).items() if not name.startswith("final_layer.")}
    return out | _fuse_by_table(state_dict, table, "XLabs")


def sd3_to_sai(state_dict: StateDict, config: Mapping[str, Any]) -> StateDict:
    """``SD3Transformer2DModel`` names -> Stability AI's (without prefix); q/k/v are fused back.

    Consumes ``state_dict`` (tensors are popped as they are renamed or fused).
    """
    swap_shift_scale(state_dict, config)
    return _fuse_by_table(state_dict, sd3_key_table(config), "Stability AI")


def _fuse_by_table(state_dict: StateDict, table: Mapping[str, tuple[str, ...]], layout: str) -> StateDict:
    """Each original name of ``table`` (a module's when it ends in ".") with its diffusers tensors, fused along dim 0.

    Consumes ``state_dict``; a diffusers key the table does not cover is a ``KeyError``.
    """
    out: StateDict = {}
    for name, targets in table.items():
        for param in LINEAR_PARAMS if name.endswith(".") else ("",):
            parts = [state_dict.pop(t + param) for t in targets]
            out[name + param] = parts[0] if len(parts) == 1 else torch.cat(parts)
    if state_dict:
        raise KeyError(f"no {layout} name for diffusers keys {sorted(state_dict)[:3]}")
    return out


def _write_transformer(path: str | Path, model: torch.nn.Module, dtype: torch.dtype, prefix: str,
                       to_original: Callable[[StateDict, Mapping[str, Any]], StateDict]) -> Path:
    """Write ``model`` renamed by ``to_original`` as a ``.safetensors`` file in ``dtype``, its names under ``prefix``.

    Each tensor is moved to the CPU before fusing, so the GPU needs nothing beyond the model.
    """
    path = Path(path)
    tensors = {k: _for_file(k, v, dtype) for k, v in model.state_dict().items()}
    save_file(_prefixed(prefix, to_original(tensors, model.config)), str(path))
    return path


def write_flux_transformer(
    path: str | Path,
    model: FluxTransformer2DModel,
    dtype: torch.dtype = torch.bfloat16,
    prefix: str = "",
) -> Path:
    """Write ``model`` as a BFL-layout ``.safetensors`` file in ``dtype``, its names under ``prefix``.

    ``prefix=""`` is BFL's own layout; ``"model.diffusion_model."`` is how ComfyUI/Forge save it.
    """
    return _write_transformer(path, model, dtype, prefix, flux_to_bfl)


def write_sd3_transformer(
    path: str | Path,
    model: SD3Transformer2DModel,
    dtype: torch.dtype = torch.bfloat16,
    prefix: str = "",
) -> Path:
    """Write ``model`` as a Stability-layout ``.safetensors`` file in ``dtype``, its names under ``prefix``.

    ``prefix="model.diffusion_model."`` is how Stability AI's own files store it; "" is how GGUF files do.
    """
    return _write_transformer(path, model, dtype, prefix, sd3_to_sai)


def _write_random(path: str | Path, build: Callable, write: Callable, size: str, seed: int, dtype: torch.dtype,
                  device: str | torch.device, prefix: str) -> Path:
    """A random transformer written in ``dtype``; fp8 files are drawn in bfloat16 first, as they are made."""
    weights = torch.bfloat16 if dtype in FP8_DTYPES else dtype
    return write(path, build(size, seed, device, weights), dtype, prefix)


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
    return _write_random(path, build_flux_transformer, write_flux_transformer, size, seed, dtype, device, prefix)


def write_sd3_checkpoint(
    path: str | Path,
    size: str = "full",
    seed: int = 0,
    dtype: torch.dtype = torch.bfloat16,
    device: str | torch.device = "cuda",
    prefix: str = "model.diffusion_model.",
) -> Path:
    """A random SD3 transformer (``build_sd3_transformer``; full size is SD3.5 Large) in Stability's layout.

    Full size in bfloat16 takes 16.3 GB on ``device`` and about as much host memory while writing.
    """
    return _write_random(path, build_sd3_transformer, write_sd3_transformer, size, seed, dtype, device, prefix)


def _file_tensors(state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype) -> StateDict:
    """``state_dict`` as a file stores it: on the CPU, contiguous, floats in ``dtype`` (fp8 saturating)."""
    return {k: _for_file(k, v, dtype) for k, v in state_dict.items()}


def _save(path: str | Path, tensors: StateDict) -> Path:
    save_file(tensors, str(path))
    return Path(path)


def _text_encoder_part(kind: str, state_dict: StateDict, dtype: torch.dtype) -> StateDict:
    """A text encoder's tensors under its all-in-one prefix (``kind``: "clip_l", "clip_g" or "t5xxl")."""
    return _prefixed(TEXT_ENCODER_FILE_PREFIX.format(kind), _file_tensors(state_dict, dtype))


def _vae_part(prefix: str, vae: AutoencoderKL, dtype: torch.dtype) -> StateDict:
    return _prefixed(prefix, _file_tensors(vae_to_ldm(vae.state_dict(), vae.config), dtype))


def t5_state_dict(model: T5EncoderModel) -> StateDict:
    """A T5 encoder's tensors under transformers' names, the tied token embedding once (``shared.weight``)."""
    return {k: v for k, v in model.state_dict().items() if k != T5_TIED}


def _clip_tensors(model: CLIPTextModel | CLIPTextModelWithProjection, projection: bool) -> StateDict:
    """``text_state_dict``, without the text projection unless ``projection``."""
    tensors = text_state_dict(model)
    if not projection:
        tensors.pop("text_projection.weight", None)
    return tensors


def write_t5_file(path: str | Path, model: T5EncoderModel, dtype: torch.dtype = torch.float16) -> Path:
    """Write a T5 encoder as ``t5xxl_fp16.safetensors`` / ``t5xxl_fp8_e4m3fn.safetensors`` are: transformers'
    names, bare, every tensor in ``dtype`` (fp8 included), the token embedding stored twice, as
    ``shared.weight`` and ``encoder.embed_tokens.weight`` (their 9.79 / 4.89 GB are T5-XXL's 4.76 B
    parameters plus a second 32128x4096 embedding)."""
    tensors = _file_tensors(t5_state_dict(model), dtype)
    tensors[T5_TIED] = tensors[T5_SHARED].clone()  # safetensors refuses tensors that share memory
    return _save(path, tensors)


def write_clip_file(
    path: str | Path,
    model: CLIPTextModel | CLIPTextModelWithProjection,
    dtype: torch.dtype = torch.float16,
    projection: bool = True,
) -> Path:
    """Write a CLIP text encoder as ``clip_l.safetensors`` / ``clip_g.safetensors`` are: transformers' names
    (``text_model.*``), bare, with ``text_projection.weight`` unless ``projection`` is False (Flux's
    ``clip_l.safetensors`` has none, SD3's ``clip_g.safetensors`` has one)."""
    return _save(path, _file_tensors(_clip_tensors(model, projection), dtype))


def write_vae_file(path: str | Path, vae: AutoencoderKL, dtype: torch.dtype = torch.float32) -> Path:
    """Write a VAE as separate VAE files are (Flux's ``ae.safetensors``, SD's ``*.vae.safetensors``): LDM names,
    bare."""
    return _save(path, _vae_part("", vae, dtype))


def write_flux_all_in_one(
    path: str | Path,
    transformer: FluxTransformer2DModel,
    clip_l: CLIPTextModel | CLIPTextModelWithProjection,
    t5: T5EncoderModel,
    vae: AutoencoderKL,
    dtype: torch.dtype = torch.float8_e4m3fn,
) -> Path:
    """Write all of Flux in one file, laid out as Comfy-Org's ``flux1-dev-fp8.safetensors``:

    * ``model.diffusion_model.`` + BFL's names: the transformer, in ``dtype``;
    * ``text_encoders.clip_l.transformer.`` + ``text_model.*``: CLIP-L, and its ``text_projection.weight``
      when ``clip_l`` has one (that file's has);
    * ``text_encoders.t5xxl.transformer.`` + ``encoder.*`` and ``shared.weight``: T5, in ``dtype``;
    * ``vae.`` + LDM names: the VAE;
    * ``text_encoders.clip_l.logit_scale``, ``text_encoders.t5xxl.logit_scale``: float32 scalars ComfyUI
      saves with every text encoder.

    That file stores every transformer and T5 tensor in float8_e4m3fn, CLIP-L in float16 and the VAE in
    float32; so does this function for an fp8 ``dtype``. Any other ``dtype`` is used for every part.
    """
    clip_dtype, vae_dtype = (torch.float16, torch.float32) if dtype in FP8_DTYPES else (dtype, dtype)
    bfl = flux_to_bfl(_file_tensors(transformer.state_dict(), dtype), transformer.config)
    tensors = _prefixed(UNET_PREFIX, bfl)
    tensors |= _text_encoder_part("clip_l", text_state_dict(clip_l), clip_dtype)
    tensors |= _text_encoder_part("t5xxl", t5_state_dict(t5), dtype)
    tensors |= _vae_part(FLUX_VAE_PREFIX, vae, vae_dtype)
    tensors |= {LOGIT_SCALE_KEY.format(kind): torch.tensor(OPEN_CLIP_LOGIT_SCALE) for kind in ("clip_l", "t5xxl")}
    return _save(path, tensors)


def write_sd3_all_in_one(
    path: str | Path,
    transformer: Mapping[str, torch.Tensor],
    clip_l: CLIPTextModel | CLIPTextModelWithProjection | None,
    clip_g: CLIPTextModelWithProjection | None,
    t5: T5EncoderModel | None,
    vae: AutoencoderKL,
    dtype: torch.dtype = torch.float16,
    t5_dtype: torch.dtype | None = None,
) -> Path:
    """Write SD3 in one file, laid out as Stability AI's single files:

    * ``model.diffusion_model.`` + ``transformer``'s names, which must already be Stability's (``sd3_to_sai``);
    * ``first_stage_model.`` + LDM names: the VAE;
    * ``text_encoders.clip_l.transformer.text_model.*``: CLIP-L without a text projection (SD3 pools CLIP-L
      without one; diffusers puts an identity there when it loads these files);
    * ``text_encoders.clip_g.transformer.text_model.*`` and ``text_projection.weight``: bigG;
    * ``text_encoders.t5xxl.transformer.encoder.*`` and ``shared.weight``: T5, in ``t5_dtype`` (default ``dtype``).

    A text encoder given as None is left out: ``sd3_medium.safetensors`` and ``sd3.5_large.safetensors`` hold
    none, ``sd3_medium_incl_clips.safetensors`` the two CLIPs and ``sd3_medium_incl_clips_t5xxlfp8.safetensors``
    all three, T5 in float8_e4m3fn and the rest in float16.
    """
    tensors = _prefixed(UNET_PREFIX, _file_tensors(transformer, dtype))
    tensors |= _vae_part(VAE_PREFIX, vae, dtype)
    if clip_l is not None:
        tensors |= _text_encoder_part("clip_l", _clip_tensors(clip_l, projection=False), dtype)
    if clip_g is not None:
        tensors |= _text_encoder_part("clip_g", text_state_dict(clip_g), dtype)
    if t5 is not None:
        tensors |= _text_encoder_part("t5xxl", t5_state_dict(t5), t5_dtype or dtype)
    return _save(path, tensors)


def write_controlnet(path: str | Path, model: torch.nn.Module, layout: str = "ldm",
                     dtype: torch.dtype = torch.float16) -> Path:
    """A ``ControlNetModel`` as a ``.safetensors`` file: A1111's LDM layout (``control_model.`` names, as
    lllyasviel's ControlNets) or diffusers' (as most SDXL ControlNets are shared); a ``FluxControlNetModel`` in
    diffusers' or XLabs' layout ("xlabs")."""
    tensors = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    if layout == "xlabs":
        tensors = flux_controlnet_to_xlabs(tensors, model.config)
    elif layout == "ldm":
        tensors = _prefixed("control_model.", controlnet_to_ldm(tensors, model.config))
    return _save(path, _file_tensors(tensors, dtype))
