"""T2I-Adapters with random values, written as users have them: TencentARC's original layout (the SD1.x adapters:
``conv_in``, ``body.{level * per_level + resnet}.block1``, the light adapter's ``body.N.body.M``) or diffusers'
(``adapter.``), for the tests."""
from __future__ import annotations

import re
from pathlib import Path

import torch
from diffusers import T2IAdapter
from safetensors.torch import save_file


def random_t2i_adapter(channels: list[int], seed: int, in_channels: int = 3, kind: str = "full_adapter",
                       res_blocks: int = 2) -> T2IAdapter:
    """An adapter whose feature maps fit a UNet with down blocks of ``channels``."""
    torch.manual_seed(seed)
    downscale = 16 if kind == "full_adapter_xl" else 8
    adapter_channels = channels[:-1] if kind == "light_adapter" else channels
    return T2IAdapter(in_channels=in_channels, channels=adapter_channels, num_res_blocks=res_blocks,
                      downscale_factor=downscale, adapter_type=kind).eval()


def original_layout(adapter: T2IAdapter) -> dict[str, torch.Tensor]:
    """The adapter's tensors under TencentARC's original names."""
    per_level = adapter.config.num_res_blocks
    light = adapter.config.adapter_type == "light_adapter"
    tensors = {}
    for key, value in adapter.state_dict().items():
        key = key.removeprefix("adapter.")
        if light:
            key = re.sub(r"^body\.(\d+)\.resnets\.(\d+)\.", r"body.\1.body.\2.", key)
        elif match := re.match(r"body\.(\d+)\.resnets\.(\d+)\.(.+)", key):
            key = f"body.{int(match.group(1)) * per_level + int(match.group(2))}.{match.group(3)}"
        elif match := re.match(r"body\.(\d+)\.in_conv\.(.+)", key):
            key = f"body.{int(match.group(1)) * per_level}.in_conv.{match.group(2)}"
        tensors[key] = value.detach().contiguous()
    return tensors


def write_t2i_adapter(path: Path, adapter: T2IAdapter, layout: str = "original") -> Path:
    tensors = original_layout(adapter) if layout == "original" else {
        k: v.detach().contiguous() for k, v in adapter.state_dict().items()}
    save_file(tensors, str(path))
    return path
