"""The two shapes a family takes: a UNet with CLIP (SD1.x, SD2.x, SDXL) or a flow-matching transformer with T5
(SD3.x, Flux). Each shares one loop; a family module adds only what differs."""
from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from webui.engine.conditioning.prompts import Conditioning, encode_prompts
from webui.engine.formats.detect import Family
from webui.engine.sampling.flow import denoise_flow, set_timesteps
from webui.engine.sampling.ksampling import StepCallback
from webui.engine.sampling.samplers import make_flow_scheduler, step_kwargs
from webui.engine.sampling.unet_loop import denoise_unet
from webui.errors import UserError

if TYPE_CHECKING:
    from webui.engine.generate import Resolved
    from webui.engine.families.protocol import LatentRgb
    from webui.engine.loading.load import LoadedModel


class UNetFamily:
    """CLIP conditioning and diffusers' UNet loop; SDXL adds its micro-conditioning."""

    families: tuple[Family, ...] = ()
    activation_per_pixel: int = 0
    latent_rgb: LatentRgb | None = None
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


class FlowFamily:
    """The flow-matching loop with a shift each family chooses; 16-channel latents, previewed as their mean."""

    families: tuple[Family, ...] = ()
    activation_per_pixel: int = 0
    latent_rgb: LatentRgb | None = None

    def check_size(self, width: int, height: int) -> None:
        """The transformers see 2x2 patches of 8x8-pixel latents."""
        for name, side in (("width", width), ("height", height)):
            if side % 16:
                raise UserError(f"{self.families[0].value} needs a multiple of 16 pixels, got {side}", field=name)

    def shift(self, model: LoadedModel, job: Resolved) -> float:
        raise NotImplementedError

    def denoise(self, model: LoadedModel, job: Resolved, seeds: list[int], generators: list[torch.Generator],
                noise: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                on_step: StepCallback) -> torch.Tensor:
        req = job.request
        scheduler = make_flow_scheduler(job.sampling, self.shift(model, job))
        set_timesteps(scheduler, req.steps, noise.device)
        return denoise_flow(model.denoiser, model.family, scheduler, noise, cond, uncond, req.cfg_scale,
                            req.distilled_cfg_scale, step_kwargs(scheduler, generators), on_step)
