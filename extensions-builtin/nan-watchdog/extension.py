"""NaN watchdog: names the denoising step at which the latents stopped being finite numbers.

A black or noise-only image usually means the latents overflowed somewhere (fp16 weights, a LoRA
at too high a weight, an extension). This checks the latents after every denoising step and logs,
once per generation, the first step that produced NaN or infinity, so the cause can be narrowed
down. It only reads the latents; images are unchanged.
"""
from __future__ import annotations

import logging

import torch

log = logging.getLogger(__name__)


class Watchdog:
    def __init__(self) -> None:
        self.first_bad_step: int | None = None  # 1-based, of the current generation

    def reset(self, **_) -> None:
        self.first_bad_step = None

    def check(self, step: int, total: int, latents: torch.Tensor, **_) -> None:
        if self.first_bad_step is None and not torch.isfinite(latents).all():
            self.first_bad_step = step + 1
            log.warning("NaN watchdog: the latents became NaN/inf at denoising step %d of %d; the image will be "
                        "black or noise. Try --no-half, another sampler, or without the last LoRA/extension.",
                        step + 1, total)


def setup(api) -> None:
    watchdog = Watchdog()
    api.on("before_generation", watchdog.reset)
    api.on("denoising_step", watchdog.check)
