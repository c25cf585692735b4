"""A txt2img or img2img request, checked field by field before any work starts, and its result."""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from PIL import Image

from webui.engine.hires import MAX_SCALE as MAX_HIRES_SCALE
from webui.engine.init_image import LATENT_UPSCALE, RESIZE_MODES
from webui.engine.inpaint import FILLS, InpaintOptions
from webui.engine.control.units import ControlUnit, checked_units
from webui.engine.soft_inpaint import SoftInpainting, checked_soft_inpainting
from webui.engine.memory.manager import GenerationStats
from webui.engine.memory.trace import MemoryTimeline
from webui.engine.outpaint import Outpaint
from webui.errors import UserError

if TYPE_CHECKING:
    from webui.engine.forecast import Forecast

MAX_SEED = 2**32 - 1
MIN_SIDE, SIDE_MULTIPLE = 64, 8  # pixels; latents are 1/8 of the image
MAX_CFG = 100
MAX_NOISE_MULTIPLIER = 2.0  # A1111's option slider goes to 1.5
MAX_MASK_BLUR = 128  # pixels (A1111's slider goes to 64)
MAX_MASK_PADDING = 1024  # pixels around the masked part ("only masked"; A1111's slider goes to 256)


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
    initial_noise_multiplier: float | None = None  # img2img: the starting noise times this (None: the option)
    # Inpainting (img2img with a mask), with A1111's API defaults (its UI's differ: original, whole picture, 32)
    mask: Image.Image | None = None  # white where repainted; an RGBA mask with transparency: its opaque part
    mask_blur: int | None = None  # sets mask_blur_x and mask_blur_y, as A1111's
    mask_blur_x: int = 4
    mask_blur_y: int = 4
    inpainting_fill: int = 0  # masked content: fill, original, latent noise, latent nothing (webui.engine.inpaint)
    inpaint_full_res: bool = True  # inpaint area: only masked (with padding), else the whole picture
    inpaint_full_res_padding: int = 0
    inpainting_mask_invert: int = 0  # 1: inpaint what is not masked
    mask_round: bool = True  # the latent mask rounded to 0 or 1 (else the blur's shades blend)
    latent_mask: Image.Image | None = None  # A1111's: another mask for the latents only, taken as it is (a script's)
    # A1111's Soft Inpainting (with a mask): its settings, or A1111's script args (on or off, then the settings)
    soft_inpainting: SoftInpainting | list | None = None
    controlnet: list[ControlUnit] | None = None  # ControlNet units (sd-webui-controlnet's, enabled or not)
    styles: list[str] | None = None  # prompt styles of styles.csv by name, applied to the prompts in this order
    # Hires. fix (txt2img): the first pass upscaled, then img2img at denoising_strength there (A1111's fields)
    enable_hr: bool = False
    hr_scale: float = 2.0
    hr_upscaler: str = "Latent"  # a latent mode (webui.engine.hires.LATENT_MODES) or an image upscaler's name
    hr_second_pass_steps: int = 0  # 0: the request's steps
    hr_resize_x: int = 0  # a size instead of hr_scale (0: from the other side's, or from hr_scale)
    hr_resize_y: int = 0
    hr_sampler_name: str | None = None  # None, "" or "Use same sampler": the request's
    hr_scheduler: str | None = None  # None, "" or "Use same scheduler": the request's
    hr_prompt: str = ""  # "": the request's
    hr_negative_prompt: str = ""
    hr_cfg: float | None = None  # Forge's Hires CFG Scale; None: the request's
    hr_distilled_cfg: float | None = None  # Forge's Hires Distilled CFG Scale; None: the request's
    hr_checkpoint_name: str | None = None  # the second pass's checkpoint; None, "" or "Use same checkpoint": the same
    # img2img: A1111's outpainting scripts (webui.engine.outpaint), on where a direction is chosen
    outpaint_directions: list[str] | None = None  # the sides extended: left, right, up, down
    outpaint_method: str = "Poor man's outpainting"  # or "Outpainting mk2"
    outpaint_pixels: int = 128
    outpaint_mask_blur: int = 4
    outpaint_fill: int = 0  # poor man's masked content, as inpainting_fill
    outpaint_noise_q: float = 1.0  # mk2's fall-off exponent
    outpaint_color_variation: float = 0.05  # mk2's

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> GenerationRequest:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})

    @property
    def resize_from(self) -> tuple[int, int] | None:
        """The (width, height) the starting noise is drawn at, where the request resizes its seed."""
        size = (self.seed_resize_from_w, self.seed_resize_from_h)
        return size if min(size) > 0 else None

    def outpainting(self) -> Outpaint | None:
        """The outpainting the request asks for (checked), or None."""
        if not self.outpaint_directions:
            return None
        directions = self.outpaint_directions
        return Outpaint(self.outpaint_pixels, self.outpaint_mask_blur, self.outpaint_fill,
                        tuple(directions) if isinstance(directions, (list, tuple)) else None, self.outpaint_method,
                        self.outpaint_noise_q, self.outpaint_color_variation).checked()

    def inpaint_options(self) -> InpaintOptions:
        return InpaintOptions(self.mask_blur_x, self.mask_blur_y, self.inpainting_fill, bool(self.inpaint_full_res),
                              self.inpaint_full_res_padding, bool(self.inpainting_mask_invert))

    def validate(self, limits: dict[str, Any]) -> None:
        """Raise UserError naming the first bad field. ``limits`` is the options store's values. Whole numbers sent
        as floats (JSON clients send 64.0) become ints."""
        self._check_prompts(("prompt", "negative_prompt"), limits["max_prompt_length"])
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
        if self.mask is not None:
            self._check_mask()
        if self.soft_inpainting is not None:  # acts only with a mask, as A1111's: without one it is off
            self.soft_inpainting = checked_soft_inpainting(self.soft_inpainting) if self.mask is not None else None
        if self.controlnet is not None:
            if not isinstance(self.controlnet, list):
                raise UserError(f"must be a list of units, got {type(self.controlnet).__name__}", field="controlnet")
            self.controlnet = checked_units(self.controlnet, self.init_images is not None) or None
        if self.enable_hr:
            self._check_hires(limits)
        if self.modules is not None and not (isinstance(self.modules, list) and all(isinstance(m, str) for m in self.modules)):
            raise UserError(f"must be a list of file names, got {self.modules!r}", field="modules")

    def _check_prompts(self, names: tuple[str, ...], longest: int) -> None:
        for name in names:
            text = getattr(self, name)
            _text(text, name)
            if len(text) > longest:
                raise UserError(f"is {len(text)} characters long; the most is {longest} (max_prompt_length in "
                                "Settings)", field=name)

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
        if self.initial_noise_multiplier is not None:
            _number_in(self.initial_noise_multiplier, "initial_noise_multiplier", 0, MAX_NOISE_MULTIPLIER)
        self.resize_mode = _whole_in(self.resize_mode, "resize_mode", 0, len(RESIZE_MODES) - 1)
        largest = max(max(image.size) for image in images)
        if self.resize_mode == LATENT_UPSCALE and largest > side:
            raise UserError(f"latent upscale encodes the image at its own size, and {largest} pixels is above the "
                            f"largest side, {side}: choose another resize mode", field="init_images")


    def _check_mask(self) -> None:
        """The mask is the init images' size (they are cut out and put back by it); its fields in their ranges."""
        if self.init_images is None:
            raise UserError("a mask inpaints an init image: send init images with it (img2img)", field="mask")
        if not isinstance(self.mask, Image.Image):
            raise UserError("must be an image (white where the picture is repainted)", field="mask")
        for image in self.init_images:
            if image.size != self.mask.size:
                raise UserError(f"is {self.mask.width}x{self.mask.height} and the init image {image.width}x"
                                f"{image.height}: draw or send the mask at the image's size", field="mask")
        if self.resize_mode == LATENT_UPSCALE:
            raise UserError("inpainting resizes the picture itself: choose another resize mode with a mask",
                            field="resize_mode")
        if self.mask_blur is not None:
            self.mask_blur_x = self.mask_blur_y = _whole_in(self.mask_blur, "mask_blur", 0, MAX_MASK_BLUR)
        for name in ("mask_blur_x", "mask_blur_y"):
            setattr(self, name, _whole_in(getattr(self, name), name, 0, MAX_MASK_BLUR))
        self.inpainting_fill = _whole_in(self.inpainting_fill, "inpainting_fill", 0, len(FILLS) - 1)
        self.inpaint_full_res = bool(_flag(self.inpaint_full_res, "inpaint_full_res"))
        self.inpaint_full_res_padding = _whole_in(self.inpaint_full_res_padding, "inpaint_full_res_padding", 0,
                                                  MAX_MASK_PADDING)
        self.inpainting_mask_invert = _flag(self.inpainting_mask_invert, "inpainting_mask_invert")
        if not isinstance(self.mask_round, bool):
            raise UserError(f"must be true or false, got {self.mask_round!r}", field="mask_round")
        if self.latent_mask is not None and not isinstance(self.latent_mask, Image.Image):
            raise UserError("must be an image (white where the latents are repainted)", field="latent_mask")


    def _check_hires(self, limits: dict[str, Any]) -> None:
        """The hires fields in their ranges (the size against the model, the upscaler and sampler against what
        there is, are the engine's to check)."""
        if self.init_images is not None:
            raise UserError("hires. fix is txt2img's: img2img sets its size itself", field="enable_hr")
        _number_in(self.hr_scale, "hr_scale", 1, MAX_HIRES_SCALE)
        _number_in(self.denoising_strength, "denoising_strength", 0, 1)
        self.hr_second_pass_steps = _whole_in(self.hr_second_pass_steps, "hr_second_pass_steps", 0, limits["max_steps"])
        for name in ("hr_resize_x", "hr_resize_y"):
            setattr(self, name, _whole_in(getattr(self, name), name, 0, limits["max_image_side"]))
        _text(self.hr_upscaler, "hr_upscaler")
        for name in ("hr_sampler_name", "hr_scheduler", "hr_checkpoint_name"):
            if getattr(self, name) is not None:
                _text(getattr(self, name), name)
        self._check_prompts(("hr_prompt", "hr_negative_prompt"), limits["max_prompt_length"])
        for name in ("hr_cfg", "hr_distilled_cfg"):
            if getattr(self, name) is not None:
                _number_in(getattr(self, name), name, 0, MAX_CFG)


def _number_in(value: object, name: str, low: float, high: float) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not low <= value <= high:
        raise UserError(f"must be a number between {low} and {high}, got {value!r}", field=name)


def _flag(value: object, name: str) -> int:
    """A choice of two sent as true/false or 1/0 (A1111's UI sends the radio's index, its API a boolean)."""
    return int(value) if isinstance(value, bool) else _whole_in(value, name, 0, 1)


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
    fast: tuple[str, ...] = ()  # the fast features that ran (issue 26): "compiled", the attention backend, "fp8 matmul"
    grids: int = 0  # how many images, first, are grids (a plot's, a prompt matrix's): A1111's index_of_first_image

    @property
    def seed(self) -> int:
        return self.seeds[0] if self.seeds else -1

    def saved_files(self) -> list[Path | None]:
        """Each image's saved PNG (with its infotext), or None where it was not saved: the faces send the file
        rather than encode the image again (a 1024² PNG takes 0.1-0.2 s of CPU)."""
        return list(self.paths) if len(self.paths) == len(self.images) else [None] * len(self.images)


def combined(made: list[GenerationResult], notices: list[str] = ()) -> GenerationResult:
    """Several results as one (a folder batch, a dynamic prompt's images): every image with its seed, prompts,
    infotext and file; the last one's model and memory figures."""
    def every(name: str) -> list:
        return [item for result in made for item in getattr(result, name)]

    paths = every("paths")
    return replace(
        made[-1], images=every("images"), seeds=every("seeds"), subseeds=every("subseeds"), prompts=every("prompts"),
        negative_prompts=every("negative_prompts"), infotexts=every("infotexts"),
        paths=paths if len(paths) == len(every("images")) else [], interrupted=any(r.interrupted for r in made),
        seconds=sum(r.seconds for r in made),
        notices=list(dict.fromkeys([*(n for r in made for n in r.notices), *notices])))
