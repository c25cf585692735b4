"""Tiny ControlNets and control images for the tests (no UI or client imports: the GPU machine's tests use them)."""
from __future__ import annotations

import numpy as np
import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from PIL import Image


def control_picture(size: int = 64, left: bool = True) -> Image.Image:
    """An edge map: a white ring on black, on the left or the right."""
    y, x = np.mgrid[0:size, 0:size]
    centre = size / 3 if left else 2 * size / 3
    ring = np.abs(np.hypot(x - centre, y - size / 2) - size / 5) < 1.5
    return Image.fromarray((np.stack([ring] * 3, axis=-1) * 255).astype(np.uint8))


def tiny_controlnet(folder, seed: int) -> ControlNetModel:
    """A ControlNet grown from the checkpoint's UNet (as they are trained), its zero convolutions made non-zero."""
    unet = UNet2DConditionModel.from_pretrained(folder, subfolder="unet", local_files_only=True)
    model = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 16, 16))
    generator = torch.Generator().manual_seed(seed)
    for name, parameter in model.named_parameters():
        if name.startswith(("controlnet_down_blocks", "controlnet_mid_block", "controlnet_cond_embedding")):
            parameter.data = torch.randn(parameter.shape, generator=generator) * 0.1
    return model.eval()
