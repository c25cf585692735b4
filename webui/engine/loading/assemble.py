"""Pipelines assembled from the files users have: Flux and SD3.x checkpoints, and GGUF UNets (SD1.x/SDXL).

A checkpoint may hold everything (Comfy-Org's ``flux1-dev-fp8.safetensors``, Stability's
``sd3_medium_incl_clips_t5xxlfp8.safetensors``), the transformer and VAE only (``sd3.5_large``), or
the transformer alone (``flux1-dev.safetensors``, every GGUF). Parts it lacks come from the files
chosen in "VAE / Text Encoder" (``modules``); a chosen file wins over the checkpoint's own part, as in
Forge. An all-in-one file is read once and split, so no tensor is held twice. A GGUF UNet holds the
UNet alone: its VAE and CLIP text encoders are always chosen files.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel, SD3Transformer2DModel
from transformers import CLIPTextModel, CLIPTextModelWithProjection, T5EncoderModel, T5TokenizerFast

from webui.engine.conditioning.t5_prompts import T5Slot, find_t5_tokenizer
from webui.engine.conditioning.text_encoders import load_clip_file, load_t5_encoder, load_vae16
from webui.engine.conditioning.tokenizer import clip_tokenizer
from webui.engine.families.flux import load_flux_transformer
from webui.engine.families.sd3 import load_gguf_sd3_transformer, load_sd3_transformer
from webui.engine.formats.detect import Family, ModelArch, detect_family
from webui.engine.formats.files import CheckpointInfo, load_state_dict, read_tensor_infos
from webui.engine.loading.load import LoadedModel, TextEncoderSlot, clip_slot, load_vae_file, vae_dtype_for
from webui.engine.loading.modules import FIELD, ModuleFile
from webui.engine.weights.gguf_load import gguf_family, load_gguf_flux_transformer, load_gguf_unet
from webui.errors import ModelFileError, UserError

# Where all-in-one files keep each part (ComfyUI's and Stability's layouts).
INSIDE = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
          "t5": "text_encoders.t5xxl.transformer.", "vae": ("vae.", "first_stage_model.")}
CLIPS = {Family.FLUX: ("clip_l",), Family.SD3: ("clip_l", "clip_g")}
WHAT = {"clip_l": "CLIP-L text encoder (clip_l.safetensors)", "clip_g": "CLIP-G text encoder (clip_g.safetensors)",
        "t5": "T5-XXL text encoder (t5xxl_fp16 or t5xxl_fp8_e4m3fn.safetensors)",
        "vae": "16-channel VAE (Flux: ae.safetensors)"}
DIFFUSERS_PIPELINES = {"FluxPipeline": Family.FLUX, "StableDiffusion3Pipeline": Family.SD3}


def _split(state_dict: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """The parts of an all-in-one state dict by role, moved out of it (what is left is the transformer)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for role, prefixes in INSIDE.items():
        for prefix in (prefixes,) if isinstance(prefixes, str) else prefixes:
            keys = [k for k in state_dict if k.startswith(prefix)]
            if keys:
                parts[role] = {k[len(prefix):]: state_dict.pop(k) for k in keys}
    return parts


def _denoiser(info: CheckpointInfo, family: Family, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    """The transformer and the checkpoint's other parts (none in a GGUF)."""
    if info.kind == "gguf":
        load = load_gguf_flux_transformer if family is Family.FLUX else load_gguf_sd3_transformer
        return load(info.path, dtype), {}
    state_dict = load_state_dict(info.path)
    parts = _split(state_dict)
    load = load_flux_transformer if family is Family.FLUX else load_sd3_transformer
    return load(state_dict, dtype), parts


def _source(role: str, modules: dict[str, ModuleFile], parts: dict, family: Family, optional: bool = False):
    if role in modules:
        return modules[role].path
    if role in parts:
        return parts[role]
    if optional:
        return None
    raise UserError(f"This {family.value} checkpoint has no {WHAT[role]} inside: choose one in 'VAE / Text "
                    "Encoder' (files in models/VAE and models/text_encoder).", FIELD)


def _load_clip(source, kind: str, family: Family, dtype: torch.dtype) -> TextEncoderSlot:
    """CLIP-G pools through its text projection (SDXL, SD3); CLIP-L pools without one (SD3, Flux)."""
    model = load_clip_file(source, kind, dtype, projection=kind == "clip_g")
    if kind == "clip_g" and not isinstance(model, CLIPTextModelWithProjection):
        raise ModelFileError(f"{family.value} pools its prompt through CLIP-G's text projection, and this CLIP-G "
                             "file has none (text_projection.weight): use the clip_g file made for SD3 or SDXL.")
    tokenizer = clip_tokenizer("!" if kind == "clip_g" else "<|endoftext|>")
    return clip_slot(model, tokenizer, family, pooled=family in (Family.FLUX, Family.SD3) or kind == "clip_g")


def load_flow_model(info: CheckpointInfo, family: Family, modules: dict[str, ModuleFile], dtype: torch.dtype,
                    vae_dtype: torch.dtype, tokenizer_dirs: list[Path], use_t5: bool = True) -> LoadedModel:
    """A Flux or SD3.x pipeline; ``use_t5=False`` runs SD3.x on its CLIPs alone (Flux needs T5)."""
    vae_dtype = vae_dtype_for(family, vae_dtype)
    if info.kind == "diffusers":
        return _load_diffusers_folder(info, family, dtype, vae_dtype)
    denoiser, parts = _denoiser(info, family, dtype)
    vae = load_vae16(_source("vae", modules, parts, family), vae_dtype, family)
    clips = [_load_clip(_source(kind, modules, parts, family), kind, family, dtype)
             for kind in CLIPS[family]]
    t5 = None
    t5_source = _source("t5", modules, parts, family, optional=family is Family.SD3 or not use_t5)
    if t5_source is not None and (use_t5 or family is Family.FLUX):
        t5 = T5Slot(load_t5_encoder(t5_source, dtype), find_t5_tokenizer(tokenizer_dirs))
    return LoadedModel(info, family, denoiser, vae, clips, {}, t5=t5)


def checkpoint_family(info: CheckpointInfo) -> Family | None:
    """The family a checkpoint's header (or a diffusers folder's pipeline index) names, before loading it;
    None where only loading tells (.ckpt files, SD diffusers folders)."""
    if info.kind == "diffusers":
        index = json.loads((info.path / "model_index.json").read_text(encoding="utf-8"))
        return DIFFUSERS_PIPELINES.get(index.get("_class_name", ""))
    if info.kind == "gguf":
        return gguf_family(info.path)
    if info.kind == "safetensors":
        return detect_family(*read_tensor_infos(info.path))
    return None


def _load_diffusers_folder(info: CheckpointInfo, family: Family, dtype: torch.dtype,
                           vae_dtype: torch.dtype) -> LoadedModel:
    folder = info.path
    transformer = FluxTransformer2DModel if family is Family.FLUX else SD3Transformer2DModel
    denoiser = transformer.from_pretrained(folder / "transformer", torch_dtype=dtype, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_dtype, local_files_only=True)
    clip_classes = [CLIPTextModel] if family is Family.FLUX else [CLIPTextModelWithProjection] * 2
    clips = []
    for i, cls in enumerate(clip_classes):
        suffix = "" if i == 0 else "_2"
        model = cls.from_pretrained(folder / f"text_encoder{suffix}", dtype=dtype, local_files_only=True)
        clips.append(clip_slot(model, clip_tokenizer("!" if i else "<|endoftext|>"), family, pooled=True))
    t5_name = "text_encoder_2" if family is Family.FLUX else "text_encoder_3"
    t5 = None
    if (folder / t5_name).is_dir():
        tokenizer_dir = folder / t5_name.replace("text_encoder", "tokenizer")
        tokenizer = T5TokenizerFast.from_pretrained(tokenizer_dir, local_files_only=True) \
            if tokenizer_dir.is_dir() else find_t5_tokenizer([])
        t5 = T5Slot(T5EncoderModel.from_pretrained(folder / t5_name, dtype=dtype, local_files_only=True), tokenizer)
    elif family is Family.FLUX:
        raise ModelFileError(f"{folder.name}: this Flux pipeline folder has no {t5_name} (T5).")
    return LoadedModel(info, family, denoiser, vae, clips, {}, t5=t5)


def load_gguf_unet_model(info: CheckpointInfo, family: Family, modules: dict[str, ModuleFile],
                         vae_file: Path | None, dtype: torch.dtype, vae_dtype: torch.dtype) -> LoadedModel:
    """An SD1.x/SD2.x/SDXL pipeline around a GGUF UNet (``family`` from ``checkpoint_family``), its weights
    kept quantized."""
    kinds = ("clip_l", "clip_g") if family is Family.SDXL else ("clip_l",)
    sources = {kind: _source(kind, modules, {}, family) for kind in kinds}
    vae_path = modules["vae"].path if "vae" in modules else vae_file
    if vae_path is None:
        raise UserError(f"{info.path.name} is a GGUF UNet without a VAE: choose the {family.value} VAE in 'VAE / Text "
                        "Encoder' (or as SD VAE).", FIELD)
    slots = [_load_clip(source, kind, family, dtype) for kind, source in sources.items()]
    pooled_dim = slots[-1].model.config.projection_dim if family is Family.SDXL else None
    unet, _ = load_gguf_unet(info.path, dtype, pooled_dim)
    vae = load_vae_file(vae_path, family, vae_dtype_for(family, vae_dtype))
    return LoadedModel(info, family, unet, vae, slots, ModelArch(family, {}, None).scheduler_config,
                       vae_name=vae_path.name)
