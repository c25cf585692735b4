"""The two shapes a family takes: a UNet with CLIP (SD1.x, SD2.x, SDXL) or a flow-matching transformer with T5
(SD3.x, Flux). Each shares one loop; a family module adds only what differs."""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from webui.engine.conditioning.prompts import Conditioning, encode_prompts
from webui.engine.control.flow import FlowControls
from webui.engine.control.ip_adapter import adapter_in
from webui.engine.families.protocol import FamilyFields
from webui.engine.formats.detect import Family
from webui.engine.formats.files import Source
from webui.engine.formats.ldm_keys import unet_to_ldm
from webui.engine.lora.layout import DENOISER, DenoiserPrefixes, LoraLayer, LoraTextEncoder
from webui.engine.memory import MB
from webui.engine.sampling.flow import denoise_flow, set_timesteps
from webui.engine.sampling.ksampling import StepCallback
from webui.engine.sampling.samplers import make_flow_scheduler, step_kwargs
from webui.engine.sampling.steps import InitLatents
from webui.engine.sampling.unet_loop import denoise_unet
from webui.errors import UserError

if TYPE_CHECKING:
    from webui.engine.families.protocol import LatentRgb
    from webui.engine.generate import Resolved
    from webui.engine.loading.load import LoadedModel


class UNetFamily:
    """CLIP conditioning and diffusers' UNet loop; SDXL adds its micro-conditioning."""

    family: Family
    activation_per_pixel: int = 0
    size_multiple = 8  # pixels: one latent per 8x8
    # CLIP at 77 tokens keeps its hidden states (clip skip): a few MB a prompt, rounded up (benchmarks/activations.py)
    encode_activation_per_prompt = 16 * MB
    latent_rgb: LatentRgb | None = None
    clip_kinds: tuple[str, ...] = ("clip_l",)
    form_fields = FamilyFields(clip_skip=True)
    latent_channels = 4
    vae_upcast = False
    clip_penultimate = False
    textual_inversion = True  # its CLIPs take A1111's embeddings (``conditioning.embeddings``)
    lora_text_encoders: tuple[LoraTextEncoder, ...] = ()
    lora_prefixes = DenoiserPrefixes()
    sdxl_sigmas = False  # the sigma-space schedules' SDXL variants

    def prediction_type(self, unet: torch.nn.Module, declared: str) -> str:
        """What the UNet predicts, where its file says ``declared`` (or says nothing: "epsilon")."""
        return declared

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
                on_step: StepCallback, init: InitLatents | None = None) -> torch.Tensor:
        added = self.added_conditions(job, cond, uncond, noise.device, noise.dtype)
        with adapter_in(model.denoiser, job.active_controls()):
            return denoise_unet(model, job, seeds, generators, noise, cond, uncond, on_step, added, self.sdxl_sigmas,
                                init)

    def infotext_fields(self, model: LoadedModel, job: Resolved) -> dict:
        return {}

    def is_inpainting(self, denoiser: torch.nn.Module) -> bool:
        return denoiser.config.in_channels == 2 * self.latent_channels + 1

    def inpainting_input(self, denoiser: torch.nn.Module, mask: torch.Tensor,
                         masked: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """A 9-channel UNet's: the mask at the latents' size, then the masked picture's latents."""
        if not self.is_inpainting(denoiser):
            return None
        latents = masked()
        small = torch.nn.functional.interpolate(mask, size=latents.shape[-2:]).to(latents.device)
        return torch.cat([small.expand(len(latents), -1, -1, -1), latents], dim=1)

    def lora_layers(self, paths: Iterable[str], config: Mapping[str, Any]) -> dict[str, LoraLayer]:
        """LDM's names, from the checkpoint writers' key map: each LDM name ends up with our module's path."""
        ldm = unet_to_ldm({f"{p}.weight": p for p in paths}, config)
        return {key.removesuffix(".weight"): LoraLayer(DENOISER, (path,)) for key, path in ldm.items()}


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

    family: Family
    activation_per_pixel: int = 0
    size_multiple = 16  # pixels: 2x2 patches of 8x8-pixel latents
    # T5-XXL over up to 512 tokens: its attention scores and float32 feed-forward outputs (benchmarks/activations.py)
    encode_activation_per_prompt = 192 * MB
    latent_rgb: LatentRgb | None = None
    clip_kinds: tuple[str, ...] = ()
    form_fields = FamilyFields()
    latent_channels = 16
    vae_upcast = True
    clip_penultimate = False
    textual_inversion = False  # (A1111's embeddings are for SD1.x, SD2.x and SDXL)
    files: FlowFiles
    lora_text_encoders: tuple[LoraTextEncoder, ...] = ()
    lora_prefixes = DenoiserPrefixes(kohya_diffusers=("lora_transformer_", "lora_unet_"),
                                     diffusers=("transformer.", "", "base_model.model."))

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

    def is_inpainting(self, denoiser: torch.nn.Module) -> bool:
        return False

    def inpainting_input(self, denoiser: torch.nn.Module, mask: torch.Tensor,
                         masked: Callable[[], torch.Tensor]) -> torch.Tensor | None:
        """None: the flow families' inpainting puts the kept part back (Flux Fill has its own)."""
        return None

    def key_table(self, config: Mapping[str, Any]) -> dict[str, tuple[str, ...]]:
        """The original layout's names (``name.`` prefixes) -> our module paths they cover, in row order."""
        raise NotImplementedError

    def swap_stored_halves(self, state_dict: dict[str, torch.Tensor], config: Mapping[str, Any]) -> None:
        """Exchange, in place, the output halves of the layers the original layout stores swapped."""
        raise NotImplementedError

    def lora_layers(self, paths: Iterable[str], config: Mapping[str, Any]) -> dict[str, LoraLayer]:
        """Every layer of ``config``'s transformer under its original name (whichever ``paths``), from the loader's
        key table; which are stored with swapped halves is asked of the loader's own swap, on a probe of two
        numbered rows per layer."""
        table = self.key_table(config)
        modules = {name[:-1]: tuple(t[:-1] for t in targets) for name, targets in table.items() if name.endswith(".")}
        probe = {f"{targets[0]}.weight": torch.arange(2) for targets in modules.values() if len(targets) == 1}
        self.swap_stored_halves(probe, config)
        swapped = {key.removesuffix(".weight") for key, rows in probe.items() if rows[0] == 1}
        return {name: LoraLayer(DENOISER, targets, targets[0] in swapped) for name, targets in modules.items()}

    def denoise(self, model: LoadedModel, job: Resolved, seeds: list[int], generators: list[torch.Generator],
                noise: torch.Tensor, cond: Conditioning, uncond: Conditioning | None,
                on_step: StepCallback, init: InitLatents | None = None) -> torch.Tensor:
        req, steps = job.request, job.steps
        scheduler = make_flow_scheduler(job.sampling, self.shift(model, job))
        set_timesteps(scheduler, steps.total, noise.device)
        units = job.active_controls()
        controls = FlowControls(units, (req.width, req.height), steps.run, uncond is not None) if units else None
        with adapter_in(model.denoiser, units):
            return denoise_flow(model.denoiser, self, scheduler, noise, cond, uncond, req.cfg_scale,
                                req.distilled_cfg_scale, step_kwargs(scheduler, generators), on_step, steps.start,
                                init, controls)
