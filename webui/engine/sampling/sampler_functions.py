"""The A1111 samplers that neither diffusers nor k-diffusion 0.1.1 has, in k-diffusion's style.

Each is a function of (model, x, sigmas, extra_args, callback, disable, …) like ``k_diffusion.sampling``'s,
so the sigma-space loop runs them the same way; written here from their papers.
"""
from __future__ import annotations

import torch

from webui.engine.sampling.kdiffusion import sampling

CFGPP_SCALE = 12.5  # CFG++'s guidance runs from 0 to 1; A1111 maps its CFG scale 0..12.5 onto it


@torch.no_grad()
def sample_lcm(model, x, sigmas, extra_args=None, callback=None, disable=None, noise_sampler=None):
    """Latent Consistency Models' multistep sampling (Luo et al. 2023): each step predicts the clean latents,
    which are noised again to the next sigma."""
    noise_sampler = noise_sampler or sampling.default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **(extra_args or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        x = denoised
        if sigmas[i + 1] > 0:
            x = x + sigmas[i + 1] * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_tcd(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.3, noise_sampler=None):
    """Trajectory Consistency Distillation's strategic stochastic sampling (Zheng et al. 2024): each step predicts
    the clean latents and the noise, goes along the trajectory to the timestep ``(1 - eta)`` times the next one's
    (rounded down, as the model's discrete timesteps are) and is noised forward from there to the next sigma. eta
    (the paper's gamma) 0 is DDIM, 1 LCM's sampling; the default 0.3 is the paper's.

    ``model`` is ``ksampling.GuidedDenoiser``: its ``model`` holds the training schedule (timesteps <-> sigmas)."""
    noise_sampler = noise_sampler or sampling.default_noise_sampler(x)
    schedule = model.model
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, **(extra_args or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        if sigmas[i + 1] == 0:
            x = denoised
            continue
        # a timestep from its sigma is exact to float precision only: rounded before it is rounded down
        t_next = schedule.sigma_to_t(sigmas[i + 1], quantize=False).round(decimals=3)
        sigma_s = schedule.t_to_sigma(torch.floor((1 - eta) * t_next)).to(x.dtype)
        x = denoised + sigma_s * (x - denoised) / sigmas[i]
        if eta > 0:
            x = x + (sigmas[i + 1] ** 2 - sigma_s ** 2).clamp(min=0).sqrt() * noise_sampler(sigmas[i], sigmas[i + 1])
    return x


@torch.no_grad()
def sample_ddim_cfgpp(model, x, sigmas, extra_args=None, callback=None, disable=None, eta=0.0, noise_sampler=None):
    """DDIM with CFG++ (Chung et al. 2024): the guided prediction, at 1/12.5 of the CFG scale, gives the clean
    latents; the unconditional one the direction to the next noise level. In sigma space a DDIM step is an
    ancestral Euler step and DDIM's eta its eta.

    ``model`` is ``ksampling.GuidedDenoiser``: it takes ``cfg_scale`` and keeps ``last_uncond``."""
    noise_sampler = noise_sampler or sampling.default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    for i in range(len(sigmas) - 1):
        denoised = model(x, sigmas[i] * s_in, cfg_scale=model.cfg_scale / CFGPP_SCALE, **(extra_args or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigmas[i], "sigma_hat": sigmas[i], "denoised": denoised})
        sigma_down, sigma_up = sampling.get_ancestral_step(sigmas[i], sigmas[i + 1], eta=eta)
        x = denoised + sampling.to_d(x, sigmas[i], model.last_uncond) * sigma_down
        if sigmas[i + 1] > 0:
            x = x + noise_sampler(sigmas[i], sigmas[i + 1]) * sigma_up
    return x


def restart_steps(sigmas: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The (sigma, next sigma) steps of Restart: from 20 steps on, a Karras schedule with fewer steps, and at the
    sigma nearest 0.1 a jump back to the sigma nearest 2, descended again (9 steps once; from 36 steps, steps // 4
    twice), so the count of steps stays the one asked for."""
    steps = len(sigmas) - 1
    if steps < 20:
        return list(zip(sigmas[:-1], sigmas[1:]))
    restart, times = (steps // 4, 2) if steps >= 36 else (9, 1)
    main = sampling.get_sigmas_karras(steps - restart * times, sigmas[-2].item(), sigmas[0].item(),
                                      device=sigmas.device)
    low, high = int((main - 0.1).abs().argmin()), int((main - 2).abs().argmin())
    pairs = []
    for i in range(len(main) - 1):
        pairs.append((main[i], main[i + 1]))
        if i + 1 == low and high < low:
            again = sampling.get_sigmas_karras(restart + 1, main[low].item(), main[high].item(),
                                               device=sigmas.device)[:-1]
            pairs += list(zip(again[:-1], again[1:])) * times
    return pairs


@torch.no_grad()
def sample_restart(model, x, sigmas, extra_args=None, callback=None, disable=None, s_noise=1.0, noise_sampler=None):
    """Restart sampling (Xu et al. 2023): Heun steps (Euler to sigma 0); where ``restart_steps`` jumps back up,
    fresh noise raises the latents to the higher sigma first."""
    noise_sampler = noise_sampler or sampling.default_noise_sampler(x)
    s_in = x.new_ones([x.shape[0]])
    last = None
    for i, (sigma, sigma_next) in enumerate(restart_steps(sigmas)):
        if last is not None and sigma > last:
            x = x + noise_sampler(last, sigma) * s_noise * (sigma ** 2 - last ** 2).sqrt()
        denoised = model(x, sigma * s_in, **(extra_args or {}))
        if callback is not None:
            callback({"x": x, "i": i, "sigma": sigma, "sigma_hat": sigma, "denoised": denoised})
        d = sampling.to_d(x, sigma, denoised)
        x_next = x + d * (sigma_next - sigma)
        if sigma_next > 0:
            d_next = sampling.to_d(x_next, sigma_next, model(x_next, sigma_next * s_in, **(extra_args or {})))
            x_next = x + (d + d_next) / 2 * (sigma_next - sigma)
        x, last = x_next, sigma_next
    return x
