"""Denoising for the flow-matching families, Flux and SD3.x.

The loop follows diffusers' FluxPipeline and StableDiffusion3Pipeline step for step, with the
"Simple" schedule both use for Flux (sigmas ``linspace(1, 1/N, N)``, then shifted):

* The shift is each family's (``families.sd3``, ``families.flux``).
* Flux dev: the distilled guidance scale ("Distilled CFG") is an input of the transformer.
* CFG is real classifier-free guidance for both (Flux usually runs at CFG 1: no negative pass).

Flux sees the latent image as a sequence of 2x2 patches (packing) with (0, row, column) position ids.
"""
from __future__ import annotations

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline

from webui.engine.conditioning.prompts import Conditioning
from webui.engine.formats.detect import Family
from webui.engine.sampling.ksampling import StepCallback

FLOW_FAMILIES = (Family.FLUX, Family.SD3)
SD3_DEFAULT_SHIFT = 3.0


def set_timesteps(scheduler, steps: int, device: torch.device) -> None:
    """The "Simple" schedule where the scheduler takes sigmas; the solver's own flow sigmas elsewhere."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device)
    else:
        scheduler.set_timesteps(steps, device=device)


def denoise_flow(denoiser: torch.nn.Module, family: Family, scheduler, noise: torch.Tensor, cond: Conditioning,
                 uncond: Conditioning | None, cfg_scale: float, distilled_cfg: float, extra: dict,
                 on_step: StepCallback) -> torch.Tensor:
    """Latents (B, C, h, w) denoised from ``noise``; ``uncond`` is None without CFG."""
    batch, channels, h, w = noise.shape
    flux = family is Family.FLUX
    context = cond.embeds if uncond is None else torch.cat([uncond.embeds, cond.embeds])
    pooled = cond.pooled if uncond is None else torch.cat([uncond.pooled, cond.pooled])
    copies = 1 if uncond is None else 2
    # The scheduler's maths in float32 (as the UNet loop): its ancestral noise is drawn in the velocity's dtype,
    # and a CPU generator draws other numbers in 16 bits than in 32 (another picture on a GPU).
    latents = (FluxPipeline._pack_latents(noise, batch, channels, h, w) if flux else noise).float()
    inputs: dict = {}
    if flux:
        inputs["img_ids"] = FluxPipeline._prepare_latent_image_ids(batch, h // 2, w // 2, noise.device, noise.dtype)
        inputs["txt_ids"] = torch.zeros(context.shape[1], 3, device=noise.device, dtype=noise.dtype)
        if denoiser.config.guidance_embeds:
            inputs["guidance"] = torch.full((batch * copies,), distilled_cfg, device=noise.device, dtype=torch.float32)
    unpack = (lambda x: FluxPipeline._unpack_latents(x, h * 8, w * 8, 8)) if flux else (lambda x: x)
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        x = torch.cat([latents] * copies).to(noise.dtype)
        timestep = t.expand(x.shape[0]).to(x.dtype)
        velocity = denoiser(hidden_states=x, timestep=timestep / 1000 if flux else timestep,
                            encoder_hidden_states=context, pooled_projections=pooled, return_dict=False,
                            **inputs)[0].float()
        if uncond is not None:
            v_uncond, v_cond = velocity.chunk(2)
            velocity = v_uncond + cfg_scale * (v_cond - v_uncond)
        latents = scheduler.step(velocity, t, latents, **extra, return_dict=False)[0]
        if on_step(i, total, unpack(latents)):
            break
    return unpack(latents)
