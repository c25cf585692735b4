"""T2I-Adapters (TencentARC's) as ControlNet units, as sd-webui-controlnet and Forge run them from
``models/ControlNet``: a small network turns the control image into one feature map for each of the UNet's down
blocks, which the UNet adds inside them (diffusers' ``T2IAdapter``; the UNet's
``down_intrablock_additional_residuals``), computed once a pass rather than every step. The files as users have them:
TencentARC's originals for SD1.x (``conv_in``, ``body.N.block1``; the light colour adapter's ``body.N.in_conv``,
``body.N.body.M``) and diffusers-keyed ones (``adapter.``: their SDXL adapters), the architecture read from the
tensors."""
from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from diffusers import T2IAdapter

from webui.engine.formats.detect import Family, block_count
from webui.engine.formats.files import TensorInfo
from webui.errors import ModelFileError

PREFIX = "adapter."
DOWNSCALE = {"full_adapter": 8, "light_adapter": 8, "full_adapter_xl": 16}  # the pixel unshuffle's factor


def is_t2i_adapter(keys: Iterable[str]) -> bool:
    return any(k.startswith((f"{PREFIX}body.", "body.0.")) for k in keys)


def to_diffusers_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original T2I-Adapter's tensors under diffusers' names (a diffusers-keyed one as it is). In the full
    adapter's original layout the resnet blocks are numbered through (``body.{block * per_block + resnet}``), the
    first one of each level that widens the channels holding an ``in_conv``; the light one nests them."""
    if any(k.startswith(PREFIX) for k in state_dict):
        return state_dict
    if any(".skep." in k or ".down_opt." in k for k in state_dict):
        raise ModelFileError("This T2I-Adapter has skip or downsampling convolutions (sk=False, use_conv=True), an "
                             "architecture diffusers' T2IAdapter does not build: use TencentARC's released adapters.")
    renamed = {}
    if "body.0.in_conv.weight" in state_dict:  # the light adapter (its colour model)
        for key, value in state_dict.items():
            renamed[PREFIX + re.sub(r"^body\.(\d+)\.body\.(\d+)\.", r"body.\1.resnets.\2.", key)] = value
        return renamed
    per_block = next((int(m.group(1)) for k in state_dict if (m := re.match(r"body\.(\d+)\.in_conv\.", k))),
                     block_count(state_dict, "body"))
    for key, value in state_dict.items():
        match = re.match(r"body\.(\d+)\.(in_conv|block1|block2)\.(.+)", key)
        if match is None:
            renamed[PREFIX + key] = value
            continue
        index, layer, rest = int(match.group(1)), match.group(2), match.group(3)
        level, resnet = divmod(index, per_block)
        where = f"body.{level}.in_conv" if layer == "in_conv" else f"body.{level}.resnets.{resnet}.{layer}"
        renamed[f"{PREFIX}{where}.{rest}"] = value
    return renamed


def t2i_adapter_config(infos: dict[str, TensorInfo]) -> dict:
    """A diffusers-keyed adapter's ``T2IAdapter`` config, from the tensor shapes."""
    levels = block_count(infos, f"{PREFIX}body")
    if f"{PREFIX}body.0.out_conv.weight" in infos:
        kind = "light_adapter"
        channels = [infos[f"{PREFIX}body.{i}.out_conv.weight"].shape[0] for i in range(levels - 1)]
        pixels = infos[f"{PREFIX}body.0.in_conv.weight"].shape[1]
    else:
        pixels = infos[f"{PREFIX}conv_in.weight"].shape[1]
        kind = "full_adapter_xl" if pixels % DOWNSCALE["full_adapter_xl"] ** 2 == 0 else "full_adapter"
        channels = [infos[f"{PREFIX}body.{i}.resnets.0.block1.weight"].shape[0] for i in range(levels)]
    return {"in_channels": pixels // DOWNSCALE[kind] ** 2, "channels": channels, "adapter_type": kind,
            "num_res_blocks": block_count(infos, f"{PREFIX}body.0.resnets"), "downscale_factor": DOWNSCALE[kind]}


def adapter_family(config: dict, checkpoint: Family) -> Family:
    """The family an adapter is for: SDXL's downscale by 16, SD1.x's and SD2.x's (the same channels) by 8."""
    if config["adapter_type"] == "full_adapter_xl":
        return Family.SDXL
    return checkpoint if checkpoint in (Family.SD1, Family.SD2) else Family.SD1


def adapter_features(adapter: T2IAdapter, hint: torch.Tensor, scale: float) -> list[torch.Tensor]:
    """The adapter's feature maps for a control image (RGB in [0, 1]; a one-channel adapter takes its grey, as
    PIL's "L" conversion weighs it), times the unit's weight."""
    if adapter.config.in_channels == 1:
        hint = (hint * torch.tensor([0.299, 0.587, 0.114], device=hint.device, dtype=hint.dtype)[:, None, None]
                ).sum(1, keepdim=True)
    return [feature * scale for feature in adapter(hint.to(adapter.dtype))]
