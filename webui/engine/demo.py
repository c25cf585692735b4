"""The embedded default model: a tiny SD1.x checkpoint the project makes itself.

It is written once, as an A1111 single-file checkpoint, into the built-in models folder and
then loaded like any user file. Its weights are random (a fixed seed), so it draws noise-like
pictures; it lets a fresh install generate with no download at all.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path

import torch

DEMO_NAME = "demo-sd15-tiny.safetensors"
DEMO_SEED = 0
log = logging.getLogger(__name__)


def ensure_demo_checkpoint(folder: Path) -> Path:
    """The demo checkpoint's path, writing it first if it is not there yet."""
    path = folder / DEMO_NAME
    if path.is_file():
        return path
    from webui.engine.ldm_export import write_a1111_checkpoint
    from webui.engine.synthetic import build_synthetic_model

    folder.mkdir(parents=True, exist_ok=True)
    log.info("Writing the built-in demo model to %s", path)
    model = build_synthetic_model("sd1", "tiny", seed=DEMO_SEED)
    tmp = path.with_suffix(".tmp")
    write_a1111_checkpoint(tmp, model, dtype=torch.float16)
    os.replace(tmp, path)
    return path
