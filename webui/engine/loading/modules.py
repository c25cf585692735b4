"""Separate component files, as Forge's "VAE / Text Encoder" selector offers them: what each one is.

Flux and SD3.x users keep the VAE (``ae.safetensors``) and the text encoders (``clip_l``, ``clip_g``,
``t5xxl_fp16`` / ``t5xxl_fp8_e4m3fn``) as files of their own in models/VAE and models/text_encoder,
and pick them beside a checkpoint that lacks them (a transformer-only file, a GGUF). What a file is
comes from its header, never from its name: a VAE, a T5 encoder, or a CLIP text encoder — and of
two CLIPs, the wider one is CLIP-G.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from webui.engine.conditioning.text_encoders import CLIP_MARKER, OPEN_CLIP_MARKER, T5_MARKER, T5_PREFIXES, VAE_MARKER, VAE_PREFIXES
from webui.engine.formats.files import TensorInfo, read_tensor_infos
from webui.errors import ModelFileError, UserError

FIELD = "forge_additional_modules"
MODULE_SUFFIXES = (".safetensors",)
VAE_MARKERS = tuple(p + VAE_MARKER for p in VAE_PREFIXES)
T5_MARKERS = tuple(p + T5_MARKER for p in T5_PREFIXES)
CLIP_EMBEDDINGS = (CLIP_MARKER, OPEN_CLIP_MARKER)
CLIP_G_WIDTH = 1280


@dataclass(frozen=True)
class ModuleFile:
    path: Path
    kind: str  # "vae", "t5" or "clip"
    width: int  # a CLIP's hidden size; a VAE's latent channels; 0 for T5


def _clip_width(infos: dict[str, TensorInfo]) -> int | None:
    for key, info in infos.items():
        if key.endswith(CLIP_EMBEDDINGS):
            return info.shape[1]
    return None


def identify(path: Path) -> ModuleFile:
    """What a component file holds, from its header; a clear error for anything else."""
    if path.suffix.lower() not in MODULE_SUFFIXES:
        raise ModelFileError(f"{path.name}: VAE and text encoder files must be .safetensors (GGUF text encoders "
                             "are not supported yet).")
    infos, _ = read_tensor_infos(path)
    vae = next((k for k in VAE_MARKERS if k in infos), None)
    if vae is not None:
        return ModuleFile(path, "vae", _vae_latent_channels(infos, vae.removesuffix(VAE_MARKER)))
    if any(k in infos for k in T5_MARKERS):
        return ModuleFile(path, "t5", 0)
    width = _clip_width(infos)
    if width is not None:
        return ModuleFile(path, "clip", width)
    raise ModelFileError(f"{path.name} is neither a VAE nor a text encoder (CLIP-L, CLIP-G, T5-XXL) this app knows; "
                         f"it has {len(infos)} tensors, e.g. {', '.join(sorted(infos)[:3])}.")


def _vae_latent_channels(infos: dict[str, TensorInfo], prefix: str) -> int:
    conv_in = infos.get(f"{prefix}decoder.conv_in.weight")
    if conv_in is None:
        raise ModelFileError(f"This VAE has no decoder ({prefix}decoder.conv_in.weight); the file is incomplete.")
    return conv_in.shape[1]


def assign(files: list[ModuleFile]) -> dict[str, ModuleFile]:
    """The chosen files by role: "vae", "t5", "clip_l", "clip_g". Two files for one role are refused."""
    roles: dict[str, ModuleFile] = {}
    clips = sorted((f for f in files if f.kind == "clip"), key=lambda f: f.width)
    if len(clips) > 2:
        raise UserError(f"{len(clips)} CLIP text encoders were chosen; pick at most two (CLIP-L and CLIP-G).", FIELD)
    if len(clips) == 2:
        roles["clip_l"], roles["clip_g"] = clips
    elif clips:
        roles["clip_g" if clips[0].width == CLIP_G_WIDTH else "clip_l"] = clips[0]
    for kind in ("vae", "t5"):
        chosen = [f for f in files if f.kind == kind]
        if len(chosen) > 1:
            names = ", ".join(f.path.name for f in chosen)
            raise UserError(f"Several {kind.upper()} files were chosen ({names}); pick one.", FIELD)
        if chosen:
            roles[kind] = chosen[0]
    return roles
