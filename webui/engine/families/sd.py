"""SD1.x and SD2.x: a UNet over 4-channel latents and one CLIP (OpenAI's CLIP-L for SD1.x, OpenCLIP ViT-H for
SD2.x, which may predict v). Their files differ (``formats.detect``); generating with them does not."""
from __future__ import annotations

from webui.engine.families.base import UNetFamily
from webui.engine.formats.detect import Family


class StableDiffusion(UNetFamily):
    families = (Family.SD1, Family.SD2)
    activation_per_pixel = 66_000
    latent_rgb = ([[0.3512, 0.2297, 0.3227], [0.3250, 0.4974, 0.2350],
                   [-0.2829, 0.1762, 0.2721], [-0.2120, -0.2616, -0.7177]], [0.0, 0.0, 0.0])
