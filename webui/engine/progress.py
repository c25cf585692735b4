"""Progress of the running job, shared by the sampling loop (writer) and the UI/API (readers).

The loop only stores a reference to the current latents; a preview image is made from them
only when somebody asks, so watching costs the generation nothing.
"""
from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from webui.engine.detect import Family

# Linear maps from the 4 latent channels to RGB, a cheap preview of what the VAE would decode.
LATENT_RGB = {
    Family.SDXL: ([[0.3651, 0.4232, 0.4341], [-0.2533, -0.0042, 0.1068],
                   [0.1076, 0.1111, -0.0362], [-0.3165, -0.2492, -0.2188]], [0.1084, -0.0175, -0.0011]),
    Family.SD1: ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                  [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0]),
}


def latent_preview(latents: torch.Tensor, family: Family) -> Image.Image:
    """The first image of a latent batch as an approximate RGB picture (8x smaller than the output)."""
    x = latents[0].detach().float().cpu()
    if x.shape[0] == 4:
        factors, bias = LATENT_RGB.get(family, LATENT_RGB[Family.SD1])
        rgb = torch.einsum("chw,cr->hwr", x, torch.tensor(factors)) + torch.tensor(bias)
    else:  # 16-channel latents (Flux, SD3.x): the mean over channels, stretched, shows the composition
        gray = x.mean(0)
        gray = (gray - gray.min()) / (gray.max() - gray.min()).clamp_min(1e-6) * 2 - 1
        rgb = gray[..., None].expand(-1, -1, 3)
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


@dataclass
class Progress:
    """A1111's ``shared.state``: what the current job is doing, and the user's interrupt/skip."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    textinfo: str = ""
    started_at: float = 0.0
    interrupted: bool = False
    skipped: bool = False
    cell_no: int = 0  # the X/Y/Z plot cells done, and how many it has (0: no plot running)
    cell_count: int = 0
    preview_every: int = 1  # keep the latents for a preview every this many steps ("Live preview display period")
    _latents: torch.Tensor | None = None
    _family: Family = Family.SD1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        """A new job starts (before its model loads): Interrupt and Skip from now on are for it. Within an X/Y/Z
        plot the plot is the job: an Interrupt between two cells still stops it."""
        self.skipped = False
        if not self.cell_count:
            self.interrupted = False

    def begin_plot(self, cells: int) -> None:
        self.cell_no, self.cell_count, self.interrupted = 0, cells, False

    def next_cell(self) -> None:
        self.cell_no += 1

    def end_plot(self) -> None:
        self.cell_no = self.cell_count = 0

    def begin(self, job: str, job_count: int, steps: int) -> None:
        with self._lock:
            self.job, self.job_count, self.job_no = job, job_count, 0
            self.sampling_step, self.sampling_steps = 0, steps
            self.started_at = time.time()
            self._latents, self.textinfo = None, ""

    def end(self) -> None:
        with self._lock:
            self.job, self._latents = "", None

    def step(self, step: int, latents: torch.Tensor, family: Family) -> None:
        self.sampling_step, self._family = step, family
        if step % max(self.preview_every, 1) == 0:
            self._latents = latents

    def next_batch(self, job_no: int) -> None:
        self.job_no, self.sampling_step, self.skipped = job_no, 0, False

    def interrupt(self) -> None:
        self.interrupted = True

    def skip(self) -> None:
        self.skipped = True

    @property
    def active(self) -> bool:
        return bool(self.job)

    @property
    def fraction(self) -> float:
        """Done fraction over the whole job (all batches)."""
        if not self.job or not self.sampling_steps or not self.job_count:
            return 0.0
        done = (self.job_no + min(self.sampling_step / self.sampling_steps, 1.0)) / self.job_count
        if self.cell_count:  # an X/Y/Z plot: over all of its cells
            done = (self.cell_no + done) / self.cell_count
        return min(done, 1.0)

    @property
    def eta_seconds(self) -> float:
        fraction = self.fraction
        if fraction <= 0:
            return 0.0
        elapsed = time.time() - self.started_at
        return elapsed / fraction - elapsed

    def preview(self) -> Image.Image | None:
        latents, family = self._latents, self._family
        return None if latents is None else latent_preview(latents, family)
