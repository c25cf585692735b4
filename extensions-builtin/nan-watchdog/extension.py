"""NaN watchdog: names the denoising step at which the latents stopped being finite numbers.

A black or noise-only image usually means the latents overflowed somewhere (fp16 weights, a LoRA
at too high a weight, an extension). This checks the latents after every denoising step and logs,
once per generation, the first step that produced NaN or infinity, so the cause can be narrowed
down. It only reads the latents; images are unchanged.

The check must not make the host wait for the GPU at every step (reading a device value does, and
the loop would lose its lead over the GPU): the first bad step is kept on the latents' device and
read once, at a batch's last step (the engine reads the latents then anyway), or when the next
generation begins for one that was interrupted.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self) -> None:
        self.first_bad: torch.Tensor | None = None  # the current batch's first bad step (1-based; 0: none yet)
        self.total = 0
        self.reported = False  # once per generation

    def reset(self, **_) -> None:
        self._report()
        self.reported = False

    def check(self, step: int, total: int, latents: torch.Tensor, **_) -> None:
        if self.first_bad is None:
            self.first_bad = torch.zeros((), dtype=torch.int32, device=latents.device)
        bad = ~torch.isfinite(latents).all()
        self.first_bad = torch.where((self.first_bad == 0) & bad, step + 1, self.first_bad)
        self.total = total
        if step + 1 == total:
            self._report()

    def _report(self) -> None:
        """Read the batch's first bad step (the only read of the device) and log it, once per generation."""
        first_bad, self.first_bad = self.first_bad, None
        if first_bad is None or self.reported or not (step := int(first_bad)):
            return
        self.reported = True
        log.warning("NaN watchdog: the latents became NaN/inf at denoising step %d of %d; the image will be "
                    "black or noise. Try --no-half, another sampler, or without the last LoRA/extension.",
                    step, self.total)


def setup(api) -> None:
    watchdog = Watchdog()
    api.on("before_generation", watchdog.reset)
    api.on("denoising_step", watchdog.check)
