"""Sampling in sigma space, as A1111 runs its k-samplers: the path for what diffusers' schedulers cannot do
(Euler a with Karras, DPM++ 2S a, Restart, eta other than 1 …).

The UNet becomes a k-diffusion denoiser: k-diffusion's ``DiscreteEpsDDPMDenoiser`` (or ``DiscreteVDDPMDenoiser``
for v-prediction) over the model's training betas, which maps sigmas to timesteps by log-sigma interpolation
(A1111's CompVisDenoiser without quantization), with classifier-free guidance on the denoised latents. The
latents stay in float32 here; only the UNet sees its own dtype.

Noise is seeded per image as A1111 seeds it: ancestral noise from each image's CPU generator (the one that drew
its starting noise), an SDE sampler's from a Brownian tree per image seeded with the image's seed.
"""
from __future__ import annotations

import inspect
import weakref
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass

import torch
from diffusers import DDPMScheduler

from webui.engine.sampling.kdiffusion import external, sampling
from webui.engine.sampling.steps import InitLatents
from webui.errors import UserError

Predict = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (scaled latents, timesteps) -> eps or v
StepCallback = Callable[[int, int, torch.Tensor], bool]  # (step, total, latents) -> stop?
TRAINING_NOISE = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas")


@dataclass(frozen=True)
class KSampler:
    """A sampler function in k-diffusion's style: ``function(model, x, sigmas, callback=…, disable=…, **kw)``."""

    function: Callable[..., torch.Tensor]
    brownian: bool = False
    """SDE noise from a Brownian tree (seeded per image), not from the generators."""
    discard_penultimate: bool = False
    """Sample one step more and drop the next-to-last sigma (A1111's DPM2 and DPM2 a)."""
    own_eta: bool = False
    """The function's own default eta is the sampler's (TCD's gamma), not the option eta_ancestral's."""

    @property
    def takes_eta(self) -> bool:
        return "eta" in inspect.signature(self.function).parameters

    @property
    def function_eta(self) -> float:
        return inspect.signature(self.function).parameters["eta"].default


class GuidedDenoiser:
    """The UNet as k-diffusion sees it: denoised latents at a sigma, with classifier-free guidance.

    ``predict`` gets the latents twice over (unconditional first) when ``guided``. After each call
    ``last_uncond`` holds the unconditional prediction (the conditional one without guidance), for CFG++. Inpainting
    with a model that is not for it (``init.blends``) puts the kept part of the init latents into each prediction,
    as A1111's CFG denoiser does."""

    def __init__(self, predict: Predict, scheduler_config: dict, cfg_scale: float, guided: bool,
                 init: InitLatents | None = None):
        if scheduler_config.get("rescale_betas_zero_snr"):
            raise UserError("this zero-terminal-SNR model has an infinite top sigma: choose a sampler and schedule "
                            "type diffusers runs (e.g. Euler with SGM Uniform)", "scheduler")
        config = {k: scheduler_config[k] for k in TRAINING_NOISE if scheduler_config.get(k) is not None}
        alphas_cumprod = DDPMScheduler(**config).alphas_cumprod
        v_prediction = scheduler_config.get("prediction_type") == "v_prediction"
        wrapper = external.DiscreteVDDPMDenoiser if v_prediction else external.DiscreteEpsDDPMDenoiser
        self.model = wrapper(predict, alphas_cumprod, quantize=False)
        self.cfg_scale, self.guided = cfg_scale, guided
        self.init = init if init is not None and init.blends else None
        self.last_uncond: torch.Tensor | None = None

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor, cfg_scale: float | None = None) -> torch.Tensor:
        if not self.guided:
            self.last_uncond = self.model(x, sigma)
            return self._kept(self.last_uncond, sigma)
        uncond, cond = self.model(torch.cat([x, x]), torch.cat([sigma, sigma])).chunk(2)
        self.last_uncond = uncond
        return self._kept(uncond + (self.cfg_scale if cfg_scale is None else cfg_scale) * (cond - uncond), sigma)

    def _kept(self, denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        return denoised if self.init is None else self.init.kept(denoised, self.init.latents, sigma=sigma[0])


class _Stopped(Exception):
    def __init__(self, latents: torch.Tensor):
        self.latents = latents


def seeded_noise(x: torch.Tensor, generators: list[torch.Generator]) -> Callable[..., torch.Tensor]:
    """A k-diffusion noise sampler drawing each image's noise from its own CPU generator."""
    shape = (1, *x.shape[1:])
    return lambda sigma, sigma_next: torch.cat([torch.randn(shape, generator=g) for g in generators]).to(x)


class CpuBrownianNoise:
    """A Brownian-tree noise sampler built and sampled on the CPU, its noise moved to the latents' device and dtype:
    A1111's randn_source CPU for SDE samplers, so that a seed draws the same picture on any device (a tree on the
    GPU draws from the GPU's generator). ``make(x_on_cpu)`` builds the tree (k-diffusion's or diffusers').

    Given the schedule (``sigmas``, on the latents' device), a call for two neighbouring sigmas of it (DPM++ 2M/3M
    SDE …) is known without reading the GPU, and the next step's noise is drawn on a worker thread while the GPU
    works: else each step waited for the GPU, then the GPU waited for the CPU's tree (+30 % an image on an H100).
    The tree is queried in the same order either way, so the noise is the same."""

    def __init__(self, make: Callable[[torch.Tensor], Callable[..., torch.Tensor]], x: torch.Tensor,
                 sigmas: torch.Tensor | None = None):
        self.tree = make(x.detach().to("cpu", torch.float32))
        self.device, self.dtype = x.device, x.dtype
        self.sigmas = sigmas
        self.cpu_sigmas = None if sigmas is None else sigmas.detach().to("cpu", torch.float32)
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="brownian-noise")
        weakref.finalize(self, self.worker.shutdown, wait=False)
        self.ahead: tuple[int, Future] | None = None  # the step whose noise the worker draws

    def __call__(self, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
        step = self._step_of(sigma)
        if step is None or self._step_of(sigma_next) != step + 1:
            self._settle()
            noise = self.tree(torch.as_tensor(sigma).cpu().float(), torch.as_tensor(sigma_next).cpu().float())
            return noise.to(self.device, self.dtype)
        ahead, self.ahead = self.ahead, None
        drawn = ahead[1].result() if ahead is not None else None  # the worker is done with the tree, too
        noise = drawn if ahead is not None and ahead[0] == step else self._draw(step)
        if step + 2 < len(self.cpu_sigmas) and self.cpu_sigmas[step + 2] > 0:
            self.ahead = (step + 1, self.worker.submit(self._draw, step + 1))
        return noise.to(self.device, self.dtype, non_blocking=True)

    def _step_of(self, sigma: torch.Tensor) -> int | None:
        """i where ``sigma`` is the schedule's ``sigmas[i]`` (a view of it), found without reading its value."""
        schedule = self.sigmas
        if schedule is None or not isinstance(sigma, torch.Tensor) or sigma.dim() != 0 \
                or sigma.device != schedule.device \
                or sigma.untyped_storage().data_ptr() != schedule.untyped_storage().data_ptr():
            return None
        step, rest = divmod(sigma.storage_offset() - schedule.storage_offset(), schedule.stride(0))
        return step if rest == 0 and 0 <= step < len(schedule) else None

    def _draw(self, step: int) -> torch.Tensor:
        noise = self.tree(self.cpu_sigmas[step], self.cpu_sigmas[step + 1])
        return noise.pin_memory() if self.device.type == "cuda" else noise  # copied without waiting for the GPU

    def _settle(self) -> None:
        """Let the worker finish before the tree is used here (it is not thread-safe)."""
        if self.ahead is not None:
            self.ahead[1].result()


def sample(ksampler: KSampler, denoiser: GuidedDenoiser, sigmas_for: Callable[[external.DiscreteSchedule], torch.Tensor],
           noise: torch.Tensor, seeds: list[int], generators: list[torch.Generator], eta: float | None,
           on_step: StepCallback, start: int = 0, init: InitLatents | None = None) -> torch.Tensor:
    """Latents denoised from ``noise`` (one row per seed and generator) over ``sigmas_for(model schedule)``; with
    ``init`` (img2img), from its latents plus the noise at the schedule's sigma ``start`` on, as A1111 does.

    ``on_step(i, total, denoised)`` returning True stops early with the latest denoised prediction."""
    schedule = sigmas_for(denoiser.model).to(noise.device)  # schedules are computed on the CPU
    sigmas = schedule[start:]
    denoiser.model.to(noise.device)
    img2img = init is not None and init.from_image
    x = init.latents + init.start_noise(noise.float()) * sigmas[0] if img2img else noise.float() * sigmas[0]
    params = inspect.signature(ksampler.function).parameters
    kwargs: dict = {"eta": eta} if ksampler.takes_eta else {}
    if "noise_sampler" in params:  # the tree spans the whole schedule (A1111's, img2img's too)
        low, high = schedule[schedule > 0].min().cpu(), schedule.max().cpu()
        kwargs["noise_sampler"] = CpuBrownianNoise(
            lambda cpu_x: sampling.BrownianTreeNoiseSampler(cpu_x, low, high, seed=seeds), x, sigmas) \
            if ksampler.brownian else seeded_noise(x, generators)
    if "sigma_min" in params:  # DPM fast and adaptive pick their own steps within the model's sigmas, as in A1111
        if not img2img:
            kwargs.update(sigma_min=denoiser.model.sigma_min.item(), sigma_max=denoiser.model.sigma_max.item())
        else:  # img2img: within the part of the schedule that runs (its last sigma, 0, they cannot take; with one
            # step, down to the model's smallest, where A1111 fails on an empty interval)
            low = sigmas[-2] if len(sigmas) > 2 else denoiser.model.sigma_min
            if not sigmas[0] > low * 1.001:  # the same level (to float precision): an empty interval
                raise UserError("DPM fast and DPM adaptive take their own steps between two noise levels, and this "
                                "strength leaves them only the lowest one: raise the denoising strength or the steps",
                                field="denoising_strength")
            kwargs.update(sigma_min=low.item(), sigma_max=sigmas[0].item())
        if "n" in params:
            kwargs["n"] = len(sigmas) - 1
    else:
        kwargs["sigmas"] = sigmas
    total = len(sigmas) - 1

    def callback(info: dict) -> None:
        if on_step(min(info["i"], total - 1), total, info["denoised"]):
            raise _Stopped(info["denoised"])

    try:
        return ksampler.function(denoiser, x, callback=callback, disable=True, **kwargs)
    except _Stopped as stop:
        return stop.latents
