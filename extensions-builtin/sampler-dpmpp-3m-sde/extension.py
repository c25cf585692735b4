"""The DPM++ 3M SDE sampler (A1111's), as an example of adding a sampler from an extension.

Third-order multistep DPM-Solver++ with SDE noise, two ways: diffusers' DPMSolverMultistepScheduler with
``algorithm_type="sde-dpmsolver++"`` and ``solver_order=3`` where diffusers has the schedule type, else
k-diffusion's ``sample_dpmpp_3m_sde`` in sigma space (every schedule type, any eta), its noise from a
Brownian tree per image seeded with the image's seed, one step more with the next-to-last sigma dropped,
as A1111 runs it. "Automatic" means the Exponential schedule, as in A1111.
"""
from __future__ import annotations

import functools

from diffusers import DPMSolverMultistepScheduler

from webui.engine.sampling.kdiffusion import sampling
from webui.engine.sampling.ksampling import KSampler


def setup(api) -> None:
    factory = functools.partial(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", solver_order=3)
    ksampler = KSampler(sampling.sample_dpmpp_3m_sde, brownian=True, discard_penultimate=True)
    api.add_sampler("DPM++ 3M SDE", factory, aliases=["k_dpmpp_3m_sde"], default_schedule="exponential",
                    ksampler=ksampler)
