"""How LoRA files name a family's layers: the table each family module gives ``lora.keys``.

A family says which text encoders a LoRA may adapt and under which names trainers write them, what
kohya's and diffusers' files put before its denoiser's layers, and its denoiser's layers under the
original checkpoint's names (LDM's for the UNets, Black Forest Labs' or Stability AI's for the
transformers, where one name may cover several of our layers).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

DENOISER = "denoiser"


class LoraTextEncoder(NamedTuple):
    component: str  # the diffusers pipeline attribute, our key in ``modules``
    comfy: str  # ComfyUI's name for it (``text_encoders.<comfy>.transformer.``)
    kohya: tuple[str, ...]  # sd-scripts' prefix, then those older trainers used


@dataclass(frozen=True)
class LoraLayer:
    """A layer as LoRA files name it: our modules it covers, in the order of its output rows (several where the
    original layout fuses them), and whether that layout stores its output halves swapped."""

    component: str
    modules: tuple[str, ...]
    swapped: bool = False


@dataclass(frozen=True)
class DenoiserPrefixes:
    """What files put before the denoiser's layer names; the first of each is what ``lora_export`` writes."""

    kohya_original: tuple[str, ...] = ("lora_unet_",)  # kohya's files, under the original layout's names
    kohya_diffusers: tuple[str, ...] = ("lora_unet_",)  # kohya's files, under diffusers' names
    diffusers: tuple[str, ...] = ("unet.", "", "base_model.model.")
    comfy: tuple[str, ...] = ("diffusion_model.", "model.diffusion_model.")
