"""LoRA files, in the formats users have, as low-rank updates of our model's modules.

A LoRA holds, per adapted layer, a down matrix (rank x in), an up matrix (out x rank) and optionally
alpha; the layer's weight changes by ``(alpha / rank) * up @ down``. Files differ in how they name layers:

* kohya / A1111 (``lora_unet_…``, ``lora_te1_…``): underscore-joined names of the original checkpoint
  layout (LDM for SD1/SD2/SDXL, Black Forest Labs' for Flux, Stability AI's for SD3) or of diffusers'
  (kohya's diffusers variant, ``lora_transformer_`` for Flux/SD3), with ``.lora_down.weight``,
  ``.lora_up.weight`` and ``.alpha``; text encoders under transformers' names.
* diffusers / PEFT: ``unet.`` or ``transformer.`` (or nothing, or ``base_model.model.``) and
  ``text_encoder.``, ``text_encoder_2.``, ``text_encoder_3.`` before diffusers' names, with
  ``.lora_A.weight``/``.lora_B.weight`` or the older ``.lora.down.weight``/``.lora.up.weight``, and ``.alpha``
  where a file has it (PEFT's own files have none: alpha = rank).
* ComfyUI's: the original names with dots under ``diffusion_model.`` (or ``transformer.``, or bare), text
  encoders under ``text_encoders.clip_l.transformer.`` etc.

Underscore-joined names are ambiguous (module names contain underscores), so a name is never split: it is
looked up among the names our own model's layers have in every layout. Each family gives its table
(``lora.layout``: text encoders, prefixes, and the original layout's names from the loaders' key maps,
``FamilyModel.lora_layers``); which family a LoRA file is for is read here, from evidence across all of
them. Where the original layout fuses layers (Flux's and SD3's q/k/v, Flux's single-block
``linear1`` = q/k/v/mlp), the up matrix's rows are cut at our layers' widths and every part keeps the shared
down matrix and alpha; where it stores a layer's output halves swapped (the final modulation's shift and
scale), the up matrix's halves are swapped back.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from webui.engine.families.registry import Families
from webui.engine.formats.detect import Family
from webui.engine.lora.layout import DENOISER, LoraLayer
from webui.engine.weights.quant import QuantizedLayer, dequantize
from webui.errors import ModelFileError

log = logging.getLogger(__name__)

STYLES = ("kohya", "diffusers", "comfy")
# Layers a LoRA can adapt: ours, and the quantized layers that replace them (fp8 layers subclass them).
ADAPTABLE = (nn.Linear, nn.Conv2d, QuantizedLayer)

# Tensor name endings of a LoRA's parts, in every format.
PARTS = {
    ".lora_down.weight": "down", ".lora_A.weight": "down", ".lora.down.weight": "down",
    ".lora_up.weight": "up", ".lora_B.weight": "up", ".lora.up.weight": "up",
    ".alpha": "alpha",
    ".dora_scale": "dora", ".lora_magnitude_vector": "magnitude", ".lora_magnitude_vector.weight": "magnitude",  # DoRA
    **{f".{part}": part for part in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b", "lokr_w1", "lokr_w1_a",
                                     "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b")},  # LyCORIS LoHa, LoKr
}
# Full-weight differences some LoRAs add for norms and biases (Flux trainers): not low-rank, ignored.
SKIPPED = (".diff", ".diff_b")
# Name parts of LyCORIS algorithms other than LoRA/LoCon/LoHa/LoKr, and of DoRA (a LoRA that also rescales the weight).
UNSUPPORTED = {
    "hada_t": "a LyCORIS LoHa with Tucker decomposition (hada_t1/hada_t2)",
    "lokr_t": "a LyCORIS LoKr with Tucker decomposition (lokr_t2)", "on_input": "a LyCORIS (IA)^3", "oft_": "a LyCORIS OFT",
    "boft_": "a LyCORIS BOFT", "lora_mid": "a LyCORIS LoCon with Tucker decomposition (lora_mid)",
}
_UNSUPPORTED_PART = re.compile(r"(?:^|\.)(" + "|".join(UNSUPPORTED) + ")")


@dataclass
class LoraWeights:
    """One adapted layer's low-rank update: delta W = (alpha / rank) * up @ down."""

    down: torch.Tensor  # (rank, in_features) for Linear; (rank, in_ch, kh, kw) for Conv2d (LoCon)
    up: torch.Tensor  # (out_features, rank); (out_ch, rank, 1, 1) for Conv2d
    alpha: float | None  # None: alpha = rank

    @property
    def rank(self) -> int:
        return self.down.shape[0]

    @property
    def scale(self) -> float:
        return 1.0 if self.alpha is None else self.alpha / self.rank

    def delta(self) -> torch.Tensor:
        """The full weight update in float32, shaped like the layer's weight."""
        delta = self.up.float().flatten(1) @ self.down.float().flatten(1)
        return (delta * self.scale).reshape(self.up.shape[0], *self.down.shape[1:])


@dataclass
class FullDelta:
    """One adapted layer's whole update, as LyCORIS's LoHa and LoKr make it (not low-rank: ``full`` is delta W itself,
    scaled, shaped like the layer's weight)."""

    full: torch.Tensor

    def delta(self) -> torch.Tensor:
        return self.full.float()


def components(family: Family) -> tuple[str, ...]:
    """The components a LoRA of ``family`` may adapt, as keys of ``modules``."""
    return (DENOISER, *(te.component for te in Families()[family].lora_text_encoders))


def weight_shape(module: nn.Module) -> tuple[int, ...]:
    """The shape of a layer's weight as computed, also for quantized layers whose stored bytes differ."""
    return tuple(getattr(module, "weight_shape", None) or module.weight.shape)


def swapped_halves(up: torch.Tensor) -> torch.Tensor:
    """``up`` with the two halves of its rows exchanged (its own inverse)."""
    first, second = up.chunk(2)
    return torch.cat([second, first])


def file_name(style: str, prefix: str, name: str) -> str:
    """A layer's name in a file: kohya joins its dotted name with underscores."""
    return prefix + (name.replace(".", "_") if style == "kohya" else name)


def prefixes(family: Family, component: str, style: str, original: bool) -> tuple[str, ...]:
    """What files of ``style`` put before ``component``'s layer names (in the original layout if ``original``,
    else diffusers'); the first is what ``lora_export`` writes, the others are read too."""
    kind = Families()[family]
    if component != DENOISER:
        te = next(te for te in kind.lora_text_encoders if te.component == component)
        return {"kohya": te.kohya, "diffusers": (f"{component}.",), "comfy": (f"text_encoders.{te.comfy}.transformer.",)
                }[style]
    denoiser = kind.lora_prefixes
    if style == "kohya":
        return denoiser.kohya_original if original else denoiser.kohya_diffusers
    return denoiser.diffusers if style == "diffusers" else denoiser.comfy


def adaptable(model: nn.Module) -> list[str]:
    """The paths of ``model``'s layers a LoRA can adapt."""
    return [name for name, module in model.named_modules() if isinstance(module, ADAPTABLE)]


def layers(family: Family, component: str, paths: Iterable[str], original: bool,
           config: Mapping[str, Any] | None = None) -> dict[str, LoraLayer]:
    """The layers of ``component`` at ``paths`` by dotted name: the original checkpoint's names if ``original``
    (for the denoiser, whose ``config`` they depend on: the family's ``lora_layers``), else diffusers'. Text
    encoders have transformers' names in both (CLIP's under ``text_model.``, as files have them)."""
    if component != DENOISER:
        return {_checkpoint_name(p): LoraLayer(component, (p,)) for p in paths}
    if not original:
        return {p: LoraLayer(component, (p,)) for p in paths}
    return Families()[family].lora_layers(paths, config)


def _checkpoint_name(path: str) -> str:
    """A text encoder layer's name in files: transformers 5 flattens ``CLIPTextModel`` (no ``text_model.``), which
    files keep (``ldm_export.text_state_dict``); T5's and ``CLIPTextModelWithProjection``'s are as they are."""
    return f"text_model.{path}" if path.startswith("encoder.layers.") else path


def _aliases(family: Family, modules: Mapping[str, nn.Module]) -> dict[str, LoraLayer]:
    """Every name a LoRA file may give one of our layers (without the part's suffix) -> that layer."""
    aliases: dict[str, LoraLayer] = {}
    for component in components(family):
        if component not in modules:
            continue
        model = modules[component]
        for original in (True, False) if component == DENOISER else (False,):
            named = layers(family, component, adaptable(model), original, getattr(model, "config", None))
            for style in STYLES:
                for prefix in prefixes(family, component, style, original):
                    aliases.update((file_name(style, prefix, name), layer) for name, layer in named.items())
    return aliases


def _split_key(key: str) -> tuple[str, str | None]:
    """A tensor name -> (the layer's name in the file, "down"/"up"/"alpha"), or (key, None) for other tensors."""
    for suffix, part in PARTS.items():
        if key.endswith(suffix):
            return key[: -len(suffix)], part
    return key, None


# Evidence of a LoRA's family, from names with dots turned into underscores: (pattern, families it fits).
_DENOISER = r"^(?:(?:lora_unet|lora_transformer|lora_flux|unet|transformer|diffusion_model|model_diffusion_model" \
            r"|base_model_model)_)?"
_UNET_ATTENTION = r"(?:input_blocks_\d+_1|middle_block_1|output_blocks_\d+_1|(?:down_blocks_\d+_|up_blocks_\d+_|" \
                  r"mid_block_)attentions_\d+)"
_UNETS = {Family.SD1, Family.SD2, Family.SDXL}
MMDIT = (Family.FLUX, Family.SD3)
_NAME_EVIDENCE = [(re.compile(pattern), frozenset(families)) for pattern, families in (
    (_DENOISER + r"(?:double_blocks|single_blocks|single_transformer_blocks|img_in|txt_in|time_in|vector_in"
     r"|guidance_in|x_embedder(?!_proj)|time_text_embed_guidance)", {Family.FLUX}),
    (_DENOISER + r"(?:joint_blocks|x_embedder_proj|t_embedder|y_embedder|pos_embed|transformer_blocks_\d+_attn2_)",
     {Family.SD3}),
    (_DENOISER + r"(?:transformer_blocks|context_embedder|norm_out|proj_out|time_text_embed|final_layer)", MMDIT),
    # SDXL's first up level has attention, SD1/SD2's first down level; only SDXL stacks transformer blocks.
    (_DENOISER + r"(?:output_blocks_0_1|up_blocks_0_attentions|label_emb|add_embedding)_", {Family.SDXL}),
    (_DENOISER + _UNET_ATTENTION + r"_transformer_blocks_[1-9]", {Family.SDXL}),
    (_DENOISER + r"(?:input_blocks_1_1|down_blocks_0_attentions)_", {Family.SD1, Family.SD2}),
    (_DENOISER + r"(?:input_blocks|middle_block|output_blocks|down_blocks|mid_block|up_blocks|time_embed|conv_in"
     r"|conv_out|out_2)", _UNETS),
    (r"^(?:lora_te2|text_encoder_2|text_encoders_clip_g_transformer)_text_model_", {Family.SDXL, Family.SD3}),
    (r"^(?:lora_te\d?|text_encoder(?:_\d)?|text_encoders_t5xxl_transformer)_encoder_block_", MMDIT),
    (r"^text_encoder_3_", {Family.SD3}),
    (r"^lora_te_", {Family.SD1, Family.SD2, Family.FLUX}),
    (r"^lora_te1_", {Family.SDXL, Family.FLUX, Family.SD3}),
)]
# Real models' widths, as down matrices' inputs: the UNets' cross-attention (their text encoders' width), and
# the MMDiTs' image stream (Flux-dev/schnell; SD3 and SD3.5 Medium, SD3.5 Large).
_WIDTH_EVIDENCE = [(re.compile(_DENOISER + pattern), widths) for pattern, widths in (
    (_UNET_ATTENTION + r"_transformer_blocks_\d+_attn2_to_[kv]$",
     {768: {Family.SD1}, 1024: {Family.SD2}, 2048: {Family.SDXL}}),
    (r"transformer_blocks_\d+_attn_to_q$", {3072: {Family.FLUX}, 1536: {Family.SD3}, 2432: {Family.SD3}}),
)]
# The UNets' attention projections: convolutions in SD1 only.
_UNET_PROJECTION = re.compile(_DENOISER + _UNET_ATTENTION + r"_proj_(?:in|out)$")


def _evidence(state_dict: Mapping[str, torch.Tensor]) -> Iterator[tuple[str, frozenset[Family]]]:
    """(key, the families it fits) for every key that tells something about the LoRA's family."""
    for key, tensor in state_dict.items():
        base, part = _split_key(key)
        name = base.replace(".", "_")
        yield from ((key, families) for pattern, families in _NAME_EVIDENCE if pattern.match(name))
        if part != "down":
            continue
        for pattern, widths in _WIDTH_EVIDENCE:
            if pattern.match(name) and tensor.shape[1] in widths:
                yield key, frozenset(widths[tensor.shape[1]])
        if _UNET_PROJECTION.match(name):
            yield key, frozenset({Family.SD1} if tensor.dim() == 4 else {Family.SD2, Family.SDXL})


def _ruled_out(state_dict: Mapping[str, torch.Tensor]) -> dict[Family, str]:
    """Each family some key of the LoRA does not fit, with the first such key."""
    ruled_out: dict[Family, str] = {}
    for key, families in _evidence(state_dict):
        for family in Family:
            if family not in families:
                ruled_out.setdefault(family, key)
    return ruled_out


def lora_family(state_dict: Mapping[str, torch.Tensor]) -> Family | None:
    """The family a LoRA is for, from its keys and shapes; None when they fit several (or none).

    Names tell Flux and SD3 apart from the UNets (and often from each other), SDXL from SD1/SD2 by which
    levels have attention or stacked transformer blocks, and SD1 from SD2 by shapes (SD1's attention
    projections are convolutions); real models' widths tell all of them apart.
    """
    ruled_out = _ruled_out(state_dict)
    fitting = [family for family in Family if family not in ruled_out]
    return fitting[0] if len(fitting) == 1 else None


def convert_lora(state_dict: Mapping[str, torch.Tensor], family: Family, modules: Mapping[str, nn.Module],
                 filename: str) -> dict[tuple[str, str], LoraWeights | FullDelta]:
    """A LoRA file's tensors as updates of our modules, keyed by (component, module path in that component).

    ``modules`` maps the components of ``components(family)`` to our modules ("denoiser", "text_encoder",
    ...); a component left out cannot be adapted, so LoRA layers for it are refused like any unknown layer.
    Fused layers are split and swapped halves put back in our order (see the module docstring). Tensors are
    kept in the file's dtype (parts of fused layers are views).

    LyCORIS LoHa and LoKr layers become ``FullDelta`` updates (delta W computed once, in float32).
    Ignored, with a log line: ``.diff``/``.diff_b`` full-weight differences. Refused with a ``ModelFileError``:
    LyCORIS algorithms other than LoRA/LoCon/LoHa/LoKr (and DoRA, which becomes a ``FullDelta`` too), and Tucker-decomposed ones; a LoRA for another family; layers that match no module
    of ours or whose shapes do not fit it; a layer missing its down or up matrix.
    """
    _refuse_unsupported(state_dict, filename)
    _check_family(state_dict, family, filename)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown, skipped = [], 0
    for key, tensor in state_dict.items():
        base, part = _split_key(key)
        if part is not None:
            groups.setdefault(base, {})[part] = tensor
        elif key.endswith(SKIPPED):
            skipped += 1
        else:
            unknown.append(key)
    aliases = _aliases(family, modules)
    unknown += [base for base in groups if base not in aliases]
    if unknown:
        raise ModelFileError(
            f"{filename}: {len(unknown)} of this LoRA's layers match no layer of the loaded {family.value} model, "
            f"e.g. {', '.join(unknown[:2])}. The LoRA is for another model, or in a format not supported.")
    out: dict[tuple[str, str], LoraWeights | FullDelta] = {}
    for base, parts in groups.items():
        layer = aliases[base]
        for module, lora in _pieces(base, parts, layer, modules[layer.component], filename):
            if (layer.component, module) in out:
                raise ModelFileError(f"{filename}: this LoRA adapts {layer.component} layer {module} twice "
                                     f"(once as {base}); the file is inconsistent.")
            out[layer.component, module] = lora
    if skipped:
        log.info("%s: ignored %d full-weight difference tensors (.diff/.diff_b), which are not LoRA layers",
                 filename, skipped)
    return out


def _refuse_unsupported(state_dict: Mapping[str, torch.Tensor], filename: str) -> None:
    for key in state_dict:
        if match := _UNSUPPORTED_PART.search(key):
            raise ModelFileError(f"{filename} is {UNSUPPORTED[match[1]]} file (tensors like {key}), which is not "
                                 "supported: LoRA, LoCon, LoHa and LoKr files are. Use one of those versions of it.")


def _check_family(state_dict: Mapping[str, torch.Tensor], family: Family, filename: str) -> None:
    ruled_out = _ruled_out(state_dict)
    fitting = [f.value for f in Family if f not in ruled_out]
    if family in ruled_out and fitting:
        raise ModelFileError(f"{filename}: this LoRA is for {' or '.join(fitting)} (it has {ruled_out[family]}), "
                             f"the loaded model is {family.value}. Load a {' or '.join(fitting)} model to use it.")


def _pieces(base: str, parts: Mapping[str, torch.Tensor], layer: LoraLayer, model: nn.Module,
            filename: str) -> list[tuple[str, LoraWeights | FullDelta]]:
    """One file layer's update for each of our modules it covers, checked against their shapes."""
    if any(part.startswith(("hada_", "lokr_")) for part in parts):
        return _full_pieces(base, parts, layer, model, filename)
    missing = [part for part in ("down", "up") if part not in parts]
    if missing:
        raise ModelFileError(f"{filename}: LoRA layer {base} has no {' or '.join(missing)} matrix; the file is "
                             "incomplete or damaged.")
    down, up = parts["down"], parts["up"]
    if down.numel() == 0 or up.numel() == 0:  # rank 0: its scale alpha / rank divides by zero
        raise ModelFileError(f"{filename}: LoRA layer {base} has an empty down or up matrix; the file is damaged.")
    shapes = [weight_shape(model.get_submodule(m)) for m in layer.modules]
    fits = (down.dim() >= 2 and up.dim() >= 2 and up.shape[1] == down.shape[0] and all(s == 1 for s in up.shape[2:])
            and all(shape[1:] == tuple(down.shape[1:]) for shape in shapes)
            and sum(shape[0] for shape in shapes) == up.shape[0])
    if not fits:
        ours = " + ".join(f"{list(shape)}" for shape in shapes)
        raise ModelFileError(
            f"{filename}: LoRA layer {base} (down {list(down.shape)}, up {list(up.shape)}) does not fit "
            f"{layer.component} {' + '.join(layer.modules)} (weight {ours}). The LoRA is for another model or "
            "variant than the one loaded.")
    alpha = _alpha(base, parts, filename)
    if "dora" in parts or "magnitude" in parts:
        return _dora_pieces(base, parts, LoraWeights(down, up, alpha), layer, model, shapes, filename)
    rows = (swapped_halves(up) if layer.swapped else up).split([shape[0] for shape in shapes])
    return [(module, LoraWeights(down, part, alpha)) for module, part in zip(layer.modules, rows)]


def _dora_pieces(base: str, parts: Mapping[str, torch.Tensor], lora: LoraWeights, layer: LoraLayer,
                 model: nn.Module, shapes: list[tuple[int, ...]], filename: str) -> list[tuple[str, FullDelta]]:
    """A DoRA layer (a LoRA that also sets the weight's magnitude): delta W = m * (W + BA) / ||W + BA|| - W, in
    float32 from the layer's own weight (dequantized), as LyCORIS (``dora_scale``: per input column where it is
    shaped (1, columns, ...), else per output row) and PEFT (``lora_magnitude_vector``: per output row) compute it; the file's
    layout of a fused layer is kept for the norms, then cut for our modules."""
    weight = torch.cat([dense_weight(model.get_submodule(m)).flatten(1) for m in layer.modules])
    if layer.swapped:
        weight = swapped_halves(weight)
    merged = weight + lora.delta().flatten(1).to(weight.device)
    magnitude = parts.get("dora", parts.get("magnitude")).float().to(weight.device)
    shape = (weight.shape[0], *shapes[0][1:])
    by_column = magnitude.dim() >= 2 and magnitude.shape[0] == 1 and magnitude.shape[1] == shape[1]
    if not by_column and magnitude.numel() == shape[0]:  # per output row: PEFT's (rows,), LyCORIS's (rows, 1, ...)
        norm = merged.norm(dim=1)
        scaled = merged * (magnitude.flatten() / norm)[:, None]
    elif by_column:  # per input column (LyCORIS's default: (1, columns, ...)), over every row and the kernel
        merged = merged.view(shape)
        norm = merged.transpose(0, 1).flatten(1).norm(dim=1)
        scaled = (merged * (magnitude.flatten() / norm).view(1, -1, *(1,) * (len(shape) - 2))).flatten(1)
    else:
        raise ModelFileError(f"{filename}: DoRA layer {base} has a magnitude of {magnitude.numel()} values; the layer "
                             f"{list(shape)} needs one per output row or input column. The file is damaged.")
    return _cut(scaled.flatten(1) - weight, layer, shapes)


def dense_weight(layer: nn.Module) -> torch.Tensor:
    """A layer's weight in float32 as it computes with it (a GGUF weight unpacked, an fp8 one upcast and scaled)."""
    if isinstance(layer, QuantizedLayer):
        return dequantize(layer.weight, layer.qtype, layer.weight_shape, torch.float32)
    if getattr(layer, "scale_weight", None) is not None:
        return layer.weight.float() * layer.scale_weight.float()
    return layer.weight.float()


def _full_pieces(base: str, parts: Mapping[str, torch.Tensor], layer: LoraLayer, model: nn.Module,
                 filename: str) -> list[tuple[str, FullDelta]]:
    """A LoHa or LoKr layer's delta W in float32 (as LyCORIS and A1111 compute it), cut for each of our modules."""
    alpha = _alpha(base, parts, filename)
    try:
        if any(part.startswith("hada_") for part in parts):
            w1a, w1b, w2a, w2b = (parts[f"hada_{p}"].float() for p in ("w1_a", "w1_b", "w2_a", "w2_b"))
            delta = (w1a @ w1b.flatten(1)) * (w2a @ w2b.flatten(1))
            rank = w1b.shape[0]
        else:
            w1 = parts["lokr_w1"].float() if "lokr_w1" in parts else parts["lokr_w1_a"].float() @ parts["lokr_w1_b"].float()
            w2 = parts["lokr_w2"].float() if "lokr_w2" in parts else (
                parts["lokr_w2_a"].float() @ parts["lokr_w2_b"].float().flatten(1))
            delta = torch.kron(w1, w2.flatten(1))
            factored = parts.get("lokr_w1_b", parts.get("lokr_w2_b"))
            rank = None if factored is None else factored.shape[0]  # (both whole: alpha is not used)
    except (KeyError, RuntimeError) as e:  # a part missing, or matrices that do not multiply
        raise ModelFileError(f"{filename}: LyCORIS layer {base} is incomplete or its matrices do not fit together "
                             f"({type(e).__name__}: {e}); the file is damaged.") from None
    scale = 1.0 if alpha is None or rank is None else alpha / rank
    shapes = [weight_shape(model.get_submodule(m)) for m in layer.modules]
    columns = math.prod(shapes[0][1:])
    if any(math.prod(s[1:]) != columns for s in shapes) or tuple(delta.shape) != (sum(s[0] for s in shapes), columns):
        raise ModelFileError(
            f"{filename}: LyCORIS layer {base} (delta W {list(delta.shape)}) does not fit {layer.component} "
            f"{' + '.join(layer.modules)} (weight {' + '.join(str(list(s)) for s in shapes)}). The file is for "
            "another model or variant than the one loaded.")
    return _cut(delta * scale, layer, shapes)


def _cut(delta: torch.Tensor, layer: LoraLayer, shapes: list[tuple[int, ...]]) -> list[tuple[str, FullDelta]]:
    """A file layer's whole delta W (its rows in the file's order) as one FullDelta for each of our modules."""
    rows = (swapped_halves(delta) if layer.swapped else delta).split([s[0] for s in shapes])
    return [(module, FullDelta(part.reshape(shape).cpu())) for module, part, shape in zip(layer.modules, rows, shapes)]


def _alpha(base: str, parts: Mapping[str, torch.Tensor], filename: str) -> float | None:
    """The layer's alpha, one number (None: not given)."""
    if "alpha" not in parts:
        return None
    if parts["alpha"].numel() != 1:
        raise ModelFileError(f"{filename}: LoRA layer {base} has {parts['alpha'].numel()} alpha values instead of "
                             "one; the file is damaged.")
    return float(parts["alpha"])
