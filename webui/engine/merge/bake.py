"""LoRAs as updates of an A1111 checkpoint's own tensors (LDM/SGM names), so the merger bakes them in as it writes
each tensor, without loading the model.

The LoRA file is read as the app reads it online (``lora.keys.convert_lora``, LyCORIS LoHa/LoKr and LoCon too) against
the checkpoint's modules built empty (no weights: only their names and shapes), and each update is put on the
checkpoint tensor that holds that layer: the UNet's through the LDM key map, OpenAI CLIP's under its prefix,
OpenCLIP's (SD2.x, SDXL's second encoder) on its fused attention projection, the rows of q, k or v. SD1.x, SD2.x and
SDXL checkpoints take LoRAs here; a DoRA layer needs the layer's own weight and is refused.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import init_empty_weights
from diffusers import UNet2DConditionModel
from torch import nn
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from webui.engine.families.registry import Families
from webui.engine.formats.detect import UNET, Family, ModelArch, TextEncoderArch
from webui.engine.formats.files import TensorInfo, load_state_dict
from webui.engine.formats.ldm_keys import unet_ldm_names
from webui.engine.lora.keys import DENOISER, convert_lora
from webui.errors import ModelFileError, UserError

BAKED_FAMILIES = (Family.SD1, Family.SD2, Family.SDXL)
_OPEN_CLIP = {"self_attn.out_proj": "attn.out_proj", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj"}
_QKV = ("q_proj", "k_proj", "v_proj")


@dataclass(frozen=True)
class Update:
    """A weighted full update of a checkpoint tensor, or of some of its rows (a fused projection's q, k or v)."""

    delta: torch.Tensor  # float32, shaped like the rows it updates
    weight: float
    rows: slice | None = None

    def apply(self, tensor: torch.Tensor) -> None:
        """Add the update to ``tensor`` (float32, in place)."""
        target = tensor if self.rows is None else tensor[self.rows]
        target += self.weight * self.delta.reshape(target.shape)


def lora_updates(loras: list[tuple[Path, float]], arch: ModelArch, infos: dict[str, TensorInfo]
                 ) -> dict[str, list[Update]]:
    """Each checkpoint tensor's updates from ``loras`` (files and weights); UserError naming a LoRA that does not fit
    the checkpoint."""
    if arch.family not in BAKED_FAMILIES:
        raise UserError(f"LoRAs are baked into SD1.x, SD2.x and SDXL checkpoints; this is {arch.family.value}: use the "
                        "LoRA in the prompt instead", field="loras")
    modules = _empty_modules(arch)
    where = _locator(arch, modules["denoiser"], infos)
    updates: dict[str, list[Update]] = {}
    for path, weight in loras:
        try:
            converted = convert_lora(load_state_dict(path), arch.family, modules, path.name)
        except ModelFileError as e:
            raise UserError(e.message, field="loras") from e
        for (component, module_path), update in converted.items():
            delta = update.delta()
            if delta.is_meta:
                raise UserError(f"{path.name} has DoRA layers, which need the layers' own weights: use it in the prompt "
                                "instead of baking it", field="loras")
            key, rows = where(component, module_path)
            updates.setdefault(key, []).append(Update(delta, weight, rows))
    return updates


def _empty_modules(arch: ModelArch) -> dict[str, nn.Module]:
    """The checkpoint's UNet and CLIPs without weights, under the components' names LoRA files are read against."""
    with init_empty_weights():
        modules: dict[str, nn.Module] = {DENOISER: UNet2DConditionModel(**arch.unet)}
        for slot, enc in zip(Families()[arch.family].lora_text_encoders, arch.text_encoders):
            cls = CLIPTextModelWithProjection if enc.with_projection else CLIPTextModel
            modules[slot.component] = cls(CLIPTextConfig(**enc.config))
    return modules


def _locator(arch: ModelArch, unet: nn.Module, infos: dict[str, TensorInfo]):
    """(component, module path) -> (checkpoint key, rows) for this checkpoint."""
    unet_names = unet_ldm_names([name for name, _ in unet.named_parameters()], arch.unet)
    encoders = dict(zip((slot.component for slot in Families()[arch.family].lora_text_encoders), arch.text_encoders))

    def where(component: str, module_path: str) -> tuple[str, slice | None]:
        if component == DENOISER:
            return UNET + unet_names[f"{module_path}.weight"], None
        enc = encoders[component]
        found = _open_clip_key(enc, module_path) if enc.kind == "open_clip" else next(
            ((key, None) for key in (f"{enc.prefix}text_model.{module_path}.weight", f"{enc.prefix}{module_path}.weight")
             if key in infos), None)
        if found is None or found[0] not in infos:
            raise UserError(f"no tensor of this checkpoint holds the text encoder layer {module_path}", field="loras")
        return found

    return where


def _open_clip_key(enc: TextEncoderArch, module_path: str) -> tuple[str, slice | None] | None:
    match = re.fullmatch(r"(?:text_model\.)?encoder\.layers\.(\d+)\.(.+)", module_path)
    if match is None:
        return None
    block, rest = f"{enc.prefix}transformer.resblocks.{match.group(1)}.", match.group(2)
    if rest in _OPEN_CLIP:
        return f"{block}{_OPEN_CLIP[rest]}.weight", None
    part = rest.removeprefix("self_attn.")
    if part in _QKV:
        width = enc.config["hidden_size"]
        index = _QKV.index(part)
        return f"{block}attn.in_proj_weight", slice(index * width, (index + 1) * width)
    return None
