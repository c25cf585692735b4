"""Each phase's activation memory, estimated before a run from the family's measured coefficients."""
from __future__ import annotations

import torch

from webui.engine.memory import MB

MARGIN = 256 * MB  # small tensors, the allocator's rounding, cuBLAS workspaces


def activation_bytes(per_pixel: int, width: int, height: int, batch: int, cfg: bool, dtype: torch.dtype) -> int:
    """Peak activation memory of one denoiser call, estimated before the run.

    Linear in the latent area and in the batch (doubled with CFG), with memory-efficient
    attention. ``per_pixel`` (each family's ``activation_per_pixel``) is bytes per latent pixel per
    image at 2-byte precision, measured on the GPU machine with a 25 % margin: the denoiser's peak above
    what was allocated before its call (benchmarks/activations.py, H100, 2026-12-06: SD1.5 16,700, SDXL
    10,500 at 512² to 1536², one image or two; Flux 498 MB at 1344x768 from benchmarks/memory.py). An
    earlier reading took a resident step's peak less the denoiser alone, counting the text encoders and
    the VAE in: SDXL's estimate was 7x too high and kept part of its UNet off an 8 GB card.
    """
    images = batch * (2 if cfg else 1)
    scale = torch.finfo(dtype).bits / 16
    return int(per_pixel * (width // 8) * (height // 8) * images * scale) + MARGIN


def encode_activation_bytes(per_prompt: int, prompts: int) -> int:
    """Peak activation memory of encoding ``prompts`` prompts at once (each family's ``encode_activation_per_prompt``)."""
    return per_prompt * prompts + MARGIN
