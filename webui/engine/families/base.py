"""The two shapes a family takes: a UNet with CLIP (SD1.x, SD2.x, SDXL) or a flow-matching transformer with T5
(SD3.x, Flux). Each shares one loop; a family module adds only what differs."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from webui.engine.conditioning.prompts import Conditioning, encode_prompts
from webui.engine.families.protocol import FamilyFields
from webui.engine.formats.detect import Family
from webui.engine.formats.files import Source
from webui.engine.sampling.flow import denoise_flow, set_timesteps
from webui.engine.sampling.ksampling import StepCallback
from webui.engine.sampling.samplers import make_flow_scheduler, step_kwargs
from webui.engine.sampling.unet_loop import denoise_unet
from webui.errors import UserError

if TYPE_CHECKING:
    from webui.engine.families.protocol import LatentRgb
    from webui.engine.generate import Resolved
    from webui.engine.loading.load import LoadedModel


class UNetFamily:
    """CLIP conditioning and diffusers' UNet loop; SDXL adds its micro-conditioning."""

    families: tuple[Family, ...] = ()
    activation_per_pixel: int = 0
    latent_rgb: LatentRgb | None = None
    clip_kinds: tuple[str, ...] = ("clip_l",)
    form_fields = FamilyFields(clip_skip=True)
    sdxl_sigmas = False  # the sigma-space schedules' SDXL variants

    def check_size(self, width: int, height: int) -> None:
        """Any multiple of the VAE's scale factor (checked with the noise)."""

    def encode(self, model: LoadedModel, prompts: list[str], clip_skip: int, device: torch.device,
               dtype: torch.dtype) -> Conditioning:
        return encode_prompts(prompts, model.text_encoders, clip_skip, device=device, dtype=dtype)

    def added_conditions(self, job: Resolved, cond: Conditioning, uncond: Conditioning | None, device: torch.device,
                         dtype: torch.dtype) -> dict | None:
        """The UNet's ``added_cond_kwargs``; none but SDXL's."""
        return None

    def denoise(self, model: LoadedModel, job: Resolved, seeds: list[int], generators: list[torch.Generator],
                noise: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                on_step: StepCallback) -> torch.Tensor:
        added = self.added_conditions(job, cond, uncond, noise.device, noise.dtype)
        return denoise_unet(model, job, seeds, generators, noise, cond, uncond, on_step, added, self.sdxl_sigmas)

    def infotext_fields(self, model: LoadedModel, job: Resolved) -> dict:
        return {}


@dataclass(frozen=True)
class FlowFiles:
    """How a flow family's pipeline is put together from files (``loading.assemble``)."""

    transformer_class: type[torch.nn.Module]  # its diffusers class (diffusers folders)
    diffusers_clip_classes: tuple[type[torch.nn.Module], ...]  # its CLIPs' classes in a diffusers folder
    load_transformer: Callable[[Source, torch.dtype], torch.nn.Module]  # from a single file (or a state dict)
    load_gguf_transformer: Callable[[Path, torch.dtype], torch.nn.Module]
    t5_required: bool  # False: it runs without T5 (SD3.x does, on its CLIPs alone)

    @property
    def diffusers_t5_folder(self) -> str:
        """diffusers numbers a pipeline's text encoders in order: T5 follows the CLIPs."""
        return f"text_encoder_{len(self.diffusers_clip_classes) + 1}"


class FlowFamily:
    """The flow-matching loop with a shift each family chooses, the latents in the transformer's layout
    (``sampling.flow.FlowLayout``; as they are here); 16-channel latents, previewed as their mean. Assembled from
    a transformer, a 16-channel VAE, CLIPs that all pool and T5 (``loading.assemble``)."""

    families: tuple[Family, ...] = ()
    activation_per_pixel: int = 0
    latent_rgb: LatentRgb | None = None
    clip_kinds: tuple[str, ...] = ()
    form_fields = FamilyFields()
    files: FlowFiles

    @property
    def family(self) -> Family:
        """A flow family serves one detected family."""
        return self.families[0]

    def check_size(self, width: int, height: int) -> None:
        """The transformers see 2x2 patches of 8x8-pixel latents."""
        for name, side in (("width", width), ("height", height)):
            if side % 16:
                raise UserError(f"{self.family.value} needs a multiple of 16 pixels, got {side}", field=name)

    def shift(self, model: LoadedModel, job: Resolved) -> float:
        raise NotImplementedError

    def pack(self, noise: torch.Tensor) -> torch.Tensor:
        """The latents as they are (``sampling.flow.FlowLayout``)."""
        return noise

    def unpack(self, latents: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return latents

    def inputs(self, denoiser: torch.nn.Module, noise: torch.Tensor, context: torch.Tensor, copies: int,
               distilled_cfg: float) -> dict:
        return {}

    def timestep(self, t: torch.Tensor) -> torch.Tensor:
        return t

    def denoise(self, model: LoadedModel, job: Resolved, seeds: list[int], generators: list[torch.Generator],
                noise: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                on_step: StepCallback) -> torch.Tensor:
        req = job.request
        scheduler = make_flow_scheduler(job.sampling, self.shift(model, job))
        set_timesteps(scheduler, req.steps, noise.device)
        return denoise_flow(model.denoiser, self, scheduler, noise, cond, uncond, req.cfg_scale,
                            req.distilled_cfg_scale, step_kwargs(scheduler, generators), on_step)
