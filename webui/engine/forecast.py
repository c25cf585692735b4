"""Will it fit? A job's peak VRAM, peak host RAM and time on this machine, forecast before it runs (issue 24).

VRAM comes from the memory manager's own plan of the job's phases (``memory.planning``: the same ``prepare`` calls
generation makes, on a copy that moves nothing) and each phase's activation estimate (``generate.PhaseEstimates``).
Host RAM is what the job adds to what is in use now: its images, one batch's pixels on their way to PNG, and on the
CPU its activations. Time comes from ``Rates``, measured on this machine at the model's last generation; there is
none before the first.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from webui.engine.generate import IMAGE_ENCODE_PHASE, PhaseEstimates, Resolved, encoded_already, prepare_encoders
from webui.engine.loading.load import LoadedModel
from webui.engine.memory import MB
from webui.engine.memory.manager import MemoryManager, MemoryPolicy
from webui.engine.memory.planning import PhasePlan, PlanningManager
from webui.engine.request import GenerationResult
from webui.errors import UserError

GB = 1024 * MB
PIXEL_BYTES = 3  # an RGB image, one byte a channel
HOST_BYTES_PER_BATCH_PIXEL = PIXEL_BYTES * (4 + 1 + 1)  # a batch's float32 pixels, its uint8 arrays, its PNG bytes
MIN_MOVE_SECONDS = 0.05  # copies shorter than this measure latency, not bandwidth
# the plan's phases by the names the job's timings give them
TIMING_NAMES = {"text encoding": "encode", "image encoding": "encode image", "denoising": "denoise",
                "hires upscale": "hires upscale", "hires denoising": "hires denoise", "decode": "decode"}


@dataclass(frozen=True)
class JobShape:
    """What the time of a job scales with."""

    steps: int  # denoising steps that run (img2img: the strength's part of the schedule)
    batches: int
    batch_size: int
    rows: int  # denoiser rows a call: the batch, twice with CFG
    latent_pixels: int  # of one image
    pixels: int  # of one image as it is decoded (hires. fix: at the hires size)
    encodes: bool  # whether its prompts are encoded (not those of the last job)
    init_pixels: int = 0  # img2img: pixels of the init images the VAE encodes (once for all batches)
    hires_steps: int = 0  # hires. fix: the second pass's steps, each over hires_latent_pixels
    hires_latent_pixels: int = 0
    upscaler: str | None = None  # hires. fix with an image upscaler: its name (its time is learnt per upscaler)

    @classmethod
    def of(cls, model: LoadedModel, job: Resolved) -> JobShape:
        req = job.request
        factor = model.vae_scale_factor
        final = job.hires.job.request if job.hires is not None else req
        return cls(job.steps.run, req.n_iter, req.batch_size, req.batch_size * (2 if job.cfg else 1),
                   (req.width // factor) * (req.height // factor), final.width * final.height,
                   not encoded_already(model, job),
                   sum(image.width * image.height for image in job.init_images or ()),
                   job.hires.job.steps.run if job.hires is not None else 0,
                   (final.width // factor) * (final.height // factor) if job.hires is not None else 0,
                   job.hires.upscaler if job.hires is not None and not job.hires.latent else None)


@dataclass
class Rates:
    """What this machine was measured doing with a model at its last generations: the time forecasts' base."""

    step_seconds_per_pixel: float | None = None  # the denoiser's compute, a step, per latent pixel of a row
    encode_seconds_per_prompt: float | None = None
    decode_seconds_per_pixel: float | None = None
    image_encode_seconds_per_pixel: float | None = None  # img2img's VAE encode; known after the first img2img
    bandwidth: float | None = None  # host → device bytes a second, as the copies were measured
    # hires. fix's image upscale (the first pass decoded, upscaled, encoded again), per upscaler, per output pixel
    upscale_seconds_per_pixel: dict[str, float] = field(default_factory=dict)

    def known(self, shape: JobShape) -> bool:
        """Whether every rate ``shape``'s phases need was measured."""
        needed = (self.step_seconds_per_pixel, self.encode_seconds_per_prompt, self.decode_seconds_per_pixel,
                  *((self.image_encode_seconds_per_pixel,) if shape.init_pixels else ()),
                  *((self.upscale_seconds_per_pixel.get(shape.upscaler),) if shape.upscaler else ()))
        return None not in needed

    def learn(self, forecast: Forecast, result: GenerationResult) -> None:
        """Take the rates a finished job shows: each phase's time less what its moves cost (the plan says how many
        bytes each moved), and, where the denoiser streamed, less the copies the step waited for (all of them
        without Async; with it, those a step's compute did not hide)."""
        stats, shape, timings = result.memory, forecast.shape, result.timings
        if stats is None or not {"encode", "denoise", "decode"} <= timings.keys():
            return
        copying = stats.move_seconds - stats.page_lock_seconds  # page-locking is once a component, not a rate
        if copying > MIN_MOVE_SECONDS:
            self.bandwidth = stats.moved_mb * MB / copying
        moves = {phase: moved / self.bandwidth if self.bandwidth else 0.0
                 for phase, moved in forecast.moved_by_phase().items()}
        if shape.encodes:
            self.encode_seconds_per_prompt = max(timings["encode"] - moves["text encoding"], 0.0) / shape.rows
        if shape.init_pixels and "encode image" in timings:
            self.image_encode_seconds_per_pixel = (max(timings["encode image"] - moves["image encoding"], 0.0)
                                                   / shape.init_pixels)
        if shape.steps:
            step = max(timings["denoise"] - moves["denoising"], 0.0) / (shape.steps * shape.batches)
            streaming = forecast.streamed_seconds_a_step(self.bandwidth)
            compute = step - streaming if not forecast.async_copies else step if streaming < step else None
            if compute is not None:
                self.step_seconds_per_pixel = compute / (shape.latent_pixels * shape.rows)
        self.decode_seconds_per_pixel = (max(timings["decode"] - moves["decode"], 0.0)
                                         / (shape.pixels * shape.batch_size * shape.batches))
        if shape.upscaler and "hires upscale" in timings:  # a new dict: a forecast made before keeps its rates
            upscale = max(timings["hires upscale"] - moves["hires upscale"], 0.0)
            self.upscale_seconds_per_pixel = {**self.upscale_seconds_per_pixel, shape.upscaler: upscale / (
                shape.pixels * shape.batch_size * shape.batches)}


@dataclass(frozen=True)
class Forecast:
    """A job's forecast: the plan of each phase (the first batch's, then a later one's), and what it adds up to."""

    shape: JobShape
    first: list[tuple[str, PhasePlan]]  # (phase name, plan) of the first batch
    later: list[tuple[str, PhasePlan]]  # of every later batch (empty with one batch)
    budgeted: bool  # False on the CPU: no device memory to keep within
    device_bytes: int  # the device's memory
    capacity: int  # what of it is ours to use (our weights now, and what is free)
    host_bytes: int  # host RAM the job adds at its peak
    host_available: int
    async_copies: bool
    tiled_decode: bool
    rates: Rates = field(default_factory=Rates)

    @property
    def peak_vram(self) -> int:
        return max(plan.peak for _, plan in self.first + self.later) if self.budgeted else 0

    @property
    def fits_vram(self) -> bool:
        return self.peak_vram <= self.capacity

    @property
    def fits_host(self) -> bool:
        return self.host_bytes <= self.host_available

    def moved_by_phase(self) -> dict[str, int]:
        """Bytes each phase moves over the whole job."""
        moved = {"image encoding": 0, "text encoding": 0, "denoising": 0, "hires upscale": 0, "hires denoising": 0,
                 "decode": 0}
        for phases, times in ((self.first, 1), (self.later, self.shape.batches - 1)):
            for name, plan in phases:
                moved[name] += plan.moved * times
        return moved

    def bus_bytes(self) -> int:
        """Bytes the job copies between host and device: its placements, and its streamed weights at every call
        (the denoiser's once a step: a sampler that calls it twice a step copies twice that)."""
        calls = {"image encoding": 1, "text encoding": 1, "denoising": self.shape.steps, "hires upscale": 1,
                 "hires denoising": self.shape.hires_steps, "decode": 1}
        return sum(self.moved_by_phase().values()) + sum(
            plan.streamed * calls[name] * times
            for phases, times in ((self.first, 1), (self.later, self.shape.batches - 1)) for name, plan in phases)

    def streamed_seconds_a_step(self, bandwidth: float | None, phase: str = "denoising") -> float:
        denoising = next(plan for name, plan in self.first if name == phase)
        return denoising.streamed / bandwidth if bandwidth else 0.0

    @property
    def seconds(self) -> float | None:
        """The job's time from the measured rates; None before the model's first generation on this machine."""
        phases = self.phase_seconds()
        return None if phases is None else sum(phases.values())

    def phase_seconds(self) -> dict[str, float] | None:
        """The job's time by phase, each with its moves, named as ``GenerationResult.timings`` names them."""
        rates, shape = self.rates, self.shape
        if not rates.known(shape):
            return None

        def step(latent_pixels: int, phase: str) -> float:
            compute = rates.step_seconds_per_pixel * latent_pixels * shape.rows
            streaming = self.streamed_seconds_a_step(rates.bandwidth, phase)
            return max(compute, streaming) if self.async_copies else compute + streaming

        compute = {
            "text encoding": rates.encode_seconds_per_prompt * shape.rows if shape.encodes else 0.0,
            "image encoding": rates.image_encode_seconds_per_pixel * shape.init_pixels if shape.init_pixels else 0.0,
            "denoising": shape.batches * shape.steps * step(shape.latent_pixels, "denoising"),
            "hires upscale": shape.batches * rates.upscale_seconds_per_pixel[shape.upscaler] * shape.pixels
            * shape.batch_size if shape.upscaler else 0.0,
            "hires denoising": shape.batches * shape.hires_steps * step(shape.hires_latent_pixels, "hires denoising")
            if shape.hires_steps else 0.0,
            "decode": shape.batches * rates.decode_seconds_per_pixel * shape.pixels * shape.batch_size,
        }
        moved = self.moved_by_phase()
        return {TIMING_NAMES[phase]: seconds + (moved[phase] / rates.bandwidth if rates.bandwidth else 0.0)
                for phase, seconds in compute.items() if seconds or moved[phase]}

    def check_host(self) -> None:
        """Refuse a job that cannot fit in host RAM at all, before it runs (the OOM killer would end the app)."""
        if not self.fits_host:
            shape = self.shape
            raise UserError(
                f"this job needs about {self.host_bytes / GB:.1f} GB of RAM ({shape.batches} x {shape.batch_size} "
                f"image(s) of {shape.pixels / 1e6:.1f} megapixels{'' if self.budgeted else ', computed on the CPU'}) "
                f"and {self.host_available / GB:.1f} GB are free. Lower the batch size, the batch count or the "
                "resolution, or close other programs.", field="batch_size")

    def summary(self) -> str:
        """One line for the UI: peak VRAM of the card, RAM, time."""
        parts = []
        if self.budgeted:
            verdict = "fits" if self.fits_vram else "may not fit"
            streams = any(plan.streamed for _, plan in self.first)
            parts.append(f"VRAM peak ~{self.peak_vram / GB:.1f} of {self.device_bytes / GB:.1f} GB ({verdict}"
                         f"{', streams weights' if streams else ''}{', tiled VAE' if self.tiled_decode else ''})")
        ram = "" if self.fits_host else " — too much: lower the batch or the size"
        parts.append(f"RAM +{self.host_bytes / GB:.1f} of {self.host_available / GB:.1f} GB free{ram}")
        seconds = self.seconds
        parts.append(f"~{seconds:.1f} s" if seconds is not None else "time: known after this model's first image")
        return " · ".join(parts)

    def as_dict(self) -> dict:
        """The API's answer: figures in MB and seconds."""
        def phases(named: list[tuple[str, PhasePlan]]) -> list[dict]:
            return [{"phase": name, "components": list(plan.components), "resident_mb": plan.resident / MB,
                     "streamed_mb": plan.streamed / MB, "activation_mb": plan.activation / MB,
                     "moved_mb": plan.moved / MB, "peak_mb": plan.peak / MB} for name, plan in named]

        return {
            "peak_vram_mb": self.peak_vram / MB if self.budgeted else None,
            "vram_mb": self.device_bytes / MB if self.budgeted else None,
            "fits_vram": self.fits_vram,
            "host_ram_mb": self.host_bytes / MB,
            "host_available_mb": self.host_available / MB,
            "fits_host_ram": self.fits_host,
            "seconds": self.seconds,
            "tiled_vae": self.tiled_decode,
            "first_batch": phases(self.first),
            "later_batches": phases(self.later),
            "rates": asdict(self.rates),
            "summary": self.summary(),
        }


def forecast_job(model: LoadedModel, memory: MemoryManager, policy: MemoryPolicy, job: Resolved,
                 rates: Rates | None = None) -> Forecast:
    """The forecast of ``job`` on ``model`` from where the weights are now; it moves nothing."""
    shape = JobShape.of(model, job)
    estimates = PhaseEstimates.of(model, job)
    planner = PlanningManager(memory, policy, estimates.denoise)
    batches, tiled = [], False
    for batch in range(min(shape.batches, 2)):
        named = []
        if batch == 0 and job.init_images is not None:  # encoded once for every batch
            planner.prepare_vae("vae", estimates.encode_image, phase=IMAGE_ENCODE_PHASE)
            named.append(("image encoding", planner.phases[-1]))
        if batch == 0 and shape.encodes:
            prepare_encoders(planner, estimates)
            named.append(("text encoding", planner.phases[-1]))
        planner.prepare(["denoiser"])
        named.append(("denoising", planner.phases[-1]))
        if job.hires is not None and not job.hires.latent:  # the first pass decoded, upscaled, encoded again
            planner.prepare_vae("vae", estimates.hires_decode)
            named.append(("hires upscale", planner.phases[-1]))
            planner.prepare_vae("vae", estimates.hires_encode, phase=IMAGE_ENCODE_PHASE)
            named.append(("hires upscale", planner.phases[-1]))
        if job.hires is not None:
            planner.prepare(["denoiser"], estimates.hires_denoise)
            named.append(("hires denoising", planner.phases[-1]))
        tiled = planner.prepare_vae("vae", estimates.decode)
        named.append(("decode", planner.phases[-1]))
        batches.append(named)
    kept = shape.batches * shape.batch_size * shape.pixels * PIXEL_BYTES
    transient = shape.batch_size * shape.pixels * HOST_BYTES_PER_BATCH_PIXEL
    activations = 0 if memory.limited else max(estimates.encode, estimates.denoise, estimates.decode.whole,
                                                estimates.encode_image.whole)
    return Forecast(shape, batches[0], batches[1] if len(batches) > 1 else [], memory.limited, memory.memory.total(),
                    memory.capacity(), kept + transient + activations, memory.memory.host_available(),
                    policy.async_copies, tiled, replace(rates) if rates else Rates())  # as they are now
