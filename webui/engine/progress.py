"""Progress of the running job, shared by the sampling loop (writer) and the UI/API (readers).

The loop only stores a reference to the current latents; a preview image is made from them
only when somebody asks, so watching costs the generation nothing.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import torch
from PIL import Image

from webui.engine.families.protocol import LatentRgb
from webui.engine.families.registry import Families
from webui.engine.formats.detect import Family

def latent_preview(latents: torch.Tensor, latent_rgb: LatentRgb | None) -> Image.Image:
    """The first image of a latent batch as an approximate RGB picture (8x smaller than the output), through the
    family's linear latent → RGB map, a cheap preview of what the VAE would decode."""
    x = latents[0].detach().float().cpu()
    if latent_rgb is not None and x.shape[0] == 4:
        factors, bias = latent_rgb
        rgb = torch.einsum("chw,cr->hwr", x, torch.tensor(factors)) + torch.tensor(bias)
    else:  # 16-channel latents (Flux, SD3.x): the mean over channels, stretched, shows the composition
        gray = x.mean(0)
        gray = (gray - gray.min()) / (gray.max() - gray.min()).clamp_min(1e-6) * 2 - 1
        rgb = gray[..., None].expand(-1, -1, 3)
    array = ((rgb.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).numpy()
    return Image.fromarray(np.ascontiguousarray(array))


@dataclass
class Progress:
    """A1111's ``shared.state``: what the current job is doing, and the user's interrupt/skip.

    The ETA comes from the rate measured between the job's first step and its latest (over all cells of an X/Y/Z
    plot): what comes before the first step (loading the model, encoding the prompt) is not step time, and a plot's
    estimate does not start over at each cell."""

    job: str = ""
    job_count: int = 0
    job_no: int = 0
    sampling_step: int = 0
    sampling_steps: int = 0
    textinfo: str = ""
    interrupted: bool = False
    skipped: bool = False
    cell_no: int = 0  # the X/Y/Z plot cells done, and how many it has (0: no plot running)
    cell_count: int = 0
    preview_every: int = 1  # keep the latents for a preview every this many steps ("Live preview display period")
    clock: Callable[[], float] = field(default=time.monotonic, repr=False)  # tests give a fake one
    _first: tuple[float, float] | None = None  # (time, fraction) at the first step of the job or plot
    _last: tuple[float, float] | None = None  # (time, fraction) at its latest step
    _latents: torch.Tensor | None = None
    families: Families = field(default_factory=Families, repr=False)  # the engine's registry: preview colours
    _family: Family = Family.SD1
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def reset(self) -> None:
        """A new job starts (before its model loads): Interrupt and Skip from now on are for it. Within an X/Y/Z
        plot the plot is the job: an Interrupt between two cells still stops it."""
        self.skipped = False
        if not self.cell_count:
            self.interrupted = False

    def begin_plot(self, cells: int) -> None:
        """A plot starts: its cells' steps are measured together, for one ETA over the whole plot."""
        with self._lock:
            self.cell_no, self.cell_count, self.interrupted = 0, cells, False
            self._first = self._last = None

    def next_cell(self) -> None:
        self.cell_no += 1

    def end_plot(self) -> None:
        with self._lock:
            self.cell_no = self.cell_count = 0
            self._idle()

    def begin(self, job: str, job_count: int, steps: int) -> None:
        """The model is loaded, sampling starts (a plot's cell: its next generation)."""
        with self._lock:
            self.job, self.job_count, self.job_no = job, job_count, 0
            self.sampling_step, self.sampling_steps = 0, steps
            self._latents, self.textinfo = None, ""
            if not self.cell_count:
                self._first = self._last = None

    def end(self) -> None:
        """The generation is over; unless a plot goes on, nothing runs any more."""
        with self._lock:
            self.job, self._latents = "", None
            if not self.cell_count:
                self._idle()

    def _idle(self) -> None:
        """No job counted, as A1111's ``state.end()`` leaves it: API clients wait for ``job_count`` 0 (webuiapi's
        ``util_wait_for_ready``)."""
        self.job_count = self.job_no = self.sampling_step = 0
        self._first = self._last = None

    def step(self, step: int, latents: torch.Tensor, family: Family) -> None:
        self.sampling_step, self._family = step, family
        if step % max(self.preview_every, 1) == 0:
            self._latents = latents
        self._last = (self.clock(), self.fraction)
        if self._first is None:
            self._first = self._last

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
        """Done fraction over the whole job (all batches; an X/Y/Z plot: all of its cells)."""
        done = 0.0
        if self.job and self.sampling_steps and self.job_count:
            done = (self.job_no + min(self.sampling_step / self.sampling_steps, 1.0)) / self.job_count
        if self.cell_count:
            done = (self.cell_no + done) / self.cell_count
        return min(done, 1.0)

    @property
    def measured(self) -> bool:
        """Whether the job (plot) has a step rate yet: from its second step on."""
        return self._rate() is not None

    @property
    def eta_seconds(self) -> float:
        """Seconds left at the measured rate, counted down since the latest step; 0 until ``measured``."""
        rate = self._rate()
        if rate is None:
            return 0.0
        (at, done), seconds_per_fraction = rate
        return max((1.0 - done) * seconds_per_fraction - (self.clock() - at), 0.0)

    def _rate(self) -> tuple[tuple[float, float], float] | None:
        """The latest step's (time, fraction) and the seconds per whole job since the first step."""
        first, last = self._first, self._last  # read once: the sampling thread replaces them
        if first is None or last is None or last[1] <= first[1]:
            return None
        return last, (last[0] - first[0]) / (last[1] - first[1])

    def preview(self) -> Image.Image | None:
        latents, family = self._latents, self._family
        return None if latents is None else latent_preview(latents, self.families[family].latent_rgb)
