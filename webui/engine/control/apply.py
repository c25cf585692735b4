"""ControlNet units during a UNet's denoising: each active unit's residuals, added up, handed to the UNet's down and
middle blocks — as diffusers' StableDiffusion(XL)ControlNetPipeline computes them (the hint at the image's size in
[0, 1], the unit's scale, active between its guidance start and end, its control mode); a T2I-Adapter unit's
features, made once a pass, added inside the down blocks as diffusers' StableDiffusion(XL)AdapterPipeline does."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
from diffusers import T2IAdapter
from PIL import Image, ImageOps

from webui.engine.control.ip_adapter import image_tokens
from webui.engine.control.t2i_adapter import adapter_features
from webui.engine.control.units import RESIZE_MODES, ControlUnit
from webui.engine.sampling.ksampling import StepCallback


@dataclass
class ActiveUnit:
    unit: ControlUnit
    model: torch.nn.Module  # a ControlNet of any family (a Union one too), an IPAdapter or a T2IAdapter
    image: Image.Image  # its control image (the unit's, or the init image)
    encoded: dict[tuple[int, int], torch.Tensor] = field(default_factory=dict)  # a flow ControlNet's input by size
    mode: int | None = None  # a Union ControlNet's control mode
    embeds: tuple[torch.Tensor, torch.Tensor] | None = None  # an IP-Adapter's image embeddings: (CFG's other, its)


def control_hint(image: Image.Image, width: int, height: int, resize_mode: str) -> torch.Tensor:
    """The control image at the generation's size (A1111's resize modes; "Just Resize" as diffusers' pipeline
    resizes it), RGB in [0, 1], channels first."""
    image = image.convert("RGB")
    if resize_mode == RESIZE_MODES[1]:
        image = ImageOps.fit(image, (width, height), Image.LANCZOS)
    elif resize_mode == RESIZE_MODES[2]:
        image = ImageOps.pad(image, (width, height), Image.LANCZOS)
    elif image.size != (width, height):
        image = image.resize((width, height), Image.LANCZOS)
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)[None]


class Controls:
    """The units over one denoising pass; ``step`` is the step the loop is at (of ``steps`` that run). Each unit's
    hint is made at the pass's image size (``scale`` pixels a latent) at its first call."""

    def __init__(self, units: list[ActiveUnit], steps: int, cfg: bool, scale: int):
        self.units, self.steps, self.cfg, self.scale, self.step = units, steps, cfg, scale, 0
        self._hints: dict[int, torch.Tensor] = {}
        self._features: dict[int, list[torch.Tensor]] = {}  # a T2I-Adapter unit's, for one row of the batch
        self._tokens: list[torch.Tensor] | None = None  # the IP-Adapter units' image tokens for the batch

    def hint(self, index: int, x: torch.Tensor) -> torch.Tensor:
        if index not in self._hints:
            active = self.units[index]
            height, width = (side * self.scale for side in x.shape[-2:])
            self._hints[index] = control_hint(active.image, width, height, active.unit.resize_mode).to(x.device, x.dtype)
        return self._hints[index]

    def counting(self, on_step: StepCallback) -> StepCallback:
        """``on_step``, keeping count of the steps done."""
        def counted(i: int, total: int, latents: torch.Tensor) -> bool:
            self.step = i + 1
            return on_step(i, total, latents)

        return counted

    def context(self, context: torch.Tensor) -> torch.Tensor | tuple:
        """The UNet's ``encoder_hidden_states`` now: with an IP-Adapter unit active, the text and each IP-Adapter
        unit's image tokens (one row of them for each row of the batch, CFG's other half its own; zeros for a unit
        outside its guidance start and end, which its layers, having no bias, turn into nothing)."""
        adapters = [a for a in self.units if a.embeds is not None]
        if not any(a.unit.active_at(self.step, self.steps) for a in adapters):
            return context
        if self._tokens is None:
            self._tokens = [self._image_tokens(a, context) for a in adapters]
        return context, [tokens if a.unit.active_at(self.step, self.steps) else torch.zeros_like(tokens)
                         for a, tokens in zip(adapters, self._tokens)]

    def _image_tokens(self, active: ActiveUnit, context: torch.Tensor) -> torch.Tensor:
        rows = len(context) // 2 if self.cfg else len(context)
        return image_tokens(active.model, active.embeds, rows, self.cfg, context.device, context.dtype)

    def residuals(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, added: dict | None) -> dict:
        """The UNet's extra keyword arguments for this call: the active ControlNets' residuals summed, the active
        T2I-Adapters' features summed (a new list each call: the UNet pops them) (none: {})."""
        down: list[torch.Tensor] | None = None
        mid: torch.Tensor | None = None
        inside: list[torch.Tensor] | None = None
        for index, active in enumerate(self.units):
            unit = active.unit
            if active.embeds is not None or not unit.active_at(self.step, self.steps):
                continue
            if isinstance(active.model, T2IAdapter):
                if index not in self._features:
                    self._features[index] = adapter_features(active.model, self.hint(index, x), unit.weight)
                features = [f.to(x.dtype).expand(len(x), -1, -1, -1) for f in self._features[index]]
                inside = features if inside is None else [a + b for a, b in zip(inside, features)]
                continue
            half = unit.cond_only and self.cfg  # the conditional half only; the other half gets none
            inputs = (x.chunk(2)[1], context.chunk(2)[1], _cond_half(added)) if half else (x, context, added)
            sample, encoded, conditions = inputs
            sample = sample[:, :active.model.config.in_channels]  # an inpainting UNet's extra channels are its own
            hint = self.hint(index, sample).expand(len(sample), -1, -1, -1)
            union = {} if active.mode is None else _union_inputs(active, sample)
            d, m = active.model(sample, t, encoder_hidden_states=encoded, controlnet_cond=[hint] if union else hint,
                                added_cond_kwargs=conditions, return_dict=False, **union)
            scales = unit.scales(len(d) + 1)
            d, m = [r * s for r, s in zip(d, scales)], m * scales[-1]
            if half:
                d, m = [torch.cat([torch.zeros_like(r), r]) for r in d], torch.cat([torch.zeros_like(m), m])
            down = d if down is None else [a + b for a, b in zip(down, d)]
            mid = m if mid is None else mid + m
        extra = {} if inside is None else {"down_intrablock_additional_residuals": inside}
        if down is None:
            return extra
        return {"down_block_additional_residuals": down, "mid_block_additional_residual": mid, **extra}


def _union_inputs(active: ActiveUnit, sample: torch.Tensor) -> dict:
    """A Union ControlNet's inputs for one image of the unit's control type (xinsir's, as diffusers' pipeline gives
    them): the type as a one-hot row for each batch row, and its index."""
    one_hot = torch.zeros(active.model.config.num_control_type, dtype=sample.dtype, device=sample.device)
    one_hot[active.mode] = 1
    return {"control_type": one_hot.expand(len(sample), -1), "control_type_idx": [active.mode]}


def _cond_half(added: dict | None) -> dict | None:
    return None if added is None else {k: v.chunk(2)[1] for k, v in added.items()}
