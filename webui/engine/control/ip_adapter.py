"""IP-Adapter (SD1.x, SD2.x, SDXL; Flux: XLabs') as a ControlNet unit, as sd-webui-controlnet and Forge run it: the
unit's picture through a CLIP vision encoder of ``models/clip_vision``, projected into image tokens that every
cross-attention layer (Flux: every double block's attention) attends to beside the text, scaled by the unit's weight
(several units: each one's tokens and layers side by side). The layers are diffusers' own (its IP-Adapter loaders
build them from the file); they are not put inside the denoiser: a thin processor stands in for each attention's
while a job uses them, and they are a memory-manager component of their own, placed with the denoiser."""
from __future__ import annotations

import re
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from diffusers.models.embeddings import ImageProjection
from PIL import Image
from torch import nn
from transformers import CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection

from webui.engine.formats.detect import Family, block_count
from webui.engine.formats.files import find_files, load_state_dict, read_tensor_infos
from webui.engine.loading.load import build_module
from webui.errors import ModelFileError, UserError

IMAGE_PROJ, LAYERS = "image_proj.", "ip_adapter."
# XLabs' Flux IP-Adapter: its projection's prefix, and its layers' names (diffusers' Flux loader renames both)
XLABS_IMAGE_PROJ = "ip_adapter_proj_model."
XLABS_LAYER = re.compile(r"double_blocks\.(\d+)\.processor\.ip_adapter_double_stream_([kv])_proj\.(weight|bias)")
FAMILY_OF_CONTEXT = {768: Family.SD1, 1024: Family.SD2, 2048: Family.SDXL}  # its cross-attention's text width
CLIP_VISION_SUFFIXES = (".safetensors", ".pth", ".bin")
CLIP_VISION_HEADS = 16  # ViT-H/14's and ViT-bigG/14's attention heads (no tensor's shape tells them)
IMAGE_ENCODER_ACTIVATION = 512 * 1024 * 1024  # room the CLIP vision encoder runs in: a 224² picture, at most bigG


def is_ip_adapter(keys) -> bool:
    return (any(k.startswith(IMAGE_PROJ) for k in keys) and any(k.startswith(LAYERS) for k in keys)
            or any(k.startswith(XLABS_IMAGE_PROJ) for k in keys) and any(map(XLABS_LAYER.fullmatch, keys)))


def adapter_keys(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An IP-Adapter's tensors under the ``image_proj.``/``ip_adapter.N.`` names (XLabs' renamed as diffusers'
    Flux loader renames them)."""
    renamed = {}
    for key, tensor in state_dict.items():
        if key.startswith(XLABS_IMAGE_PROJ):
            key = IMAGE_PROJ + key.removeprefix(XLABS_IMAGE_PROJ)
        elif match := XLABS_LAYER.fullmatch(key):
            key = f"{LAYERS}{match.group(1)}.to_{match.group(2)}_ip.{match.group(3)}"
        renamed[key] = tensor
    return renamed


def for_flux(state_dict: dict[str, torch.Tensor]) -> bool:
    """Flux's IP-Adapter layers have biases (the UNets' have none), numbered from 0 (the UNets' odd numbers)."""
    return f"{LAYERS}0.to_k_ip.bias" in state_dict


def text_width(state_dict: dict[str, torch.Tensor]) -> int:
    """The width of the text an IP-Adapter's layers attend beside (what its image tokens are made as wide as)."""
    return next(v.shape[1] for k, v in state_dict.items() if k.startswith(LAYERS) and k.endswith("to_k_ip.weight"))


def ip_adapter_family(state_dict: dict[str, torch.Tensor]) -> Family:
    """The family an IP-Adapter is for, by its layers' kind and the width of the text they attend to."""
    if for_flux(state_dict):
        return Family.FLUX
    context = text_width(state_dict)
    if context not in FAMILY_OF_CONTEXT:
        raise ModelFileError(f"This IP-Adapter attends to {context}-wide text, which no SD1.x, SD2.x or SDXL UNet has.")
    return FAMILY_OF_CONTEXT[context]


class IPAdapter(nn.Module):
    """The image projection and the attention layers of one IP-Adapter file (``adapter_keys``' names), made for
    ``denoiser`` (by diffusers' loaders, which read nothing from it but its config and processor names)."""

    def __init__(self, state_dict: dict[str, torch.Tensor], denoiser: nn.Module, dtype: torch.dtype):
        super().__init__()
        split = {"image_proj": {k[len(IMAGE_PROJ):]: v for k, v in state_dict.items() if k.startswith(IMAGE_PROJ)},
                 "ip_adapter": {k[len(LAYERS):]: v for k, v in state_dict.items() if k.startswith(LAYERS)}}
        self.image_proj = denoiser._convert_ip_adapter_image_proj_to_diffusers(split["image_proj"],
                                                                               low_cpu_mem_usage=False)
        processors = denoiser._convert_ip_adapter_attn_to_diffusers([split], low_cpu_mem_usage=False)
        self.names = [name for name, processor in processors.items() if isinstance(processor, nn.Module)]
        self.layers = nn.ModuleList(processors[name] for name in self.names)
        # diffusers' Flux pipeline gives CFG's other half a black picture's embedding (its UNet pipelines zeros)
        self.black_negative = for_flux(state_dict)
        self.to(dtype).requires_grad_(False).eval()

    @property
    def wants_hidden_states(self) -> bool:
        """Plus models project the encoder's last-but-one hidden states; the plain ones its image embedding."""
        return not isinstance(self.image_proj, ImageProjection)

    @property
    def embedding_width(self) -> int:
        first = next(p for p in self.image_proj.parameters() if p.dim() == 2)
        return first.shape[1]


class StandIn:
    """A cross-attention's processor while an IP-Adapter is in use: the adapter's layer where the UNet is given image
    tokens beside the text (a tuple), the usual processor otherwise. Not a module, so the UNet's own weights and
    the memory manager's view of them stay as they were."""

    def __init__(self, usual: Any, layer: nn.Module):
        self.usual, self.layer = usual, layer

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kwargs):
        if isinstance(encoder_hidden_states, tuple):
            return self.layer(attn, hidden_states, encoder_hidden_states, attention_mask, temb)
        return self.usual(attn, hidden_states, encoder_hidden_states, attention_mask, temb, **kwargs)


class TransformerStandIn:
    """A Flux double block's attention processor while an IP-Adapter is in use: the adapter's layer where the
    transformer is given image tokens (``ip_hidden_states``, one entry for each unit: None for a unit outside its
    guidance start and end, which then adds exactly nothing), the usual processor otherwise."""

    def __init__(self, usual: Any, layer: nn.Module):
        self.usual, self.layer, self.weights = usual, layer, list(layer.scale)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, image_rotary_emb=None,
                 ip_hidden_states: list[torch.Tensor | None] | None = None):
        if ip_hidden_states is None:
            return self.usual(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb)
        some = next(tokens for tokens in ip_hidden_states if tokens is not None)
        self.layer.scale = [0.0 if tokens is None else w for w, tokens in zip(self.weights, ip_hidden_states)]
        tokens = [torch.zeros_like(some) if t is None else t for t in ip_hidden_states]
        return self.layer(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                          ip_hidden_states=tokens)


@contextmanager
def adapter_in(unet: nn.Module, units: list) -> Iterator[None]:
    """The layers of the IP-Adapter units among ``units`` (ActiveUnits) at work in ``unet`` for the block, each at its
    unit's weight; the usual processors back after. Several units share one processor a layer, as diffusers'
    multi-adapter processors do (their layers side by side, in the units' order, the image tokens a list)."""
    adapters = [a for a in units if isinstance(a.model, IPAdapter)]
    if not adapters:
        yield
        return
    modules = dict(unet.named_modules())
    attentions = [modules[name.removesuffix(".processor")] for name in adapters[0].model.names]
    usual = [attention.processor for attention in attentions]
    layers = [_joined([a.model.layers[i] for a in adapters], [a.unit.weight for a in adapters])
              for i in range(len(attentions))]
    stand_in = TransformerStandIn if adapters[0].model.black_negative else StandIn
    try:
        for attention, processor, layer in zip(attentions, usual, layers):
            attention.set_processor(stand_in(processor, layer))
        yield
    finally:
        for attention, processor in zip(attentions, usual):
            attention.set_processor(processor)


def image_tokens(adapter: IPAdapter, embeds: tuple[torch.Tensor, torch.Tensor], rows: int, cfg: bool,
                 device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """An IP-Adapter unit's image tokens for ``rows`` images (``embeds``: CFG's other half's, the picture's): with
    ``cfg``, ``rows`` of the other half's first."""
    uncond, cond = (adapter.image_proj(e.to(device, dtype)) for e in embeds)
    return torch.cat(([uncond] * rows if cfg else []) + [cond] * rows)


def _joined(layers: list[nn.Module], scales: list[float]) -> nn.Module:
    """One processor over several adapters' layers for one attention (the first's class, sharing their weights)."""
    first = layers[0]
    joined = type(first)(first.hidden_size, first.cross_attention_dim, num_tokens=(), scale=[])
    if hasattr(first, "num_tokens"):  # (the UNets' processors cut the tokens by it; Flux's take a list)
        joined.num_tokens = [n for layer in layers for n in layer.num_tokens]
    joined.scale = list(scales)
    joined.to_k_ip = nn.ModuleList(m for layer in layers for m in layer.to_k_ip)
    joined.to_v_ip = nn.ModuleList(m for layer in layers for m in layer.to_v_ip)
    return joined


def clip_vision_config(infos: dict[str, Any]) -> CLIPVisionConfig:
    """A CLIP vision encoder's config from its tensor shapes (transformers' layout, as ComfyUI's and Forge's
    ``models/clip_vision`` files have it)."""
    hidden, _, patch, _ = infos["vision_model.embeddings.patch_embedding.weight"].shape
    positions = infos["vision_model.embeddings.position_embedding.weight"].shape[0]
    return CLIPVisionConfig(
        hidden_size=hidden, patch_size=patch, image_size=int((positions - 1) ** 0.5) * patch,
        intermediate_size=infos["vision_model.encoder.layers.0.mlp.fc1.weight"].shape[0],
        num_hidden_layers=block_count(infos, "vision_model.encoder.layers"), num_attention_heads=CLIP_VISION_HEADS,
        projection_dim=infos["visual_projection.weight"].shape[0], hidden_act="gelu", layer_norm_eps=1e-5)


class ClipVisionEncoders:
    """The CLIP vision encoders of ``models/clip_vision``: the one an IP-Adapter needs is the one whose output is as
    wide as the adapter takes (the projection for plain adapters, the hidden states for Plus ones); the last one
    used is kept in host memory."""

    def __init__(self, folder: Path):
        self.folder = folder
        self._loaded: tuple[Path, CLIPVisionModelWithProjection] | None = None

    def for_adapter(self, adapter: IPAdapter, dtype: torch.dtype, field: str) -> CLIPVisionModelWithProjection:
        width = adapter.embedding_width
        files = find_files(self.folder, CLIP_VISION_SUFFIXES) if self.folder.is_dir() else []
        if self._loaded is not None and self._loaded[0] in files and self._width(self._loaded[1], adapter) == width:
            return self._loaded[1].to(dtype)
        for path in files:  # their headers tell the widths; only the one that fits is read (a pickle has no header)
            tensors = None if path.suffix.lower() == ".safetensors" else load_state_dict(path)
            infos = read_tensor_infos(path)[0] if tensors is None else tensors
            if "visual_projection.weight" not in infos:
                continue
            config = clip_vision_config(infos)
            if (config.hidden_size if adapter.wants_hidden_states else config.projection_dim) == width:
                self._loaded = None
                tensors = load_state_dict(path) if tensors is None else tensors
                model = build_module(CLIPVisionModelWithProjection, config, tensors, path.name, dtype)
                self._loaded = path, model.requires_grad_(False).eval()
                return self._loaded[1]
        raise UserError(f"this IP-Adapter needs a CLIP vision encoder with {width}-wide output in {self.folder} "
                        "(ViT-H/14 for most SD1.5 and SDXL ones, ViT-bigG/14 for the other SDXL ones); there is none",
                        field=field)

    @staticmethod
    def _width(model: CLIPVisionModelWithProjection, adapter: IPAdapter) -> int:
        return model.config.hidden_size if adapter.wants_hidden_states else model.config.projection_dim


def image_embeddings(encoder: CLIPVisionModelWithProjection, adapter: IPAdapter, image, device: torch.device
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The picture's embedding as the adapter takes it, and the one CFG's other half gets (diffusers' pipelines':
    zeros, a Plus model's encoding of zero pixels, a Flux adapter's encoding of a black picture), both on the CPU."""
    size = encoder.config.image_size
    processor = CLIPImageProcessor(size={"shortest_edge": size}, crop_size={"height": size, "width": size})
    dtype = next(encoder.parameters()).dtype
    pixels = processor(images=image.convert("RGB"), return_tensors="pt").pixel_values.to(device, dtype)
    with torch.no_grad():
        if adapter.wants_hidden_states:
            embeds = encoder(pixels, output_hidden_states=True).hidden_states[-2]
            uncond = encoder(torch.zeros_like(pixels), output_hidden_states=True).hidden_states[-2]
        else:
            embeds = encoder(pixels).image_embeds
            uncond = torch.zeros_like(embeds)
            if adapter.black_negative:
                black = processor(images=Image.new("RGB", image.size), return_tensors="pt").pixel_values
                uncond = encoder(black.to(device, dtype)).image_embeds
    return uncond.float().cpu(), embeds.float().cpu()
