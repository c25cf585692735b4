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
from diffusers import AutoencoderKL
from transformers import CLIPTextModelWithProjection, T5EncoderModel, T5TokenizerFast

from webui.engine.conditioning.t5_prompts import T5Slot, find_t5_tokenizer
from webui.engine.conditioning.text_encoders import load_clip_file, load_t5_encoder, load_vae16
from webui.engine.conditioning.tokenizer import clip_tokenizer
from webui.engine.families.base import FlowFamily
from webui.engine.families.protocol import FamilyModel
from webui.engine.formats.detect import Family, ModelArch, detect_family
from webui.engine.formats.files import CheckpointInfo, load_state_dict, read_tensor_infos
from webui.engine.loading.load import LoadedModel, TextEncoderSlot, clip_slot, load_vae_file, vae_dtype_for
from webui.engine.loading.modules import FIELD, ModuleFile
from webui.engine.weights.gguf_load import gguf_family, load_gguf_unet
from webui.errors import ModelFileError, UserError

# Where all-in-one files keep each part (ComfyUI's and Stability's layouts).
INSIDE = {"clip_l": "text_encoders.clip_l.transformer.", "clip_g": "text_encoders.clip_g.transformer.",
          "t5": "text_encoders.t5xxl.transformer.", "vae": ("vae.", "first_stage_model.")}
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


def _denoiser(info: CheckpointInfo, flow: FlowFamily, dtype: torch.dtype) -> tuple[torch.nn.Module, dict]:
    """The transformer and the checkpoint's other parts (none in a GGUF)."""
    if info.kind == "gguf":
        return flow.files.load_gguf_transformer(info.path, dtype), {}
    state_dict = load_state_dict(info.path)
    parts = _split(state_dict)
    return flow.files.load_transformer(state_dict, dtype), parts


def _source(role: str, modules: dict[str, ModuleFile], parts: dict, family: Family, optional: bool = False):
    if role in modules:
        return modules[role].path
    if role in parts:
        return parts[role]
    if optional:
        return None
    raise UserError(f"This {family.value} checkpoint has no {WHAT[role]} inside: choose one in 'VAE / Text "
                    "Encoder' (files in models/VAE and models/text_encoder).", FIELD)


def _load_clip(source, kind: str, for_family: FamilyModel, dtype: torch.dtype,
               pool_all: bool = False) -> TextEncoderSlot:
    """CLIP-G pools through its text projection (SDXL, SD3); CLIP-L pools without one where ``pool_all`` (SD3,
    Flux)."""
    model = load_clip_file(source, kind, dtype, projection=kind == "clip_g")
    if kind == "clip_g" and not isinstance(model, CLIPTextModelWithProjection):
        raise ModelFileError(f"{for_family.family.value} pools its prompt through CLIP-G's text projection, and this "
                             "CLIP-G file has none (text_projection.weight): use the clip_g file made for SD3 or SDXL.")
    tokenizer = clip_tokenizer("!" if kind == "clip_g" else "<|endoftext|>")
    return clip_slot(model, tokenizer, for_family, pooled=pool_all or kind == "clip_g")


def load_flow_model(info: CheckpointInfo, flow: FlowFamily, modules: dict[str, ModuleFile], dtype: torch.dtype,
                    vae_dtype: torch.dtype, tokenizer_dirs: list[Path], use_t5: bool = True) -> LoadedModel:
    """A Flux or SD3.x pipeline; ``use_t5=False`` runs SD3.x on its CLIPs alone (Flux needs T5)."""
    family = flow.family
    vae_dtype = vae_dtype_for(flow, vae_dtype)
    if info.kind == "diffusers":
        return _load_diffusers_folder(info, flow, dtype, vae_dtype)
    denoiser, parts = _denoiser(info, flow, dtype)
    vae = load_vae16(_source("vae", modules, parts, family), vae_dtype, family)
    clips = [_load_clip(_source(kind, modules, parts, family), kind, flow, dtype, pool_all=True)
             for kind in flow.clip_kinds]
    t5 = None
    t5_source = _source("t5", modules, parts, family, optional=not flow.files.t5_required or not use_t5)
    if t5_source is not None and (use_t5 or flow.files.t5_required):
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


def _load_diffusers_folder(info: CheckpointInfo, flow: FlowFamily, dtype: torch.dtype,
                           vae_dtype: torch.dtype) -> LoadedModel:
    folder, family = info.path, flow.family
    files = flow.files
    denoiser = files.transformer_class.from_pretrained(folder / "transformer", torch_dtype=dtype, local_files_only=True)
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_dtype, local_files_only=True)
    clips = []
    for i, cls in enumerate(files.diffusers_clip_classes):
        suffix = "" if i == 0 else "_2"
        model = cls.from_pretrained(folder / f"text_encoder{suffix}", dtype=dtype, local_files_only=True)
        clips.append(clip_slot(model, clip_tokenizer("!" if i else "<|endoftext|>"), flow, pooled=True))
    t5_name = files.diffusers_t5_folder
    t5 = None
    if (folder / t5_name).is_dir():
        tokenizer_dir = folder / t5_name.replace("text_encoder", "tokenizer")
        tokenizer = T5TokenizerFast.from_pretrained(tokenizer_dir, local_files_only=True) \
            if tokenizer_dir.is_dir() else find_t5_tokenizer([])
        t5 = T5Slot(T5EncoderModel.from_pretrained(folder / t5_name, dtype=dtype, local_files_only=True), tokenizer)
    elif files.t5_required:
        raise ModelFileError(f"{folder.name}: this {family.value} pipeline folder has no {t5_name} (T5).")
    return LoadedModel(info, family, denoiser, vae, clips, {}, t5=t5)


def load_gguf_unet_model(info: CheckpointInfo, unet_family: FamilyModel, modules: dict[str, ModuleFile],
                         vae_file: Path | None, dtype: torch.dtype, vae_dtype: torch.dtype) -> LoadedModel:
    """An SD1.x/SD2.x/SDXL pipeline around a GGUF UNet (``unet_family`` the one ``checkpoint_family`` read), its
    weights kept quantized."""
    family = unet_family.family
    sources = {kind: _source(kind, modules, {}, family) for kind in unet_family.clip_kinds}
    vae_path = modules["vae"].path if "vae" in modules else vae_file
    if vae_path is None:
        raise UserError(f"{info.path.name} is a GGUF UNet without a VAE: choose the {family.value} VAE in 'VAE / Text "
                        "Encoder' (or as SD VAE).", FIELD)
    slots = [_load_clip(source, kind, unet_family, dtype) for kind, source in sources.items()]
    # The UNet of a family with CLIP-G (SDXL) takes its pooled output.
    pooled_dim = slots[-1].model.config.projection_dim if "clip_g" in unet_family.clip_kinds else None
    unet, _ = load_gguf_unet(info.path, dtype, pooled_dim)
    vae = load_vae_file(vae_path, family, vae_dtype_for(unet_family, vae_dtype))
    return LoadedModel(info, family, unet, vae, slots, ModelArch(family, {}, None).scheduler_config,
                       vae_name=vae_path.name)
