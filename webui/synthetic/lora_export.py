"""Write LoRA files in the formats users have (the inverse of ``lora_keys.convert_lora``), and make random
LoRAs over our models' layers, for tests and benchmarks."""
from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from webui.engine.formats.detect import Family
from webui.engine.lora.keys import (
    DENOISER,
    LoraWeights,
    adaptable,
    components,
    file_name,
    layers,
    prefixes,
    swapped_halves,
    weight_shape,
)

@dataclass
class LycorisWeights:
    """A LyCORIS LoHa or LoKr layer as its file stores it: its tensors by part name (``hada_w1_a`` ...), and alpha."""

    parts: dict[str, torch.Tensor]
    alpha: float | None = None


@dataclass
class DoraWeights(LoraWeights):
    """A DoRA layer: a LoRA and the weight's magnitude, under LyCORIS's ``dora_scale`` or PEFT's
    ``lora_magnitude_vector``."""

    magnitude: torch.Tensor | None = None
    magnitude_key: str = "dora_scale"


Weights = dict[tuple[str, str], LoraWeights | LycorisWeights]


@dataclass(frozen=True)
class LoraFormat:
    style: str  # which prefixes: "kohya", "diffusers" or "comfy" (``lora_keys.prefixes``)
    original: bool  # the denoiser under the original checkpoint's names (LDM/BFL/Stability), else diffusers'
    down: str
    up: str
    alpha: str  # "always": an .alpha tensor per layer (its rank when None); "given": where set; "baked": into down


FORMATS = {
    "kohya": LoraFormat("kohya", True, "lora_down.weight", "lora_up.weight", "always"),
    "kohya-diffusers-names": LoraFormat("kohya", False, "lora_down.weight", "lora_up.weight", "always"),
    "diffusers": LoraFormat("diffusers", False, "lora_A.weight", "lora_B.weight", "baked"),
    "diffusers-old": LoraFormat("diffusers", False, "lora.down.weight", "lora.up.weight", "given"),
    "comfy": LoraFormat("comfy", True, "lora_A.weight", "lora_B.weight", "given"),
}

# Our module paths each target set of ``random_lora`` adapts (all components, all families).
TARGETS = {
    "attention": re.compile(r"(attn\d?\.(to_[qkv]|to_out\.0|add_[qkv]_proj|to_add_out)|self_attn\.(q|k|v|out)_proj"
                            r"|SelfAttention\.[qkvo]|attentions\.\d+\.proj_(in|out))$"),
    "mlp": re.compile(r"(ff(_context)?\.net\.(0\.proj|2)|mlp\.fc[12]|proj_mlp|single_transformer_blocks\.\d+\.proj_out"
                      r"|DenseReluDense\.w\w+)$"),
    "all": re.compile(""),  # every Linear and Conv2d: LoCon
}


def write_lora(path: str | Path, weights: Weights, family: Family, fmt: str,
               dtype: torch.dtype = torch.float32) -> Path:
    """Write ``weights`` (keyed as ``convert_lora`` returns them) as a ``.safetensors`` LoRA file in ``fmt`` (a key
    of ``FORMATS``), tensors in ``dtype``.

    The original layout's names depend on the model's shape, which is read off the adapted layers' paths
    (``_layout_config``): exact for LoRAs over whole kinds of layers, as ``random_lora`` makes. Layers the
    original layout fuses need all their parts, with one down matrix and alpha. PEFT files have no alpha, so
    there the scale is multiplied into the down matrix.
    """
    form = FORMATS[fmt]
    tensors: dict[str, torch.Tensor] = {}
    written: set[tuple[str, str]] = set()
    for component in components(family):
        paths = [module for owner, module in weights if owner == component]
        if not paths:
            continue
        config = _layout_config(family, paths) if component == DENOISER and form.original else None
        prefix = prefixes(family, component, form.style, form.original)[0]
        for name, layer in layers(family, component, paths, form.original, config).items():
            keys = [(component, module) for module in layer.modules]
            if all(key not in weights for key in keys):
                continue
            if isinstance(weights.get(keys[0]), LycorisWeights):
                if len(keys) > 1 or layer.swapped:
                    raise ValueError(f"{name}: LyCORIS files of fused layers are not written")
                tensors |= _lycoris_tensors(file_name(form.style, prefix, name), weights[keys[0]], dtype)
                written.update(keys)
                continue
            lora = _fused(name, [weights.get(key) for key in keys])
            if layer.swapped:
                lora = LoraWeights(lora.down, swapped_halves(lora.up), lora.alpha)
            tensors |= _tensors(file_name(form.style, prefix, name), lora, form, dtype)
            written.update(keys)
    if weights.keys() - written:
        raise ValueError(f"not layers a {family.value} LoRA adapts: {sorted(weights.keys() - written)[:3]}")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(path))
    return path


_UNET_BLOCK = re.compile(r"(down|up)_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.")
_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks)\.(\d+)\.")


def _layout_config(family: Family, paths: list[str]) -> dict:
    """What the original layout's names of a denoiser depend on, from the paths of its adapted layers.

    Flux: exact. SD3: the last block (whose text stream is pre-only) is taken to be the highest one adapted.
    UNets: the blocks per level are taken from the highest resnet/attention indices adapted, and whether an
    up level has attention (where its upsampler sits) from whether any of its attentions is adapted.
    """
    if family in (Family.FLUX, Family.SD3):
        counts = {kind: 0 for kind in ("transformer_blocks", "single_transformer_blocks")}
        for match in filter(None, map(_BLOCK.match, paths)):
            counts[match[1]] = max(counts[match[1]], int(match[2]) + 1)
        depth = counts["transformer_blocks"]
        return {"num_layers": depth, "num_single_layers": counts["single_transformer_blocks"],
                "guidance_embeds": True, "dual_attention_layers": range(depth), "qk_norm": None}
    blocks = [(kind, int(level), part, int(i)) for kind, level, part, i in
              (m.groups() for m in filter(None, map(_UNET_BLOCK.match, paths)))]
    per_level = max([i + 1 for kind, _, _, i in blocks if kind == "down"]
                    + [i for kind, _, _, i in blocks if kind == "up"], default=1)
    levels = max((level for _, level, _, _ in blocks), default=0) + 2  # one more: every level seen is not the last
    attention = {level for kind, level, part, _ in blocks if kind == "up" and part == "attentions"}
    return {"layers_per_block": per_level, "down_block_types": ["DownBlock2D"] * levels,
            "up_block_types": ["CrossAttnUpBlock2D" if level in attention else "UpBlock2D" for level in range(levels)],
            "addition_embed_type": "text_time" if any(p.startswith("add_embedding.") for p in paths) else None}


def _fused(name: str, parts: list[LoraWeights | None]) -> LoraWeights:
    """The parts of a layer the file stores fused, as one LoRA: their up matrices stacked."""
    first = parts[0]
    if len(parts) == 1 and first is not None:
        return first
    if any(p is None or not torch.equal(p.down, first.down) or p.alpha != first.alpha for p in parts):
        raise ValueError(f"{name} fuses {len(parts)} of our layers: a LoRA for it needs all of them, with one down "
                         "matrix and alpha")
    return LoraWeights(first.down, torch.cat([p.up for p in parts]), first.alpha)


def _tensors(name: str, lora: LoraWeights, form: LoraFormat, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    # Copies: safetensors refuses tensors sharing memory, as the parts of a fused layer do.
    down = lora.down * lora.scale if form.alpha == "baked" else lora.down
    tensors = {f"{name}.{form.down}": down.to(dtype, copy=True), f"{name}.{form.up}": lora.up.to(dtype, copy=True)}
    if form.alpha == "always" or (form.alpha == "given" and lora.alpha is not None):
        tensors[f"{name}.alpha"] = torch.tensor(lora.rank if lora.alpha is None else lora.alpha, dtype=dtype)
    if isinstance(lora, DoraWeights):
        tensors[f"{name}.{lora.magnitude_key}"] = lora.magnitude.to(dtype, copy=True)
    return {k: v.contiguous() for k, v in tensors.items()}


def _lycoris_tensors(name: str, lora: LycorisWeights, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    tensors = {f"{name}.{part}": tensor.to(dtype, copy=True).contiguous() for part, tensor in lora.parts.items()}
    if lora.alpha is not None:
        tensors[f"{name}.alpha"] = torch.tensor(lora.alpha, dtype=dtype)
    return tensors


def random_lycoris(modules: Mapping[str, nn.Module], family: Family, kind: str, rank: int,
                   targets: str = "attention+mlp", seed: int = 0, alpha: float | None = None) -> Weights:
    """A random LyCORIS file's layers over our unfused layers that ``targets`` picks: ``kind`` "loha" (two rank
    ``rank`` pairs), "lokr" (a whole 2x2 or 1x1 first factor and a second one of rank ``rank``) or "lokr-full" (both
    factors whole). Convolutions as LyCORIS stores them (the second matrices flattened over the kernel)."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) / math.sqrt(shape[-1])

    out: Weights = {}
    for component, model, layer in _targeted(modules, family, targets):
        if len(layer.modules) == 1 and not layer.swapped:
            rows, *fan_in = weight_shape(model.get_submodule(layer.modules[0]))
            columns = math.prod(fan_in)
            if kind == "loha":
                parts = {"hada_w1_a": randn(rows, rank), "hada_w1_b": randn(rank, columns),
                         "hada_w2_a": randn(rows, rank), "hada_w2_b": randn(rank, columns)}
            else:
                split = 2 if rows % 2 == 0 and fan_in[0] % 2 == 0 else 1  # the first factor's side
                second = (rows // split, columns // split)
                parts = {"lokr_w1": randn(split, split)}
                parts |= ({"lokr_w2": randn(*second)} if kind == "lokr-full" else
                          {"lokr_w2_a": randn(second[0], rank), "lokr_w2_b": randn(rank, second[1])})
            out[component, layer.modules[0]] = LycorisWeights(parts, alpha)
    return out


def _targeted(modules: Mapping[str, nn.Module], family: Family, targets: str):
    """(component, its module, layer) for each layer of ``modules`` that ``targets`` picks."""
    patterns = [TARGETS[t] for t in targets.split("+")]
    for component in components(family):
        if component not in modules:
            continue
        model = modules[component]
        for layer in layers(family, component, adaptable(model), True, getattr(model, "config", None)).values():
            if any(p.search(m) for p in patterns for m in layer.modules):
                yield component, model, layer


def random_lora(modules: Mapping[str, nn.Module], family: Family, rank: int, targets: str = "attention+mlp",
                seed: int = 0, alpha: float | None = None) -> Weights:
    """A random float32 LoRA of ``rank`` over our layers that ``targets`` ("+"-joined keys of ``TARGETS``) picks, in
    every component of ``modules``.

    Layers the original layout fuses (Flux's and SD3's q/k/v, with proj_mlp in Flux's single blocks) are
    adapted together with one down matrix, so that every format of ``write_lora`` holds this LoRA exactly.
    """
    generator = torch.Generator().manual_seed(seed)
    out: Weights = {}
    for component, model, layer in _targeted(modules, family, targets):
        shapes = [weight_shape(model.get_submodule(m)) for m in layer.modules]
        fan_in = shapes[0][1:]
        down = torch.randn(rank, *fan_in, generator=generator) / math.sqrt(math.prod(fan_in))
        for module, shape in zip(layer.modules, shapes):
            up = torch.randn(shape[0], rank, *(1,) * (len(shape) - 2), generator=generator) / math.sqrt(rank)
            out[component, module] = LoraWeights(down, up, alpha)
    return out
