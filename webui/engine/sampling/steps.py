"""Which steps of a schedule a generation runs: all of them (txt2img), or the last ones from the noise level the
denoising strength starts at (img2img), counted as A1111 counts them."""
from __future__ import annotations

from dataclasses import dataclass

import torch

MAX_STRENGTH = 0.999  # A1111 caps the strength so that a schedule's first, pure-noise step is never where it starts


@dataclass(frozen=True)
class DenoiseSteps:
    """A schedule of ``total`` steps of which the last ``run`` run (``start`` is the first one's index)."""

    total: int
    run: int

    @property
    def start(self) -> int:
        return self.total - self.run

    @classmethod
    def img2img(cls, steps: int, strength: float, fix_steps: bool) -> DenoiseSteps:
        """A1111's count (``setup_img2img_steps``): int(strength x steps) + 1 of a ``steps`` schedule, or with the
        option img2img_fix_steps exactly ``steps`` of a longer schedule (steps / strength). Strength 0 runs none:
        the init image comes back through the VAE alone."""
        if strength <= 0:
            return cls(steps, 0)
        strength = min(strength, MAX_STRENGTH)
        if fix_steps:
            return cls(int(steps / strength), steps)
        return cls(steps, min(int(strength * steps) + 1, steps))


def noised_to(scheduler, init: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """img2img's start: ``init`` at the noise level of the schedule's step ``index`` by the scheduler's own call
    (FlowMatch's ``scale_noise``; ``add_noise`` of the UNet schedulers and the flow solvers), which begins there."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(index)
    t = scheduler.timesteps[index:index + 1].repeat(len(init))
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(init, t, noise)
    return scheduler.add_noise(init, noise, t)
