"""Schedule types as sigma lists: n steps in, n + 1 falling noise levels out (A1111's sd_schedulers).

Each function takes the step count and the model's discrete noise schedule (k-diffusion's
``DiscreteSchedule``: its 1000 training sigmas, ``sigma_to_t`` and ``t_to_sigma`` by log-sigma
interpolation) and whether the model is SDXL (Align Your Steps has a list for each). These feed the
sigma-space samplers; where diffusers can express a schedule type natively, ``samplers`` lets its
scheduler compute the same list.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from scipy import stats

from webui.engine.sampling.kdiffusion import external, sampling

SigmaFunction = Callable[[int, external.DiscreteSchedule, bool], torch.Tensor]

# Align Your Steps (Sabour et al. 2024): NVIDIA's optimised 10-step lists, as A1111 ships them.
AYS_SD1 = (14.615, 6.475, 3.861, 2.697, 1.886, 1.396, 0.963, 0.652, 0.399, 0.152, 0.029)
AYS_SDXL = (14.615, 6.315, 3.771, 2.181, 1.342, 0.862, 0.555, 0.380, 0.234, 0.113, 0.029)
BETA_ALPHA = BETA_BETA = 0.6  # A1111's beta_dist_alpha / beta_dist_beta defaults ("Beta Sampling is All You Need")


def _with_zero(sigmas) -> torch.Tensor:
    return torch.cat([torch.as_tensor(sigmas, dtype=torch.float32).flatten(), torch.zeros(1)])


def uniform(n: int, model: external.DiscreteSchedule, sdxl: bool) -> torch.Tensor:
    """Timesteps evenly spaced from the last training step to the first (A1111's Uniform and Normal)."""
    return model.get_sigmas(n).float()


def sgm_uniform(n: int, model: external.DiscreteSchedule, sdxl: bool) -> torch.Tensor:
    """n + 1 evenly spaced timesteps without the last one: never reaches the smallest sigma (SGM's sampling)."""
    t = torch.linspace(model.sigma_to_t(model.sigma_max), model.sigma_to_t(model.sigma_min), n + 1)[:-1]
    return _with_zero(model.t_to_sigma(t))


def karras(n: int, model: external.DiscreteSchedule, sdxl: bool) -> torch.Tensor:
    return sampling.get_sigmas_karras(n, model.sigma_min.item(), model.sigma_max.item(), rho=7.0).float()


def exponential(n: int, model: external.DiscreteSchedule, sdxl: bool) -> torch.Tensor:
    return sampling.get_sigmas_exponential(n, model.sigma_min.item(), model.sigma_max.item()).float()


def polyexponential(n: int, model: external.DiscreteSchedule, sdxl: bool) -> torch.Tensor:
    return sampling.get_sigmas_polyexponential(n, model.sigma_min.item(), model.sigma_max.item(), rho=1.0).float()


def kl_optimal(n: int, model: external.DiscreteSchedule, sdxl: bool) -> torch.Tensor:
    """Evenly spaced in arctan(sigma) (Sabour et al. 2024, "KL optimal"); ends at the smallest sigma, not 0."""
    step = torch.arange(n + 1) / n
    return torch.tan(step * model.sigma_min.atan() + (1 - step) * model.sigma_max.atan()).float()


def align_your_steps(n: int, model: external.DiscreteSchedule, sdxl: bool) -> torch.Tensor:
    """NVIDIA's list for the family, log-linearly resampled to n sigmas where n is not its length."""
    listed = np.array(AYS_SDXL if sdxl else AYS_SD1)
    if n == len(listed):
        return _with_zero(listed)
    log_sigmas = np.interp(np.linspace(0, 1, n), np.linspace(0, 1, len(listed)), np.log(listed[::-1]))
    return _with_zero(np.exp(log_sigmas)[::-1].copy())


def simple(n: int, model: external.DiscreteSchedule, sdxl: bool) -> torch.Tensor:
    """Every (1000 / n)th training sigma from the top (ComfyUI's and Forge's Simple)."""
    stride = len(model.sigmas) / n
    return _with_zero(torch.stack([model.sigmas[-(1 + int(i * stride))] for i in range(n)]))


def ddim(n: int, model: external.DiscreteSchedule, sdxl: bool) -> torch.Tensor:
    """DDIM's timesteps 1, 1 + 1000 // n, … (one more step than n where 1000 / n is not whole, as A1111)."""
    stride = max(len(model.sigmas) // n, 1)
    return _with_zero(model.sigmas[1::stride].flip(0))


def beta(n: int, model: external.DiscreteSchedule, sdxl: bool) -> torch.Tensor:
    """Sigmas at the quantiles of a Beta(0.6, 0.6) distribution: more steps at both ends (Lee et al. 2024)."""
    quantiles = stats.beta.ppf(1 - np.linspace(0, 1, n), BETA_ALPHA, BETA_BETA)
    low, high = model.sigma_min.item(), model.sigma_max.item()
    return _with_zero(low + quantiles * (high - low))
