"""IP-Adapter files and CLIP vision encoders with random values, in the layouts users have (the IP-Adapter's
``image_proj.``/``ip_adapter.N.`` keys, XLabs' for Flux; transformers' ``vision_model.``/``visual_projection`` keys,
as ComfyUI's and Forge's ``models/clip_vision`` files): the tests' tiny models."""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn
from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

from webui.engine.control.ip_adapter import CLIP_VISION_HEADS


def write_clip_vision(path: Path, hidden: int = 64, layers: int = 2, image_size: int = 32, patch: int = 8,
                      projection: int = 24, seed: int = 0) -> CLIPVisionModelWithProjection:
    """A CLIP vision encoder with a projection (as ViT-H/14's, tiny), written as a ``.safetensors`` file."""
    config = CLIPVisionConfig(hidden_size=hidden, intermediate_size=hidden * 2, num_hidden_layers=layers,
                              num_attention_heads=CLIP_VISION_HEADS, image_size=image_size, patch_size=patch,
                              projection_dim=projection, hidden_act="gelu", layer_norm_eps=1e-5)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = CLIPVisionModelWithProjection(config).eval()
    path.parent.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, path)
    return model


def ip_adapter_state(unet: nn.Module, embedding: int, tokens: int = 4, seed: int = 0) -> dict[str, torch.Tensor]:
    """A plain IP-Adapter for ``unet`` taking ``embedding``-wide image embeddings: its projection to ``tokens`` text
    tokens, and a key and value layer for every cross-attention, numbered as the released files number them (1, 3, 5
    …, in the UNet's processor order)."""
    generator = torch.Generator().manual_seed(seed)
    context = unet.config.cross_attention_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    state = {"image_proj.proj.weight": rand(tokens * context, embedding), "image_proj.proj.bias": rand(tokens * context),
             "image_proj.norm.weight": 1 + rand(context), "image_proj.norm.bias": rand(context)}
    modules = dict(unet.named_modules())
    cross = [name for name in unet.attn_processors if name.endswith("attn2.processor")]
    for number, name in zip(range(1, 2 * len(cross), 2), cross):
        inner = modules[name.removesuffix(".processor")].to_q.in_features
        state |= {f"ip_adapter.{number}.to_k_ip.weight": rand(inner, context),
                  f"ip_adapter.{number}.to_v_ip.weight": rand(inner, context)}
    return state


def flux_ip_adapter_state(transformer: nn.Module, embedding: int, tokens: int = 4, seed: int = 0
                          ) -> dict[str, torch.Tensor]:
    """A Flux IP-Adapter for ``transformer`` in XLabs' layout (``ip_adapter_proj_model.``, and a key and value layer
    with biases for each double block's attention: ``double_blocks.N.processor.ip_adapter_double_stream_k_proj``),
    taking ``embedding``-wide image embeddings (CLIP ViT-L/14's 768 in XLabs' own)."""
    generator = torch.Generator().manual_seed(seed)
    config = transformer.config
    context, inner = config.joint_attention_dim, config.num_attention_heads * config.attention_head_dim

    def rand(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator) * 0.1

    state = {"ip_adapter_proj_model.proj.weight": rand(tokens * context, embedding),
             "ip_adapter_proj_model.proj.bias": rand(tokens * context),
             "ip_adapter_proj_model.norm.weight": 1 + rand(context), "ip_adapter_proj_model.norm.bias": rand(context)}
    for block in range(config.num_layers):
        for kind in "kv":
            name = f"double_blocks.{block}.processor.ip_adapter_double_stream_{kind}_proj"
            state |= {f"{name}.weight": rand(inner, context), f"{name}.bias": rand(inner)}
    return state
