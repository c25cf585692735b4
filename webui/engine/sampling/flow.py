"""Denoising for the flow-matching families, Flux and SD3.x.

The loop follows diffusers' FluxPipeline and StableDiffusion3Pipeline (from init latents: their Img2Img pipelines)
step for step, with the
"Simple" schedule both use for Flux (sigmas ``linspace(1, 1/N, N)``, then shifted):

* The shift is each family's (``families.sd3``, ``families.flux``).
* Flux dev: the distilled guidance scale ("Distilled CFG") is an input of the transformer.
* CFG is real classifier-free guidance for both (Flux usually runs at CFG 1: no negative pass).

How each family's transformer sees the latents (Flux: 2x2 patches with position ids) is its ``FlowLayout``.
"""
from __future__ import annotations

from typing import Protocol

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler

from webui.engine.conditioning.prompts import Conditioning
from webui.engine.control.flow import FlowControls
from webui.engine.sampling.ksampling import StepCallback
from webui.engine.sampling.steps import InitLatents, noise_at, noised_to

SD3_DEFAULT_SHIFT = 3.0


def set_timesteps(scheduler, steps: int, device: torch.device) -> None:
    """The "Simple" schedule where the scheduler takes sigmas; the solver's own flow sigmas elsewhere."""
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        scheduler.set_timesteps(sigmas=np.linspace(1.0, 1 / steps, steps), device=device)
    else:
        scheduler.set_timesteps(steps, device=device)


class FlowLayout(Protocol):
    """How a family's transformer sees the latents, and what else it takes beside the text (``families.base``:
    the latents as they are and nothing else; ``families.flux``: packed 2x2 patches, positions, guidance)."""

    def pack(self, noise: torch.Tensor) -> torch.Tensor:
        """The transformer's view of (B, C, h, w) latents."""

    def unpack(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Packed latents back to ``noise``'s (B, C, h, w) shape."""

    def inputs(self, denoiser: torch.nn.Module, noise: torch.Tensor, context: torch.Tensor, copies: int,
               distilled_cfg: float) -> dict:
        """Keyword inputs of every call beside latents, timestep and text (``copies``: 2 with CFG)."""

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        """The scheduler's timestep (0..1000) as the transformer takes it."""


def denoise_flow(denoiser: torch.nn.Module, layout: FlowLayout, scheduler, noise: torch.Tensor, cond: Conditioning,
                 uncond: Conditioning | None, cfg_scale: float, distilled_cfg: float, extra: dict,
                 on_step: StepCallback, start: int = 0, init: InitLatents | None = None,
                 controls: FlowControls | None = None) -> torch.Tensor:
    """Latents (B, C, h, w) denoised from ``noise``; ``uncond`` is None without CFG. With ``init`` (img2img) the
    schedule's steps from ``start`` on run, from its latents mixed with the noise at that step's sigma; inpainting
    puts the kept part back after each step, as diffusers' SD3 and Flux Inpaint pipelines do. ``controls``: the
    ControlNets' block samples go to the transformer at each step."""
    context = cond.embeds if uncond is None else torch.cat([uncond.embeds, cond.embeds])
    pooled = cond.pooled if uncond is None else torch.cat([uncond.pooled, cond.pooled])
    copies = 1 if uncond is None else 2
    # The scheduler's maths in float32 (as the UNet loop): its ancestral noise is drawn in the velocity's dtype,
    # and a CPU generator draws other numbers in 16 bits than in 32 (another picture on a GPU).
    packed_noise = latents = layout.pack(noise).float()
    timesteps = scheduler.timesteps[start * scheduler.order:]
    if init is not None and init.from_image:
        original = layout.pack(init.latents)
        latents = noised_to(scheduler, original, init.start_noise(packed_noise), start * scheduler.order)
        if init.blends:
            repaint = layout.pack(init.repaint.expand(len(noise), noise.shape[1], -1, -1))
    inputs = layout.inputs(denoiser, noise, context, copies, distilled_cfg)
    # an inpainting model's extra input (Flux Fill's), beside the latents in the transformer's layout
    fill = None if init is None or init.extra is None else layout.pack(
        init.extra_rows(len(noise) * copies)).to(noise.device, noise.dtype)
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        x = torch.cat([latents] * copies).to(noise.dtype)
        timestep = t.expand(x.shape[0]).to(x.dtype)
        if fill is not None:
            x = torch.cat([x, fill], dim=-1)
        residuals = {} if controls is None else controls.residuals(i, x, layout.timestep(timestep), context, pooled,
                                                                   inputs)
        velocity = denoiser(hidden_states=x, timestep=layout.timestep(timestep), encoder_hidden_states=context,
                            pooled_projections=pooled, return_dict=False, **inputs, **residuals)[0].float()
        if uncond is not None:
            v_uncond, v_cond = velocity.chunk(2)
            velocity = v_uncond + cfg_scale * (v_cond - v_uncond)
        latents = scheduler.step(velocity, t, latents, **extra, return_dict=False)[0]
        if init is not None and init.blends:  # the kept part at the next step's noise level (none after the last)
            last = i == total - 1
            kept = original if last else noise_at(scheduler, original, packed_noise, timesteps[i + 1:i + 2])
            if init.soft is None:
                latents = init.kept(latents, kept, repaint)
            else:  # the blend weighs each latent pixel's channels together: in the latents' own layout
                sigma = 0.0 if last else timesteps[i + 1] / scheduler.config.num_train_timesteps
                latents = layout.pack(init.kept(layout.unpack(latents, noise), layout.unpack(kept, noise),
                                                sigma=sigma))
        if on_step(i, total, layout.unpack(latents, noise)):
            break
    return layout.unpack(latents, noise)
