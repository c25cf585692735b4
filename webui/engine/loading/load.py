"""Build diffusers components from a checkpoint: A1111 single files or diffusers folders.

Single files are converted with diffusers' own LDM→diffusers key conversion; the configs come
from ``detect`` (tensor shapes), never from the hub. Modules are created without allocating
weights (accelerate's ``init_empty_weights``) and take the file's tensors directly.
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, cast

import torch
from accelerate import init_empty_weights
from diffusers import AutoencoderKL, UNet2DConditionModel
from diffusers.loaders.single_file_utils import (
    convert_ldm_clip_checkpoint,
    convert_ldm_unet_checkpoint,
    convert_ldm_vae_checkpoint,
    convert_open_clip_checkpoint,
)
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
    PretrainedConfig,
)

from webui.engine.formats.detect import (
    Family,
    ModelArch,
    TextEncoderArch,
    infer_arch,
    vae_config,
)
from webui.engine.conditioning.prompts import TextEncoderSlot
from webui.engine.conditioning.t5_prompts import T5Slot
from webui.engine.conditioning.tokenizer import clip_tokenizer
from webui.engine.formats.files import CheckpointInfo, TensorInfo, load_state_dict, read_tensor_infos
from webui.engine.weights.fp8 import enable_fp8_compute, fp8_state_dict_split
from webui.errors import ModelFileError

if TYPE_CHECKING:
    from webui.engine.families.base import UNetFamily
    from webui.engine.families.protocol import FamilyModel
    from webui.engine.families.registry import Families

log = logging.getLogger(__name__)

# Keys real checkpoints carry that no diffusers module holds (schedule arrays, EMA scalars,
# CLIP position ids, OpenCLIP's logit scale).
HARMLESS_EXTRA = ("position_ids", "logit_scale")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2", "t5")


@dataclass
class LoadedModel:
    """A checkpoint's components, ready to generate with."""

    info: CheckpointInfo
    family: Family
    denoiser: torch.nn.Module  # UNet2DConditionModel, FluxTransformer2DModel or SD3Transformer2DModel
    vae: AutoencoderKL
    text_encoders: list[TextEncoderSlot]  # the CLIPs
    scheduler_config: dict  # SD1/SD2/SDXL's training noise; flow models have none
    vae_name: str | None = None
    t5: T5Slot | None = None  # Flux and SD3.x (SD3.x may run without)
    module_names: list[str] = field(default_factory=list)  # separate VAE / text encoder files in use
    load_seconds: float = 0.0
    conditioning_cache: tuple = (None, None)  # (key, (cond, uncond)) of the last prompts encoded
    kind: FamilyModel = field(init=False, repr=False)  # what its family does; the model manager's registry sets it

    @property
    def prediction_type(self) -> str:
        return self.scheduler_config["prediction_type"]

    @property
    def latent_channels(self) -> int:
        return self.vae.config.latent_channels

    @property
    def vae_scale_factor(self) -> int:
        return vae_scale_factor(self.vae)

    def modules(self) -> list[torch.nn.Module]:
        return list(self.components().values())

    def components(self) -> dict[str, torch.nn.Module]:
        """The parts the memory manager places, by the names generation asks for them."""
        encoders = {TEXT_ENCODERS[i]: slot.model for i, slot in enumerate(self.text_encoders)}
        if self.t5 is not None:
            encoders["t5"] = self.t5.model
        return {**encoders, "denoiser": self.denoiser, "vae": self.vae}


def vae_scale_factor(vae: torch.nn.Module) -> int:
    """How many pixels a latent is on each side: 8 for every released SD/SDXL/SD3/Flux VAE, but a diffusers folder
    may hold another (computed as diffusers' pipelines do, from the VAE's levels)."""
    return 2 ** (len(vae.config.block_out_channels) - 1)


def load_model(info: CheckpointInfo, vae_file: Path | None, dtype: torch.dtype, vae_dtype: torch.dtype,
               families: Families) -> LoadedModel:
    """Load an SD1.x/SD2.x/SDXL checkpoint (and optionally a separate VAE) into host memory; the memory
    manager places it. Which family it is shows only once it is read."""
    if info.kind == "diffusers":
        model = _load_diffusers_folder(info, dtype, vae_dtype, families)
    else:
        model = _load_single_file(info, dtype, vae_dtype, families)
    if vae_file is not None:
        model.vae = load_vae_file(vae_file, model.family, vae_dtype_for(families[model.family], vae_dtype))
        model.vae_name = vae_file.name
    for module in model.modules():
        module.requires_grad_(False).eval()
    return model


def _load_single_file(info: CheckpointInfo, dtype: torch.dtype, vae_dtype: torch.dtype,
                      families: Families) -> LoadedModel:
    _, metadata = read_tensor_infos(info.path) if info.kind == "safetensors" else ({}, {})
    sd = load_state_dict(info.path)
    if any(k.endswith(".scale_weight") for k in sd):
        raise ModelFileError(f"{info.path.name} is a 'scaled fp8' checkpoint; those are not supported for "
                             "SD1.x/SD2.x/SDXL single files yet. Use a plain fp8 or 16-bit file.")
    infos = {k: TensorInfo(str(v.dtype), tuple(v.shape)) for k, v in sd.items()}
    arch = infer_arch(infos, metadata)
    if arch.vae is None:
        raise ModelFileError(f"{info.path.name} has no VAE inside; pick a VAE from models/VAE.")
    name, kind = info.path.name, families[arch.family]
    unet = build_module(UNet2DConditionModel, arch.unet, convert_ldm_unet_checkpoint(sd, arch.unet), name, dtype)
    vae = build_module(AutoencoderKL, arch.vae, convert_ldm_vae_checkpoint(sd, arch.vae), name,
                       vae_dtype_for(kind, vae_dtype))
    slots = [_text_encoder_slot(enc, sd, kind, name, dtype) for enc in arch.text_encoders]
    arch.prediction_type = cast("UNetFamily", kind).prediction_type(unet, arch.prediction_type)
    return LoadedModel(info, arch.family, unet, vae, slots, arch.scheduler_config)


def build_module(cls: type, config: dict | PretrainedConfig, state_dict: dict[str, torch.Tensor], filename: str,
           dtype: torch.dtype) -> torch.nn.Module:
    """A module of ``cls`` holding exactly ``state_dict`` in ``dtype`` (fp8 weights stay fp8); a clear error
    when they do not match."""
    with init_empty_weights():
        module = cls(config) if isinstance(config, PretrainedConfig) else cls(**config)
    expected = {key: tuple(tensor.shape) for key, tensor in module.state_dict().items()}
    state_dict, scales = fp8_state_dict_split(_match_text_model_prefix(state_dict, expected), dtype)
    missing = sorted(set(expected) - state_dict.keys())
    unexpected = sorted(k for k in state_dict.keys() - set(expected) if not k.endswith(HARMLESS_EXTRA))
    if missing or unexpected:
        raise ModelFileError(
            f"{filename}: the {cls.__name__} in this file does not match its inferred architecture "
            f"({len(missing)} tensors missing, e.g. {missing[:2]}; {len(unexpected)} unexpected, e.g. {unexpected[:2]}). "
            "The file may be incomplete or of an unsupported variant."
        )
    for key, tensor in state_dict.items():
        if key in expected and tuple(tensor.shape) != expected[key]:
            raise ModelFileError(f"{filename}: tensor {key} has shape {list(tensor.shape)}, expected "
                                 f"{list(expected[key])}. The file is inconsistent.")
    module.load_state_dict({k: v for k, v in state_dict.items() if k in expected}, strict=False, assign=True)
    enable_fp8_compute(module, scales, dtype, filename)  # fp8 weights stay fp8; their layers upcast per call
    return module


def _match_text_model_prefix(state_dict: dict[str, torch.Tensor], expected) -> dict[str, torch.Tensor]:
    """transformers 5's CLIPTextModel has no ``text_model.`` level; diffusers' conversion still writes it."""
    renamed = {}
    for key, tensor in state_dict.items():
        bare = key.removeprefix("text_model.")
        renamed[bare if key not in expected and bare in expected else key] = tensor
    return renamed


def _text_encoder_slot(enc: TextEncoderArch, sd: dict, kind: FamilyModel, filename: str,
                       dtype: torch.dtype) -> TextEncoderSlot:
    config = CLIPTextConfig(**enc.config)
    cls = CLIPTextModelWithProjection if enc.with_projection else CLIPTextModel
    if enc.kind == "clip_l":
        converted = convert_ldm_clip_checkpoint(sd, remove_prefix=enc.prefix)
        converted = {k: v for k, v in converted.items() if not k.startswith(("conditioner.", "cond_stage_model."))}
        tokenizer = clip_tokenizer()
    else:
        drop = f"{enc.prefix}transformer.resblocks.{config.num_hidden_layers}." if enc.dropped_last_layer else None
        kept = {k: v for k, v in sd.items() if k.startswith(enc.prefix) and not (drop and k.startswith(drop))}
        if enc.dropped_last_layer:
            kept.pop(f"{enc.prefix}text_projection", None)
        with init_empty_weights():
            shell = cls(config)
        converted = convert_open_clip_checkpoint(shell, kept, prefix=enc.prefix)
        tokenizer = clip_tokenizer("!")
    model = build_module(cls, config, converted, filename, dtype)
    return clip_slot(model, tokenizer, kind, pooled=enc.with_projection)


def clip_slot(model: torch.nn.Module, tokenizer: CLIPTokenizer, kind: FamilyModel, pooled: bool) -> TextEncoderSlot:
    """A CLIP as ``kind`` reads it: the penultimate layer without the final norm (SDXL, SD3), else the last."""
    penultimate = kind.clip_penultimate
    return TextEncoderSlot(model=model, tokenizer=tokenizer, final_layer_norm=not penultimate,
                           min_clip_skip=2 if penultimate else 1, pooled=pooled)


def vae_dtype_for(kind: FamilyModel, requested: torch.dtype) -> torch.dtype:
    """float32 for a VAE that overflows in float16 (SDXL's, Flux's, SD3's), else what is asked."""
    return torch.float32 if kind.vae_upcast and requested == torch.float16 else requested


def load_vae_file(path: Path, family: Family, dtype: torch.dtype) -> AutoencoderKL:
    """A separate VAE file in the LDM layout (what A1111/Forge put in models/VAE)."""
    infos, _ = read_tensor_infos(path)
    prefix = next((p for p in ("first_stage_model.", "vae.", "") if f"{p}encoder.conv_in.weight" in infos), None)
    if prefix is None or f"{prefix}encoder.down.0.block.0.conv2.weight" not in infos:
        raise ModelFileError(
            f"{path.name} is not a VAE in the A1111/LDM layout (keys like encoder.down.0.block.0...). "
            "Use an A1111-compatible VAE .safetensors file."
        )
    config = vae_config(infos, prefix, family)
    sd = load_state_dict(path)
    return build_module(AutoencoderKL, config, convert_ldm_vae_checkpoint(sd, config), path.name, dtype)


def _load_diffusers_folder(info: CheckpointInfo, dtype: torch.dtype, vae_dtype: torch.dtype,
                           families: Families) -> LoadedModel:
    folder = info.path
    index = json.loads((folder / "model_index.json").read_text(encoding="utf-8"))
    pipeline = index.get("_class_name", "")
    if pipeline not in ("StableDiffusionPipeline", "StableDiffusionXLPipeline"):
        raise ModelFileError(f"{folder.name}: diffusers pipeline {pipeline!r} is not supported in this version "
                             "(StableDiffusionPipeline and StableDiffusionXLPipeline are).")
    sdxl = pipeline == "StableDiffusionXLPipeline"
    unet = UNet2DConditionModel.from_pretrained(folder / "unet", torch_dtype=dtype, local_files_only=True)
    names = [("text_encoder", "tokenizer", CLIPTextModel)]
    if sdxl:
        names.append(("text_encoder_2", "tokenizer_2", CLIPTextModelWithProjection))
    encoders = [(cls.from_pretrained(folder / te, dtype=dtype, local_files_only=True), folder / tok, cls)
                for te, tok, cls in names]
    # SD2's text encoder is OpenCLIP (gelu); SD1's is OpenAI CLIP (quick_gelu). Width says nothing at tiny sizes.
    family = Family.SDXL if sdxl else Family.SD2 if encoders[0][0].config.hidden_act == "gelu" else Family.SD1
    kind = families[family]
    vae = AutoencoderKL.from_pretrained(folder / "vae", torch_dtype=vae_dtype_for(kind, vae_dtype), local_files_only=True)
    slots = []
    for model, tok_dir, cls in encoders:
        default = clip_tokenizer("!" if family is Family.SD2 or cls is CLIPTextModelWithProjection else "<|endoftext|>")
        tokenizer = CLIPTokenizer.from_pretrained(tok_dir, local_files_only=True) if tok_dir.is_dir() else default
        slots.append(clip_slot(model, tokenizer, kind, pooled=cls is CLIPTextModelWithProjection))
    scheduler_config = ModelArch(family, {}, None).scheduler_config
    sched_file = folder / "scheduler" / "scheduler_config.json"
    if sched_file.is_file():
        declared = json.loads(sched_file.read_text(encoding="utf-8"))
        scheduler_config.update({k: declared[k] for k in scheduler_config if k in declared})
    return LoadedModel(info, family, unet, vae, slots, scheduler_config)
