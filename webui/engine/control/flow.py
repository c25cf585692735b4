"""Flux and SD3 ControlNets during a transformer's denoising, as diffusers' FluxControlNetPipeline and
StableDiffusion3ControlNetPipeline compute them: the control image encoded by the VAE and laid out as the latents (a
Flux ControlNet with an input hint block, as XLabs', takes the picture itself), each active unit's block samples
scaled by its weight and summed, handed to the transformer; Flux IP-Adapter units' image tokens beside them. The
pipelines sample the image's latent distribution; here its mean is taken, so that the seed's noise is all the
randomness (as img2img's init latents)."""
from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers import SD3ControlNetModel

from webui.engine.control.apply import ActiveUnit, control_hint
from webui.engine.control.ip_adapter import image_tokens


class FlowControls:
    """The units over one denoising pass of ``steps`` steps at ``size`` (width, height): each ControlNet unit's
    control input (``encode_control_inputs``, one row, expanded to the batch at each call); the IP-Adapter units'
    image tokens (made at the first call, CFG's other half first where ``cfg``)."""

    def __init__(self, units: list[ActiveUnit], size: tuple[int, int], steps: int, cfg: bool):
        self.adapters = [active for active in units if active.embeds is not None]
        self.units = [active for active in units if active.embeds is None]
        self.hints, self.steps, self.cfg = [active.encoded[size] for active in self.units], steps, cfg
        self._tokens: list[torch.Tensor] | None = None

    def residuals(self, step: int, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                  pooled: torch.Tensor, inputs: dict) -> dict:
        """The transformer's extra keyword arguments at ``step``: the active ControlNet units' block samples summed,
        the IP-Adapter units' image tokens (None for one outside its guidance start and end) (none: {})."""
        return self._controlnets(step, x, timestep, context, pooled, inputs) | self._image_prompts(step, x)

    def _image_prompts(self, step: int, x: torch.Tensor) -> dict:
        active = [a.unit.active_at(step, self.steps) for a in self.adapters]
        if not any(active):
            return {}
        if self._tokens is None:
            rows = len(x) // 2 if self.cfg else len(x)
            self._tokens = [image_tokens(a.model, a.embeds, rows, self.cfg, x.device, x.dtype) for a in self.adapters]
        return {"joint_attention_kwargs": {"ip_hidden_states": [
            tokens if on else None for tokens, on in zip(self._tokens, active)]}}

    def _controlnets(self, step: int, x: torch.Tensor, timestep: torch.Tensor, context: torch.Tensor,
                     pooled: torch.Tensor, inputs: dict) -> dict:
        blocks = singles = None
        repeat = False
        for index, (active, hint) in enumerate(zip(self.units, self.hints)):
            if not active.unit.active_at(step, self.steps):
                continue
            model, scale = active.model, active.unit.weight
            if hint.device != x.device or hint.dtype != x.dtype:  # once a pass, not every step
                self.hints[index] = hint = hint.to(x.device, x.dtype)
            hint = hint.expand(len(x), *hint.shape[1:])
            if isinstance(model, SD3ControlNetModel):
                text = context if model.context_embedder is not None else None
                pooling = torch.zeros_like(pooled) if model.config.force_zeros_for_pooled_projection else pooled
                b, s = model(hidden_states=x, controlnet_cond=hint, conditioning_scale=scale, timestep=timestep,
                             encoder_hidden_states=text, pooled_projections=pooling, return_dict=False)[0], None
            else:
                guidance = inputs.get("guidance")
                if model.config.guidance_embeds and guidance is None:  # a ControlNet with guidance on a model without
                    guidance = torch.ones(len(x), device=x.device, dtype=torch.float32)
                mode = None if active.mode is None else torch.full((len(x), 1), active.mode, device=x.device)
                b, s = model(hidden_states=x[..., :model.config.in_channels], controlnet_cond=hint,
                             controlnet_mode=mode, conditioning_scale=scale, timestep=timestep,
                             guidance=guidance if model.config.guidance_embeds else None, pooled_projections=pooled,
                             encoder_hidden_states=context, txt_ids=inputs["txt_ids"], img_ids=inputs["img_ids"],
                             return_dict=False)
                repeat = repeat or model.input_hint_block is not None
            blocks, singles = _summed(blocks, b), _summed(singles, s)
        if blocks is None and singles is None:
            return {}
        if isinstance(self.units[0].model, SD3ControlNetModel):
            return {"block_controlnet_hidden_states": list(blocks)}
        return {"controlnet_block_samples": blocks, "controlnet_single_block_samples": singles,
                "controlnet_blocks_repeat": repeat}


def _summed(total: tuple | None, more: tuple | None) -> tuple | None:
    if not more:
        return total
    return more if total is None else tuple(a + b for a, b in zip(total, more))


def encode_control_inputs(units: list[ActiveUnit], width: int, height: int,
                          encode: Callable[[torch.Tensor], torch.Tensor],
                          pack: Callable[[torch.Tensor], torch.Tensor], shift: float, scale: float) -> None:
    """Each unit's control input at ``width`` x ``height``, kept on the unit for the pass (and the batches after it):
    its picture resized by the unit's resize mode, in [-1, 1], encoded (``encode``: pixels to latents as the
    denoiser sees them, with the VAE's ``shift`` and ``scale``) and packed (``pack``); a hint-block ControlNet's, the
    pixels."""
    for active in units:
        if (width, height) in active.encoded or active.embeds is not None:  # (an IP-Adapter's picture: its tokens)
            continue
        pixels = control_hint(active.image, width, height, active.unit.resize_mode) * 2 - 1
        if getattr(active.model, "input_hint_block", None) is not None:
            active.encoded[width, height] = pixels
            continue
        latents = encode(pixels)
        if getattr(active.model.config, "force_zeros_for_pooled_projection", False):  # InstantX's SD3: unshifted
            latents = latents + shift * scale
        active.encoded[width, height] = pack(latents)
