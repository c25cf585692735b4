"""Denoising for the UNet families (SD1.x, SD2.x, SDXL): epsilon or v prediction.

The loop follows diffusers' StableDiffusion(XL)Pipeline and (from init latents) StableDiffusion(XL)Img2ImgPipeline
step for step (same scheduler calls, same noise), so the same weights, seed and sampler give the same image as the
plain pipeline; sampler /
schedule type pairs diffusers has no scheduler for run in sigma space (``ksampling``).
"""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch
from diffusers import DPMSolverSDEScheduler
from diffusers.schedulers.scheduling_dpmsolver_sde import BrownianTreeNoiseSampler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from webui.engine.conditioning.prompts import Conditioning
from webui.engine.control.apply import Controls
from webui.engine.sampling.ksampling import CpuBrownianNoise, GuidedDenoiser, StepCallback, sample
from webui.engine.sampling.samplers import step_kwargs
from webui.engine.sampling.steps import InitLatents, noise_at, noised_to

if TYPE_CHECKING:
    from webui.engine.generate import Resolved
    from webui.engine.loading.load import LoadedModel


def denoise_unet(model: LoadedModel, job: Resolved, seeds: list[int], generators: list[torch.Generator],
                 noise: torch.Tensor, cond: Conditioning, uncond: Conditioning | None, on_step: StepCallback,
                 added: dict | None, sdxl: bool, init: InitLatents | None = None) -> torch.Tensor:
    """The diffusers StableDiffusion(XL)Pipeline loop, or the sigma-space one for what diffusers' schedulers cannot
    do; ``uncond`` is None without CFG, ``added`` the UNet's added conditions (SDXL's), ``sdxl`` picks the sigma
    schedules' SDXL variants. With ``init`` (img2img) the schedule's last ``job.steps.run`` steps run, from its
    latents noised to the first of them; inpainting as diffusers' StableDiffusion(XL)InpaintPipeline. The job's
    ControlNet units act as diffusers' StableDiffusion(XL)ControlNetPipeline applies them, an IP-Adapter unit's image
    tokens go beside the text (its layers in the UNet meanwhile: ``ip_adapter.adapter_in``)."""
    req, sampling, unet, steps = job.request, job.sampling, model.denoiser, job.steps
    context = cond.embeds if uncond is None else torch.cat([uncond.embeds, cond.embeds])
    extra = init is not None and init.extra is not None
    units = job.active_controls()
    controls = Controls(units, steps.run, uncond is not None, model.vae_scale_factor) if units else None

    def model_input(x: torch.Tensor) -> torch.Tensor:
        x = x.to(noise.dtype)
        return torch.cat([x, init.extra_rows(len(x)).to(x)], dim=1) if extra else x

    def predict(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x = model_input(x)
        if controls is None:
            return unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample.float()
        residuals = controls.residuals(x, t, context, added)
        return unet(x, t, encoder_hidden_states=controls.context(context), added_cond_kwargs=added,
                    **residuals).sample.float()

    if controls is not None:
        on_step = controls.counting(on_step)
    if not sampling.native:
        denoiser = GuidedDenoiser(predict, model.scheduler_config, req.cfg_scale, uncond is not None, init)
        return sample(sampling.sampler.ksampler, denoiser,
                      lambda schedule: sampling.sigmas(steps.total, schedule, sdxl), noise, seeds, generators,
                      sampling.eta, on_step, steps.start, init)
    scheduler = sampling.scheduler(model.scheduler_config, seed=seeds)
    scheduler.set_timesteps(steps.total, device=noise.device)
    timesteps = scheduler.timesteps[steps.start * scheduler.order:]
    # The scheduler's maths in float32, whatever the UNet computes in: diffusers draws ancestral noise in the model
    # output's dtype, and a CPU generator draws other numbers in float16 than in float32 (another picture on a GPU).
    if init is None or not init.from_image:
        latents = noise.float() * scheduler.init_noise_sigma
    else:
        latents = noised_to(scheduler, init.latents, init.start_noise(noise.float()), steps.start * scheduler.order)
    brownian_on_cpu(scheduler, latents, seeds)
    step_extra = step_kwargs(scheduler, generators, sampling.eta)
    total = len(timesteps)
    for i, t in enumerate(timesteps):
        x = latents if uncond is None else torch.cat([latents] * 2)
        noise_pred = predict(scheduler.scale_model_input(x, t), t)
        if uncond is not None:
            noise_uncond, noise_cond = noise_pred.chunk(2)
            noise_pred = noise_uncond + req.cfg_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise_pred, t, latents, **step_extra).prev_sample
        if init is not None and init.blends:  # the kept part at the next step's noise level (none after the last)
            last = i == total - 1
            original = init.latents if last else noise_at(scheduler, init.latents, noise.float(),
                                                          timesteps[i + 1:i + 2])
            sigma = None if init.soft is None else 0.0 if last else noise_level(scheduler, timesteps[i + 1])
            latents = init.kept(latents, original, sigma=sigma)
        if on_step(i, total, latents):
            break
    return latents


def brownian_on_cpu(scheduler: SchedulerMixin, latents: torch.Tensor, seeds: list[int]) -> None:
    """diffusers' DPM++ SDE builds its Brownian tree on the latents' device at its first step: build it on the CPU
    instead (CpuBrownianNoise), as the sigma-space samplers do."""
    if not isinstance(scheduler, DPMSolverSDEScheduler):
        return
    sigmas = scheduler.sigmas.cpu()
    low, high = sigmas[sigmas > 0].min().item(), sigmas.max().item()
    scheduler.noise_sampler = CpuBrownianNoise(lambda cpu_x: BrownianTreeNoiseSampler(cpu_x, low, high, seeds), latents)


def noise_level(scheduler: SchedulerMixin, timestep: torch.Tensor) -> torch.Tensor:
    """The sigma of a DDPM-trained timestep (soft inpainting's blend follows it)."""
    alpha = scheduler.alphas_cumprod.to(timestep.device)[timestep.long()]
    return ((1 - alpha) / alpha) ** 0.5
