"""Which model family a checkpoint is, and its architecture, read from tensor names and shapes.

Nothing here trusts file names or falls back to a default family: an unrecognised file is an
error. Sizes (channels, depths, widths) come from shapes, so a tiny test checkpoint and a
full-size one take the same path. What checkpoints do not store — GroupNorm groups, attention
head counts, VAE scaling — follows each family's convention.
"""
from __future__ import annotations

import re
from collections.abc import Collection
from dataclasses import dataclass, field
from enum import Enum

from webui.engine.formats.files import TensorInfo, strip_prefix  # noqa: F401  (re-exported)
from webui.errors import ModelFileError

UNET = "model.diffusion_model."
VAE = "first_stage_model."
SD1_CLIP = "cond_stage_model.transformer."
SD2_OPENCLIP = "cond_stage_model.model."
SDXL_CLIP_L = "conditioner.embedders.0.transformer."
SDXL_OPENCLIP = "conditioner.embedders.1.model."
NORM_GROUPS = 32
# A tensor every Flux transformer has; BFL's own files store it bare, ComfyUI/Forge under UNET.
FLUX_MARKER = "double_blocks.0.img_attn.qkv.weight"
FLUX_PREFIXES = (UNET, "")

class Family(str, Enum):
    SD1 = "SD1.x"
    SD2 = "SD2.x"
    SDXL = "SDXL"
    SD3 = "SD3.x"
    FLUX = "Flux"


@dataclass
class TextEncoderArch:
    """A CLIP text encoder: ``kind`` is "clip_l" (OpenAI layout) or "open_clip" (OpenCLIP layout)."""

    kind: str
    prefix: str
    config: dict
    with_projection: bool = False
    dropped_last_layer: bool = False


@dataclass
class ModelArch:
    """Everything needed to build a checkpoint's diffusers components."""

    family: Family
    unet: dict
    vae: dict | None
    text_encoders: list[TextEncoderArch] = field(default_factory=list)
    prediction_type: str = "epsilon"
    zero_terminal_snr: bool = False

    @property
    def scheduler_config(self) -> dict:
        return {
            "num_train_timesteps": 1000,
            "beta_start": 0.00085,
            "beta_end": 0.012,
            "beta_schedule": "scaled_linear",
            "prediction_type": self.prediction_type,
            "rescale_betas_zero_snr": self.zero_terminal_snr,
        }


def detect_family(infos: dict[str, TensorInfo], metadata: dict[str, str] | None = None) -> Family:
    """The family of a checkpoint from its tensor names; a clear error when it is none we know."""
    keys = infos.keys()
    if any(k.endswith(FLUX_MARKER) for k in keys):
        return Family.FLUX
    if any(k.endswith("joint_blocks.0.context_block.attn.qkv.weight") for k in keys):
        return Family.SD3
    if f"{UNET}input_blocks.0.0.weight" in infos:
        if f"{UNET}label_emb.0.0.weight" in infos and any(k.startswith(SDXL_OPENCLIP) for k in keys):
            if any(k.startswith(SDXL_CLIP_L) for k in keys):
                return Family.SDXL
            raise ModelFileError("This is an SDXL refiner checkpoint; refiners are not supported yet.")
        if any(k.startswith(SD2_OPENCLIP) for k in keys):
            return Family.SD2
        if any(k.startswith(SD1_CLIP) for k in keys):
            return Family.SD1
        raise ModelFileError(
            "This file holds a UNet but no text encoder (a UNet-only checkpoint). Only complete "
            "checkpoints (UNet + VAE + text encoders) can be loaded in this version."
        )
    if any(k.startswith(("encoder.down.", "decoder.up.", "encoder.down_blocks.")) for k in keys):
        raise ModelFileError("This file is a VAE, not a checkpoint: put it in models/VAE and pick it as the VAE.")
    arch = (metadata or {}).get("general.architecture")
    sample = ", ".join(sorted(keys)[:3]) or "no tensors"
    raise ModelFileError(
        f"Unknown model architecture{f' ({arch!r})' if arch else ''}: this file is not a Stable Diffusion "
        f"checkpoint this app knows (SD1.x, SD2.x, SDXL, SD3.x, Flux). It has {len(infos)} tensors, e.g. {sample}."
    )


def infer_arch(infos: dict[str, TensorInfo], metadata: dict[str, str] | None = None) -> ModelArch:
    """The architecture of an SD1.x / SD2.x / SDXL single-file checkpoint."""
    family = detect_family(infos, metadata)
    if family in (Family.SD3, Family.FLUX):
        raise ModelFileError(
            f"This is a {family.value} checkpoint. {family.value} models in .ckpt files cannot be loaded; use a "
            ".safetensors or .gguf file or a diffusers folder (or convert this one to .safetensors)."
        )
    if family is Family.SDXL:
        encoders = [clip_l_arch(infos, SDXL_CLIP_L), open_clip_arch(infos, SDXL_OPENCLIP, with_projection=True)]
    elif family is Family.SD2:
        encoders = [open_clip_arch(infos, SD2_OPENCLIP, with_projection=False)]
    else:
        encoders = [clip_l_arch(infos, SD1_CLIP)]
    pooled_dim = encoders[-1].config.get("projection_dim") if family is Family.SDXL else None
    return ModelArch(
        family=family,
        unet=unet_config(infos, family, pooled_dim),
        vae=vae_config(infos, VAE, family) if f"{VAE}encoder.conv_in.weight" in infos else None,
        text_encoders=encoders,
        prediction_type=_prediction_type(infos, metadata),
        zero_terminal_snr="ztsnr" in infos,
    )


def find_prefix(keys: Collection[str], prefixes: tuple[str, ...], marker: str, what: str,
                name: str = "This file") -> str:
    """The first of ``prefixes`` under which ``marker`` is a key; a clear error naming ``what`` when none is."""
    prefix = next((p for p in prefixes if p + marker in keys), None)
    if prefix is None:
        shown = " or ".join(repr(p + marker) for p in prefixes)
        raise ModelFileError(f"{name} is not {what}: it has no tensor {shown}. It has {len(keys)} tensors.")
    return prefix


def flux_prefix(keys: Collection[str]) -> str:
    """The prefix of a Flux transformer's tensors in a file: "" (BFL's layout) or ``model.diffusion_model.``."""
    return find_prefix(keys, FLUX_PREFIXES, FLUX_MARKER, "a Flux transformer in Black Forest Labs' layout")


def _prediction_type(infos: dict[str, TensorInfo], metadata: dict[str, str] | None) -> str:
    """v-prediction where the file says so: a ``v_pred`` key (Forge/ComfyUI) or modelspec metadata."""
    declared = (metadata or {}).get("modelspec.prediction_type", "").lower()
    if "v_pred" in infos or declared in ("v", "v_prediction", "v-prediction"):
        return "v_prediction"
    return "epsilon"


def tensor_shape(infos: dict[str, TensorInfo], key: str, what: str) -> tuple[int, ...]:
    """The shape of a tensor the architecture needs; a clear error naming ``what`` when it is missing."""
    if key not in infos:
        raise ModelFileError(f"This {what} has no tensor {key!r}; the file is incomplete or of an unsupported variant.")
    return infos[key].shape


def block_count(infos: dict[str, TensorInfo], kind: str) -> int:
    """One past the highest ``kind.N.`` index, so that a block missing in the middle shows as missing tensors."""
    rx = re.compile(re.escape(kind) + r"\.(\d+)\.")
    return max((int(m.group(1)) for k in infos if (m := rx.match(k))), default=-1) + 1


def _indices(infos: dict[str, TensorInfo], pattern: str) -> list[int]:
    rx = re.compile(pattern)
    return sorted({int(m.group(1)) for k in infos if (m := rx.match(k))})


def unet_config(infos: dict[str, TensorInfo], family: Family, pooled_dim: int | None = None) -> dict:
    """A diffusers UNet2DConditionModel config from an LDM UNet's tensor shapes."""
    p = UNET
    model_channels = infos[f"{p}input_blocks.0.0.weight"].shape[0]
    levels: list[list[int]] = [[]]
    for i in _indices(infos, re.escape(p) + r"input_blocks\.(\d+)\.")[1:]:
        if f"{p}input_blocks.{i}.0.op.weight" in infos:
            levels.append([])
        else:
            levels[-1].append(i)
    channels, depths = [], []
    for blocks in levels:
        first = blocks[0]
        channels.append(infos[f"{p}input_blocks.{first}.0.out_layers.3.weight"].shape[0])
        depths.append(len(_indices(infos, re.escape(f"{p}input_blocks.{first}.1.transformer_blocks.") + r"(\d+)\.")))
    layers_per_block = len(levels[0])
    attn_key = next((k for k in infos if k.startswith(p) and k.endswith("attn2.to_k.weight")), None)
    if attn_key is None:
        raise ModelFileError("The UNet has no cross-attention layers; this is not an SD1.x/SD2.x/SDXL UNet.")
    proj_in = next(k for k in infos if k.startswith(p) and k.endswith(".proj_in.weight"))
    config = {
        "in_channels": infos[f"{p}input_blocks.0.0.weight"].shape[1],
        "out_channels": infos[f"{p}out.2.weight"].shape[0],
        "block_out_channels": channels,
        "layers_per_block": layers_per_block,
        "down_block_types": ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depths],
        "up_block_types": ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depths)],
        "transformer_layers_per_block": [max(d, 1) for d in depths],
        "cross_attention_dim": infos[attn_key].shape[1],
        "use_linear_projection": len(infos[proj_in].shape) == 2,
        "norm_num_groups": NORM_GROUPS,
        "sample_size": {Family.SD1: 64, Family.SD2: 96, Family.SDXL: 128}[family],
    }
    if family is Family.SD1:
        config["attention_head_dim"] = 8
    else:
        config["attention_head_dim"] = [max(c // 64, 1) for c in channels]
    if config["block_out_channels"][0] != model_channels:
        raise ModelFileError("The UNet's first level does not match its input convolution; the file is inconsistent.")
    if family is Family.SDXL:
        adm_in = infos[f"{p}label_emb.0.0.weight"].shape[1]
        config.update(
            addition_embed_type="text_time",
            addition_time_embed_dim=(adm_in - pooled_dim) // 6,
            projection_class_embeddings_input_dim=adm_in,
        )
    return config


def vae_config(infos: dict[str, TensorInfo], prefix: str, family: Family) -> dict:
    """A diffusers AutoencoderKL config from an LDM-layout VAE's tensor shapes."""
    levels = _indices(infos, re.escape(f"{prefix}encoder.down.") + r"(\d+)\.")
    channels = [infos[f"{prefix}encoder.down.{i}.block.0.conv2.weight"].shape[0] for i in levels]
    return {
        "in_channels": infos[f"{prefix}encoder.conv_in.weight"].shape[1],
        "out_channels": infos[f"{prefix}decoder.conv_out.weight"].shape[0],
        "block_out_channels": channels,
        "down_block_types": ["DownEncoderBlock2D"] * len(channels),
        "up_block_types": ["UpDecoderBlock2D"] * len(channels),
        "layers_per_block": len(_indices(infos, re.escape(f"{prefix}encoder.down.0.block.") + r"(\d+)\.")),
        "latent_channels": infos[f"{prefix}encoder.conv_out.weight"].shape[0] // 2,
        "norm_num_groups": NORM_GROUPS,
        "scaling_factor": 0.13025 if family is Family.SDXL else 0.18215,
        "sample_size": 1024 if family is Family.SDXL else 512,
    }


def clip_l_arch(infos: dict[str, TensorInfo], prefix: str) -> TextEncoderArch:
    tm = f"{prefix}text_model."
    vocab, hidden = infos[f"{tm}embeddings.token_embedding.weight"].shape
    layers = len(_indices(infos, re.escape(f"{tm}encoder.layers.") + r"(\d+)\."))
    config = _clip_config(
        vocab, hidden, layers, infos[f"{tm}encoder.layers.0.mlp.fc1.weight"].shape[0],
        infos[f"{tm}embeddings.position_embedding.weight"].shape[0], "quick_gelu",
    )
    return TextEncoderArch("clip_l", prefix, config)


def open_clip_arch(infos: dict[str, TensorInfo], prefix: str, with_projection: bool) -> TextEncoderArch:
    vocab, hidden = infos[f"{prefix}token_embedding.weight"].shape
    layers = len(_indices(infos, re.escape(f"{prefix}transformer.resblocks.") + r"(\d+)\."))
    # SD2 uses the penultimate layer + final norm; diffusers models that by dropping the last layer.
    drop_last = not with_projection
    config = _clip_config(
        vocab, hidden, layers - 1 if drop_last else layers,
        infos[f"{prefix}transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
        infos[f"{prefix}positional_embedding"].shape[0], "gelu",
    )
    if with_projection:
        config["projection_dim"] = infos[f"{prefix}text_projection"].shape[1]
    return TextEncoderArch("open_clip", prefix, config, with_projection, dropped_last_layer=drop_last)


def _clip_config(vocab: int, hidden: int, layers: int, intermediate: int, positions: int, act: str) -> dict:
    return {
        "vocab_size": vocab,
        "hidden_size": hidden,
        "intermediate_size": intermediate,
        "num_hidden_layers": layers,
        "num_attention_heads": max(hidden // 64, 1),
        "max_position_embeddings": positions,
        "hidden_act": act,
        "bos_token_id": 49406,
        "eos_token_id": 49407,
        "pad_token_id": 1,
    }
