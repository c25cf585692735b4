"""A txt2img or img2img request, checked field by field before any work starts, and its result."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from webui.engine.init_image import LATENT_UPSCALE, RESIZE_MODES
from webui.engine.memory.manager import GenerationStats
from webui.engine.memory.trace import MemoryTimeline
from webui.errors import UserError

if TYPE_CHECKING:
    from webui.engine.forecast import Forecast

MAX_SEED = 2**32 - 1
MIN_SIDE, SIDE_MULTIPLE = 64, 8  # pixels; latents are 1/8 of the image
MAX_CFG = 100


@dataclass
class GenerationRequest:
    """The engine's one request type; the UI and the API both build it."""

    prompt: str = ""
    negative_prompt: str = ""
    width: int = 512
    height: int = 512
    steps: int = 20
    cfg_scale: float = 7.0
    distilled_cfg_scale: float = 3.5  # Flux dev's guidance input (Forge's "Distilled CFG Scale")
    sampler_name: str = "DPM++ 2M"
    scheduler: str = "Automatic"
    seed: int = -1
    batch_size: int = 1
    n_iter: int = 1
    clip_skip: int | None = None  # None: the "CLIP_stop_at_last_layers" option
    checkpoint: str | None = None  # None: the "sd_model_checkpoint" option
    vae: str | None = None  # None: the "sd_vae" option
    modules: list[str] | None = None  # separate VAE / text encoder files; None: "forge_additional_modules"
    save_images: bool | None = None  # None: the "samples_save" option
    eta: float | None = None  # noise of ancestral/SDE samplers and DDIM; None: "eta_ancestral" / "eta_ddim"
    subseed: int = -1  # A1111's variation seed (-1: a random one), mixed in by subseed_strength (0: not at all)
    subseed_strength: float = 0.0
    seed_resize_from_w: int = -1  # draw the noise at this size and centre it (-1 or 0: at the image's size)
    seed_resize_from_h: int = -1
    init_images: list[Image.Image] | None = None  # img2img's (one for the batch, or one an image); None: txt2img
    denoising_strength: float = 0.75  # img2img: 0 keeps the init image, 1 starts from noise alone
    resize_mode: int = 0  # img2img: how the init images get the size (webui.engine.init_image.RESIZE_MODES)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def resize_from(self) -> tuple[int, int] | None:
        """The (width, height) the starting noise is drawn at, where the request resizes its seed."""
        size = (self.seed_resize_from_w, self.seed_resize_from_h)
        return size if min(size) > 0 else None

    def validate(self, limits: dict[str, Any]) -> None:
        """Raise UserError naming the first bad field. ``limits`` is the options store's values. Whole numbers sent
        as floats (JSON clients send 64.0) become ints."""
        longest = limits["max_prompt_length"]
        for name in ("prompt", "negative_prompt"):
            text = getattr(self, name)
            _text(text, name)
            if len(text) > longest:
                raise UserError(f"is {len(text)} characters long; the most is {longest} (max_prompt_length in "
                                "Settings)", field=name)
        side = limits["max_image_side"]
        for name in ("width", "height"):
            value = _whole(getattr(self, name), name)
            if value % SIDE_MULTIPLE or not MIN_SIDE <= value <= side:
                raise UserError(f"must be a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {side} pixels, got "
                                f"{value}", field=name)
            setattr(self, name, value)
        self.steps = _whole_in(self.steps, "steps", 1, limits["max_steps"])
        self.batch_size = _whole_in(self.batch_size, "batch_size", 1, limits["max_batch_size"])
        self.n_iter = _whole_in(self.n_iter, "n_iter", 1, limits["max_batch_count"])
        _number_in(self.cfg_scale, "cfg_scale", 0, MAX_CFG)
        _number_in(self.distilled_cfg_scale, "distilled_cfg_scale", 0, MAX_CFG)
        seed = _whole(self.seed, "seed")
        if seed != -1 and not 0 <= seed <= MAX_SEED:
            raise UserError(f"must be -1 (random) or between 0 and {MAX_SEED}, got {seed}", field="seed")
        self.seed = seed
        if self.eta is not None:
            _number_in(self.eta, "eta", 0, 1)
        subseed = _whole(self.subseed, "subseed")
        if subseed != -1 and not 0 <= subseed <= MAX_SEED:
            raise UserError(f"must be -1 (random) or between 0 and {MAX_SEED}, got {subseed}", field="subseed")
        self.subseed = subseed
        _number_in(self.subseed_strength, "subseed_strength", 0, 1)
        for name in ("seed_resize_from_w", "seed_resize_from_h"):
            value = _whole(getattr(self, name), name)
            if value > 0 and (value % SIDE_MULTIPLE or not MIN_SIDE <= value <= side):
                raise UserError(f"must be -1 or 0 (off), or a multiple of {SIDE_MULTIPLE} between {MIN_SIDE} and {side} "
                                f"pixels, got {value}", field=name)
            setattr(self, name, max(value, -1))
        if self.clip_skip is not None:
            self.clip_skip = _whole_in(self.clip_skip, "clip_skip", 1, 12)
        for name in ("sampler_name", "scheduler"):
            _text(getattr(self, name), name)
        if self.init_images is not None:
            self._check_img2img(side)
        if self.modules is not None and not (isinstance(self.modules, list) and all(isinstance(m, str) for m in self.modules)):
            raise UserError(f"must be a list of file names, got {self.modules!r}", field="modules")

    def _check_img2img(self, side: int) -> None:
        """A1111's rules: one init image serves the whole batch; several make the batch, at most batch_size. Latent
        upscale encodes each at its own size: that must be within the largest side too."""
        images = self.init_images
        if not isinstance(images, list) or not images or not all(isinstance(i, Image.Image) for i in images):
            raise UserError("must be one image or more", field="init_images")
        if len(images) > 1:
            if len(images) > self.batch_size:
                raise UserError(f"{len(images)} images for a batch of {self.batch_size}: send one image, or one for "
                                "each image of the batch", field="init_images")
            self.batch_size = len(images)
        _number_in(self.denoising_strength, "denoising_strength", 0, 1)
        self.resize_mode = _whole_in(self.resize_mode, "resize_mode", 0, len(RESIZE_MODES) - 1)
        largest = max(max(image.size) for image in images)
        if self.resize_mode == LATENT_UPSCALE and largest > side:
            raise UserError(f"latent upscale encodes the image at its own size, and {largest} pixels is above the "
                            f"largest side, {side}: choose another resize mode", field="init_images")


def _number_in(value: object, name: str, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise UserError(f"must be a number between {low} and {high}, got {value!r}", field=name)


def _text(value: object, name: str) -> None:
    if not isinstance(value, str):
        raise UserError(f"must be text, got {type(value).__name__}", field=name)


def _whole(value: object, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or int(value) != value:
        raise UserError(f"must be a whole number, got {value!r}", field=name)
    return int(value)


def _whole_in(value: object, name: str, low: int, high: int) -> int:
    number = _whole(value, name)
    if not low <= number <= high:
        raise UserError(f"must be between {low} and {high}, got {number}", field=name)
    return number


@dataclass
class GenerationResult:
    """What one request made: images with their seeds and infotexts, and where they were saved."""

    request: GenerationRequest
    images: list[Image.Image] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    subseeds: list[int] = field(default_factory=list)  # each image's variation seed
    prompts: list[str] = field(default_factory=list)
    negative_prompts: list[str] = field(default_factory=list)
    infotexts: list[str] = field(default_factory=list)
    paths: list[Path] = field(default_factory=list)
    model_name: str = ""
    model_hash: str = ""
    sampler_name: str = ""
    scheduler: str = ""
    clip_skip: int = 1
    interrupted: bool = False
    seconds: float = 0.0
    memory: GenerationStats | None = None
    memory_timeline: MemoryTimeline | None = None  # memory over time, from loading to the last image (a plot's: all)
    timings: dict[str, float] = field(default_factory=dict)  # seconds per phase: encode, denoise, decode
    notices: list[str] = field(default_factory=list)  # what the user should know (a VAE kept in float32)
    forecast: Forecast | None = None  # what was forecast before it ran (benchmarks compare it with what happened)

    @property
    def seed(self) -> int:
        return self.seeds[0] if self.seeds else -1

    def saved_files(self) -> list[Path | None]:
        """Each image's saved PNG (with its infotext), or None where it was not saved: the faces send the file
        rather than encode the image again (a 1024² PNG takes 0.1-0.2 s of CPU)."""
        return list(self.paths) if len(self.paths) == len(self.images) else [None] * len(self.images)
