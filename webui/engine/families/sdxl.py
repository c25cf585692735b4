"""SDXL: a UNet over 4-channel latents conditioned on two CLIPs (CLIP-L and OpenCLIP bigG) and on the image's
size ("micro-conditioning"), with its own VAE scaling and latent colours."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from webui.engine.conditioning.prompts import Conditioning
from webui.engine.families.base import UNetFamily
from webui.engine.formats.detect import Family
from webui.engine.lora.layout import LoraTextEncoder

if TYPE_CHECKING:
    from webui.engine.generate import Resolved


class StableDiffusionXL(UNetFamily):
    family = Family.SDXL
    activation_per_pixel = 13_000
    latent_rgb = ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                   [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011])
    clip_kinds = ("clip_l", "clip_g")
    sdxl_sigmas = True
    vae_upcast = True
    clip_penultimate = True
    lora_text_encoders = (LoraTextEncoder("text_encoder", "clip_l", ("lora_te1_",)),
                          LoraTextEncoder("text_encoder_2", "clip_g", ("lora_te2_",)))

    def added_conditions(self, job: Resolved, cond: Conditioning, uncond: Conditioning | None, device: torch.device,
                         dtype: torch.dtype) -> dict | None:
        """SDXL's micro-conditioning: pooled text and (original size, crop, target size)."""
        req = job.request
        size = [req.height, req.width, 0, 0, req.height, req.width]
        time_ids = torch.tensor([size] * req.batch_size, device=device, dtype=dtype)
        pooled = cond.pooled if uncond is None else torch.cat([uncond.pooled, cond.pooled])
        if uncond is not None:
            time_ids = torch.cat([time_ids, time_ids])
        return {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids}
