"""Requests and pictures the generation tests share, in a module that imports no UI, API or client library (the GPU
machine's tests use them, and it has none of those)."""
from __future__ import annotations

import numpy as np
from PIL import Image

from webui.engine.request import GenerationRequest

PROMPT = "a red circle on the left, blue background"
NEGATIVE = "blurry"
SEEDS = [1234, 1235]
STEPS = 6
BOX = (16, 8, 48, 40)  # the masked part of the 64x64 test picture: whole latent pixels, so no rounding differs
ARGS = [True, 1, 0.5, 4, 0, 0.5, 2]  # A1111's script args: on, then its defaults
SOFT_SIZE = 256


def init_picture(width: int = 64, height: int = 64) -> Image.Image:
    """A picture with structure at every scale: a gradient, a disc and stripes."""
    y, x = np.mgrid[0:height, 0:width]
    rgb = np.stack([x * 255 // max(width - 1, 1), y * 255 // max(height - 1, 1), (x // 8 % 2) * 200], axis=-1)
    rgb[(x - width / 3) ** 2 + (y - height / 2) ** 2 < (min(width, height) / 5) ** 2] = (250, 30, 30)
    return Image.fromarray(rgb.astype(np.uint8))


def request(checkpoint: str, **fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=STEPS, cfg_scale=7.0,
                sampler_name="Euler a", scheduler="Automatic", seed=SEEDS[0], batch_size=len(SEEDS),
                checkpoint=checkpoint, save_images=False, init_images=[init_picture()], denoising_strength=0.6)
    return GenerationRequest(**(base | fields))


def mask_picture(width: int = 64, height: int = 64, box: tuple[int, int, int, int] = BOX) -> Image.Image:
    mask = Image.new("L", (width, height))
    mask.paste(255, box)
    return mask


def inpaint_request(checkpoint: str, **fields) -> GenerationRequest:
    """A mask without blur over the whole picture, the masked content the original: what diffusers' pipelines do."""
    base = dict(mask=mask_picture(), mask_blur=0, inpainting_fill=1, inpaint_full_res=False)
    return request(checkpoint, **(base | fields))



def hires_request(checkpoint: str, **fields) -> GenerationRequest:
    base = dict(prompt=PROMPT, negative_prompt=NEGATIVE, width=64, height=64, steps=STEPS, cfg_scale=7.0,
                sampler_name="Euler a", scheduler="Automatic", seed=SEEDS[0], batch_size=len(SEEDS),
                checkpoint=checkpoint, save_images=False, enable_hr=True, hr_scale=2, hr_upscaler="Latent",
                denoising_strength=0.6)
    return GenerationRequest(**(base | fields))


def soft_request(checkpoint: str, **fields):
    mask = Image.new("L", (SOFT_SIZE, SOFT_SIZE))
    mask.paste(255, (96, 96, 160, 160))
    return inpaint_request(checkpoint, init_images=[init_picture(SOFT_SIZE, SOFT_SIZE)], mask=mask, width=SOFT_SIZE,
                           height=SOFT_SIZE, mask_blur=8, **fields)
