"""Hires. fix, as A1111 does it: txt2img at the request's size, its latents (or its decoded images, through an image
upscaler) brought to the hires size, then img2img there at the denoising strength; each part planned by the memory
manager with its own activation estimate (``generate``)."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING

import torch
from PIL import Image

from webui.engine.formats.detect import Family
from webui.engine.hooks import extract_networks
from webui.engine.upscale.extras import crop_centre, upscale, upscaler_steps
from webui.engine.upscale.found import NONE, UpscalerInfo, find_upscaler
from webui.engine.upscale.model import UpscaleSetup
from webui.errors import UserError

if TYPE_CHECKING:
    from webui.engine.generate import Resolved
    from webui.engine.loading.load import LoadedModel
    from webui.engine.request import GenerationRequest
    from webui.engine.sampling.samplers import Sampling

# A1111's latent upscale modes: name -> (torch's interpolation mode, antialias)
LATENT_MODES: dict[str, tuple[str, bool]] = {
    "Latent": ("bilinear", False),
    "Latent (antialiased)": ("bilinear", True),
    "Latent (bicubic)": ("bicubic", False),
    "Latent (bicubic antialiased)": ("bicubic", True),
    "Latent (nearest)": ("nearest", False),
    "Latent (nearest-exact)": ("nearest-exact", False),
}
SAME_SAMPLER, SAME_SCHEDULER, SAME_CHECKPOINT = "Use same sampler", "Use same scheduler", "Use same checkpoint"
MAX_SCALE = 8.0


@dataclass(frozen=True)
class HiresSize:
    """Where the first pass goes: ``upscaled`` covers ``target`` (the hires size); the middle of it is kept."""

    upscaled: tuple[int, int]
    target: tuple[int, int]


@dataclass(frozen=True)
class OtherModel:
    """The checkpoint hires. fix's second pass runs on (A1111's hr_checkpoint_name), as the engine switches to it:
    ``load`` makes it the current model (its networks applied, the first model kept in host memory), ``back`` the
    first model again. ``title`` is the infotext's "Hires checkpoint"."""

    title: str
    load: Callable[[], LoadedModel]
    back: Callable[[], LoadedModel]


@dataclass
class HiresPass:
    """Hires. fix's second pass, resolved: its job (the request at the hires size with the hires steps, sampler,
    prompts and CFG) and how the first pass gets there: a latent mode, or ``upscale``, an image upscaler taking a
    batch's images to the hires size (the upscaled size's middle)."""

    job: Resolved
    size: HiresSize
    upscaler: str
    upscale: Callable[[list[Image.Image]], list[Image.Image]] | None = None
    networks: list = field(default_factory=list)  # the network tags of its prompts (LoRAs on another checkpoint)
    other_model: OtherModel | None = None  # hr_checkpoint_name: the pass runs on another checkpoint

    @property
    def latent(self) -> bool:
        return self.upscaler in LATENT_MODES


def resolve_hires(job: Resolved, size_multiple: int, largest: int, choose: Callable[[str, str], Sampling],
                  upscalers: Callable[[], list[UpscalerInfo]], setup: UpscaleSetup) -> HiresPass:
    """``job``'s hires pass: ``choose(sampler, schedule type)`` resolves its sampling (the request's where it says
    "Use same ..."), ``upscalers()`` lists those an image upscaler's name is looked up in (the folders are read only
    for one)."""
    req = job.request
    size = hires_size(req, size_multiple, largest)
    sampler = req.hr_sampler_name if req.hr_sampler_name not in (None, "", SAME_SAMPLER) else req.sampler_name
    scheduler = req.hr_scheduler if req.hr_scheduler not in (None, "", SAME_SCHEDULER) else req.scheduler
    try:
        sampling = choose(sampler, scheduler)
    except UserError as e:
        raise UserError(e.message, field={"sampler_name": "hr_sampler_name", "scheduler": "hr_scheduler"}.get(
            e.field, e.field)) from None
    second = replace(req, width=size.target[0], height=size.target[1], steps=req.hr_second_pass_steps or req.steps,
                     sampler_name=sampler, scheduler=scheduler, prompt=req.hr_prompt or req.prompt,
                     negative_prompt=req.hr_negative_prompt or req.negative_prompt,
                     cfg_scale=req.cfg_scale if req.hr_cfg is None else req.hr_cfg,
                     distilled_cfg_scale=req.distilled_cfg_scale if req.hr_distilled_cfg is None else req.hr_distilled_cfg,
                     enable_hr=False)
    (prompt, calls), (negative, negative_calls) = map(extract_networks, (second.prompt, second.negative_prompt))
    pass_job = replace(job, request=second, sampling=sampling, prompts=(prompt, negative), second_pass=True,
                       hires=None)
    upscale = None if req.hr_upscaler in LATENT_MODES else image_upscale(
        find_upscaler(upscalers(), req.hr_upscaler, "hr_upscaler"), setup, size)
    return HiresPass(pass_job, size, req.hr_upscaler, upscale, calls + negative_calls)


def check_latent_handover(hires: HiresPass, first: Family, second: Family, name: str) -> None:
    """A latent upscale hands the first pass's latents to the hires checkpoint ``name`` as they are: refused where
    that checkpoint is of another family (SD1.5's latents are not SDXL's)."""
    if hires.latent and second is not first:
        raise UserError(f"a latent upscale hands the first pass's latents to {name} as they are, and it "
                        f"({second.value}) does not read {first.value} latents: pick an image upscaler, or a "
                        "checkpoint of the same family.", field="hr_checkpoint_name")


def image_upscale(info: UpscalerInfo, setup: UpscaleSetup,
                  size: HiresSize) -> Callable[[list[Image.Image]], list[Image.Image]]:
    """A batch's images to the hires size through an image upscaler, as A1111's resize with an upscaler: to the
    upscaled size (its model loaded and placed by the memory manager once for the batch, a phase of the running job;
    "None": resized), then its middle."""
    def run(images: list[Image.Image]) -> list[Image.Image]:
        if info.name == NONE:
            upscaled = [image.resize(size.upscaled, Image.Resampling.LANCZOS) for image in images]
        else:
            scale = max(size.upscaled[0] / images[0].width, size.upscaled[1] / images[0].height)
            with upscaler_steps(info, "hr_upscaler", setup, images[0].size, own_job=False) as steps:
                upscaled = [upscale(image, scale, steps(scale), size.upscaled) for image in images]
        return [crop_centre(image, *size.target) for image in upscaled]

    return run


def hires_size(req: GenerationRequest, factor: int, largest: int) -> HiresSize:
    """A1111's hires size: the size times hr_scale, or hr_resize_x/y (one of them: the other from the aspect; both:
    the first pass scaled to cover them and its middle kept); each side down to a multiple of ``factor`` (the
    VAE's, or a flow transformer's 16), at most ``largest``."""
    width, height = req.width, req.height
    to_x, to_y = req.hr_resize_x, req.hr_resize_y
    if not to_x and not to_y:
        target = upscaled = (int(width * req.hr_scale), int(height * req.hr_scale))
    elif not to_y:
        target = upscaled = (to_x, to_x * height // width)
    elif not to_x:
        target = upscaled = (to_y * width // height, to_y)
    else:
        target = (to_x, to_y)
        upscaled = ((to_x, to_x * height // width) if width / height < to_x / to_y
                    else (to_y * width // height, to_y))
    target, upscaled = (tuple(max(side // factor * factor, factor) for side in size) for size in (target, upscaled))
    for side, name in zip(upscaled, ("hr_resize_x", "hr_resize_y")):
        if side > largest:
            raise UserError(f"the hires size {upscaled[0]}x{upscaled[1]} is above the largest side, {largest} pixels "
                            "(max_image_side in Settings): lower the upscale", field="hr_scale" if not (to_x or to_y)
                            else name)
    return HiresSize(upscaled, target)


def upscale_latents(latents: torch.Tensor, mode: str, size: HiresSize, factor: int) -> torch.Tensor:
    """The first pass's latents interpolated to the hires size (a latent mode) and cut to the target."""
    interpolation, antialias = LATENT_MODES[mode]
    width, height = size.upscaled
    latents = torch.nn.functional.interpolate(latents, size=(height // factor, width // factor), mode=interpolation,
                                              antialias=antialias)
    return crop_middle(latents, size.target[0] // factor, size.target[1] // factor)


def crop_middle(tensor: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """The middle ``width`` x ``height`` of a (B, C, H, W) tensor."""
    top, left = (tensor.shape[-2] - height) // 2, (tensor.shape[-1] - width) // 2
    return tensor[..., top:top + height, left:left + width]
