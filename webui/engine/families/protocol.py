"""What a model family tells the engine (see the package docstring for how the engine uses it)."""
from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable, Iterable, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import torch

from webui.engine.conditioning.prompts import Conditioning
from webui.engine.formats.detect import Family
from webui.engine.lora.layout import DenoiserPrefixes, LoraLayer, LoraTextEncoder
from webui.engine.sampling.ksampling import StepCallback
from webui.engine.sampling.steps import InitLatents

if TYPE_CHECKING:
    from webui.engine.generate import Resolved
    from webui.engine.loading.load import LoadedModel

LatentRgb = tuple[list[list[float]], list[float]]  # per latent channel an RGB row, and an RGB bias


@dataclass(frozen=True)
class FamilyFields:
    """The form fields only some families read: the UI shows those its family uses."""

    distilled_cfg: bool = False  # Flux's guidance (its CFG is 1, as Forge's Flux preset sets it)
    shift: bool = False  # SD3.x's flow shift
    clip_skip: bool = False  # the CLIP-only families' (the flow families' T5 has no layers to skip)


class FamilyModel(Protocol):
    family: Family  # the detected family it serves
    activation_per_pixel: int  # denoise activations, bytes per latent pixel per image at 2-byte precision
    size_multiple: int  # an image's sides are a multiple of this many pixels (check_size refuses others)
    encode_activation_per_prompt: int  # text encoding's activations, bytes per prompt encoded
    latent_rgb: LatentRgb | None  # the live preview's latent → RGB map; None: a gray mean over the channels
    clip_kinds: tuple[str, ...]  # its CLIP text encoders, in order ("clip_l", "clip_g")
    form_fields: FamilyFields  # the form fields it reads beyond the common ones
    latent_channels: int  # its VAE's (a VAE file of another width is not its own)
    vae_upcast: bool  # its VAE overflows in float16 (black or NaN images; diffusers marks it force_upcast)
    clip_penultimate: bool  # its CLIPs' penultimate layer without the final norm is read (else the last, normed)
    textual_inversion: bool  # its CLIPs take A1111's textual-inversion embeddings
    lora_text_encoders: tuple[LoraTextEncoder, ...]  # the text encoders a LoRA may adapt, as files name them
    lora_prefixes: DenoiserPrefixes  # what LoRA files put before its denoiser's layer names

    def check_size(self, width: int, height: int) -> None:
        """Raise a UserError for an image size the denoiser cannot take."""

    def encode(self, model: LoadedModel, prompts: list[str], clip_skip: int, device: torch.device,
               dtype: torch.dtype) -> Conditioning:
        """The prompts' text conditioning, one row per prompt."""

    def denoise(self, model: LoadedModel, job: Resolved, seeds: list[int], generators: list[torch.Generator],
                noise: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                on_step: StepCallback, init: InitLatents | None = None) -> torch.Tensor:
        """Latents denoised from ``noise``; ``uncond`` is None without CFG. img2img gives ``init``: then the last
        ``job.steps.run`` steps of the schedule run, from its latents noised to the first of them; inpainting keeps
        what its mask keeps (``sampling.steps.InitLatents``)."""

    def infotext_fields(self, model: LoadedModel, job: Resolved) -> dict:
        """The infotext fields only this family writes."""

    def is_inpainting(self, denoiser: torch.nn.Module) -> bool:
        """Whether ``denoiser`` is an inpainting model (known from its input width): it needs a mask."""

    def inpainting_input(self, denoiser: torch.nn.Module, mask: torch.Tensor,
                         masked: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """An inpainting model's extra input (B, C, h, w), known from its input width, from the pixel ``mask``
        (1, 1, H, W: 1 repainted) and the latents of the picture with the masked part grey (``masked()``,
        encoded only where needed); None for a model that is not one (the kept part is put back instead)."""

    def lora_layers(self, paths: Iterable[str], config: Mapping[str, Any]) -> dict[str, LoraLayer]:
        """The denoiser's layers at ``paths`` by their names in the original checkpoint layout (for the
        denoiser of ``config``)."""
