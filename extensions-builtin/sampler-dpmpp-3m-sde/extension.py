"""The DPM++ 3M SDE sampler (A1111's), as an example of adding a sampler from an extension.

Third-order multistep DPM-Solver++ with SDE noise: diffusers' DPMSolverMultistepScheduler with
``algorithm_type="sde-dpmsolver++"`` and ``solver_order=3``. "Automatic" means the Exponential
schedule, as in A1111. Its noise comes from the generation's seeded CPU generators, so a seed gives
the same image every time.
"""
from __future__ import annotations

import functools

from diffusers import DPMSolverMultistepScheduler


def setup(api) -> None:
    factory = functools.partial(DPMSolverMultistepScheduler, algorithm_type="sde-dpmsolver++", solver_order=3)
    api.add_sampler("DPM++ 3M SDE", factory, aliases=["k_dpmpp_3m_sde"], default_schedule="exponential")
