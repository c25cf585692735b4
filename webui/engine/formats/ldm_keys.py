"""LDM/SGM key names of diffusers' UNet and VAE weights: the maps A1111 single files use, which the LoRA key tables
(``lora.keys``) and the checkpoint writers (``webui.synthetic.ldm_export``) share. The inverse of diffusers' own
single-file conversion (``diffusers.loaders.single_file_utils.convert_ldm_*``)."""
from __future__ import annotations

import re

import torch
from diffusers.loaders.single_file_utils import DIFFUSERS_TO_LDM_MAPPING

StateDict = dict[str, torch.Tensor]

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

# A block map: diffusers prefix -> (LDM prefix, renames applied to what follows the prefix).
BlockMap = dict[str, tuple[str, dict[str, str]]]


def remap(state_dict: StateDict, blocks: BlockMap, exact: dict[str, str]) -> StateDict:
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
    return remap(state_dict, _unet_blocks(config), exact)


def unet_ldm_names(names: list[str], config) -> dict[str, str]:
    """The LDM name (without the ``model.diffusion_model.`` prefix) of each diffusers UNet tensor name."""
    return {diffusers: ldm for ldm, diffusers in unet_to_ldm(dict(zip(names, names)), config).items()}


def controlnet_to_ldm(state_dict: StateDict, config) -> StateDict:
    """Diffusers ``ControlNetModel`` state dict → LDM names, without the ``control_model.`` prefix: the UNet's down
    and middle blocks, the hint block (convolutions at even indices), the zero convolutions."""
    layers = DIFFUSERS_TO_LDM_MAPPING["controlnet"]
    exact = dict(layers["layers"]) | {"controlnet_mid_block.weight": "middle_block_out.0.weight",
                                      "controlnet_mid_block.bias": "middle_block_out.0.bias"}
    if config.get("addition_embed_type") == "text_time":
        exact.update(layers["addition_embed_type"])
    blocks = _unet_blocks({**config, "up_block_types": []})
    blocks["controlnet_down_blocks."] = ("zero_convs.", {})
    out = remap({k: v for k, v in state_dict.items() if not k.startswith("controlnet_cond_embedding.blocks.")},
                blocks, exact)
    for key, value in state_dict.items():  # blocks.i → input_hint_block.2(i+1) (SiLUs between them)
        if match := re.match(r"controlnet_cond_embedding\.blocks\.(\d+)\.(\w+)$", key):
            out[f"input_hint_block.{2 * (int(match.group(1)) + 1)}.{match.group(2)}"] = value
    return {re.sub(r"^zero_convs\.(\d+)\.", r"zero_convs.\1.0.", k): v for k, v in out.items()}


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
    out = remap(state_dict, _vae_blocks(config), exact)
    for key, value in out.items():
        if ".mid.attn_1." in key and key.endswith("weight") and value.ndim == 2:
            out[key] = value[:, :, None, None]
    return out
