"""Which steps of a schedule a generation runs: all of them (txt2img), or the last ones from the noise level the
denoising strength starts at (img2img), counted as A1111 counts them; and where img2img and inpainting start from
(``InitLatents``)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from webui.engine.soft_inpaint import SoftInpainting

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


@dataclass(frozen=True)
class InitLatents:
    """Where img2img starts: its init latents. Inpainting adds where the picture is repainted: a model that is not
    an inpainting model has the rest put back after each step, at the step's noise level (as diffusers' Inpaint
    pipelines do; the sigma-space loop puts it back into each prediction, as A1111 does); an inpainting model is
    given the mask and the masked picture's latents as extra input channels instead, and sees for itself."""

    latents: torch.Tensor | None  # (B, C, h, w) float32; None: txt2img with an inpainting model (``extra`` alone)
    repaint: torch.Tensor | None = None  # (1 or B, 1, h, w): 1 where repainted, 0 where kept; None: everywhere
    extra: torch.Tensor | None = None  # an inpainting model's extra input: (B, 1 + C, h, w), mask then latents
    noise_multiplier: float = 1.0  # A1111's initial_noise_multiplier: the starting noise times this
    soft: SoftInpainting | None = None  # A1111's soft inpainting: the kept part blended by noise level

    @property
    def blends(self) -> bool:
        """Whether the kept part is put back during denoising (inpainting with a model that is not for it)."""
        return self.repaint is not None and self.extra is None

    @property
    def from_image(self) -> bool:
        """Whether denoising starts from these latents (img2img), not from noise alone."""
        return self.latents is not None

    def start_noise(self, noise: torch.Tensor) -> torch.Tensor:
        """The noise the init latents start from (A1111 scales only that, not the noise of later steps)."""
        return noise if self.noise_multiplier == 1 else noise * self.noise_multiplier

    def kept(self, latents: torch.Tensor, original: torch.Tensor, repaint: torch.Tensor | None = None,
             sigma: float | None = None) -> torch.Tensor:
        """``latents`` where repainted, ``original`` where kept (``repaint``: the mask in the loop's layout); with
        soft inpainting and the noise level ``sigma`` of a step, its blend."""
        mask = self.repaint if repaint is None else repaint
        if self.soft is not None and sigma is not None:
            return self.soft.blend(original, latents, mask, sigma)
        return (1 - mask) * original + mask * latents

    def extra_rows(self, rows: int) -> torch.Tensor:
        """The extra input channels for ``rows`` rows of latents (twice the batch with CFG), in the model's dtype
        by the caller."""
        return torch.cat([self.extra] * (rows // len(self.extra)))


def noised_to(scheduler, init: torch.Tensor, noise: torch.Tensor, index: int) -> torch.Tensor:
    """img2img's start: ``init`` at the noise level of the schedule's step ``index`` by the scheduler's own call,
    which begins there."""
    if hasattr(scheduler, "set_begin_index"):
        scheduler.set_begin_index(index)
    return noise_at(scheduler, init, noise, scheduler.timesteps[index:index + 1].repeat(len(init)))


def noise_at(scheduler, init: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """``init`` noised to timestep ``t`` by the scheduler's own call (FlowMatch's ``scale_noise``; ``add_noise`` of
    the UNet schedulers and the flow solvers)."""
    if hasattr(scheduler, "scale_noise"):
        return scheduler.scale_noise(init, t, noise)
    return scheduler.add_noise(init, noise, t)
