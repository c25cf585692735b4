"""SD1.x and SD2.x: a UNet over 4-channel latents and one CLIP (OpenAI's CLIP-L for SD1.x, OpenCLIP ViT-H for
SD2.x, which may predict v without saying so). Generating with them is the same; their files differ
(``formats.detect``), and so do the names LoRA files give SD2.x's text encoder."""
from __future__ import annotations

import torch

from webui.engine.families.base import UNetFamily
from webui.engine.formats.detect import Family
from webui.engine.lora.layout import LoraTextEncoder
from webui.engine.weights.fp8 import compute_dtype


class StableDiffusion(UNetFamily):
    family = Family.SD1
    activation_per_pixel = 21_000
    latent_rgb = ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                   [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0])
    lora_text_encoders = (LoraTextEncoder("text_encoder", "clip_l", ("lora_te_",)),)


class StableDiffusion2(StableDiffusion):
    family = Family.SD2
    lora_text_encoders = (LoraTextEncoder("text_encoder", "clip_h", ("lora_te_",)),)

    def prediction_type(self, unet: torch.nn.Module, declared: str) -> str:
        """SD2's 768 models predict v and most files do not say: where a file says nothing, A1111's test."""
        return "v_prediction" if declared == "epsilon" and _predicts_v(unet) else declared


@torch.no_grad()
def _predicts_v(unet: torch.nn.Module) -> bool:
    """A1111's test for SD2 files that do not say: a v-model's output at t=999 sits far below the input."""
    dtype = compute_dtype(unet)
    x = torch.full((1, unet.config.in_channels, 8, 8), 0.5, dtype=dtype)
    context = torch.zeros(1, 77, unet.config.cross_attention_dim, dtype=dtype)
    out = unet(x, torch.tensor([999]), encoder_hidden_states=context).sample.float()
    return bool((out - x).mean() < -1)
