"""The embedded default model's files: the project's own small SD1.x model of coloured shapes (``webui.demo``),
shipped in ``webui/assets/demo`` (the checkpoint, two LoRAs, a canny ControlNet), and the names of the files derived from it at first
start (``webui.demo.derive``), which then load like any user file."""
from __future__ import annotations

from pathlib import Path

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "demo"
LORA_DIR = ASSETS / "Lora"
DEMO_NAME = "demo-shapes.safetensors"
LORA_NAMES = {"dusk": "demo-dusk.safetensors", "outline": "demo-outline.safetensors"}
CONTROLNET_DIR = ASSETS / "ControlNet"
CONTROLNET_NAME = "demo-canny.safetensors"
DEMO_METADATA = {
    "modelspec.sai_model_spec": "1.0.0", "modelspec.architecture": "stable-diffusion-v1",
    "modelspec.title": "Demo shapes", "modelspec.resolution": "128x128",
    "modelspec.description": "One coloured shape on a plain background, trained by webui.demo.train. "
                             "Prompt like: a large red circle on the left, blue background",
}
STYLE_NAME = "demo-shapes-dusk.safetensors"
GGUF_NAME = "demo-shapes-Q8_0.gguf"
MODULE_NAMES = {"vae": "demo-shapes-vae.safetensors", "clip_l": "demo-shapes-clip_l.safetensors"}
