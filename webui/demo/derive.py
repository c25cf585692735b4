"""The embedded demo model's derived files, written at first start (where the server starts, before the engine):
a second checkpoint in another style (the base with its "dusk" LoRA merged in) and the GGUF Q8_0 twin of its UNet,
with the VAE and text encoder files that a GGUF UNet needs beside it. They use the checkpoint writers, which the
engine itself never imports."""
from __future__ import annotations

import logging
import os
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
from gguf import GGMLQuantizationType as Q
from safetensors.torch import load_file

from webui.engine.families.registry import Families
from webui.engine.formats.detect import Family
from webui.engine.formats.files import CheckpointInfo
from webui.engine.formats.ldm_keys import unet_to_ldm
from webui.engine.loading.demo import (ASSETS, DEMO_METADATA, DEMO_NAME, GGUF_NAME, LORA_DIR, LORA_NAMES, MODULE_NAMES,
                                       STYLE_NAME)
from webui.engine.loading.load import LoadedModel, load_model
from webui.engine.lora.keys import DENOISER, convert_lora
from webui.engine.weights.gguf_load import quantize_where_possible, write_gguf
from webui.synthetic.builders import SyntheticModel
from webui.synthetic.ldm_export import write_a1111_checkpoint, write_clip_file, write_vae_file

log = logging.getLogger(__name__)


def ensure_demo_models(models_dir: Path, modules_dir: Path) -> None:
    """Put the built-in checkpoints in ``models_dir`` and the GGUF twin's VAE and text encoder in ``modules_dir``,
    making those not there yet (a few seconds, once per install). Each file is written whole or not at all."""
    base = models_dir / DEMO_NAME
    wanted = [base, models_dir / STYLE_NAME, models_dir / GGUF_NAME, *(modules_dir / n for n in MODULE_NAMES.values())]
    if base.is_file() and _signature(base) != _signature(ASSETS / DEMO_NAME):
        for path in wanted:  # made from another version of the shipped model
            path.unlink(missing_ok=True)
    if all(path.is_file() for path in wanted):
        return
    models_dir.mkdir(parents=True, exist_ok=True)
    modules_dir.mkdir(parents=True, exist_ok=True)
    _atomic(base, lambda tmp: shutil.copy2(ASSETS / DEMO_NAME, tmp))  # its time too: see _signature
    log.info("Writing the built-in demo models (its dusk style and its GGUF Q8_0 twin) to %s", models_dir)
    model = load_checkpoint(base)
    unet, vae, text = model.denoiser, model.vae, model.text_encoders[0].model
    _atomic(modules_dir / MODULE_NAMES["vae"], lambda tmp: write_vae_file(tmp, vae, torch.float16))
    _atomic(modules_dir / MODULE_NAMES["clip_l"], lambda tmp: write_clip_file(tmp, text, torch.float16, False))
    ldm_unet = unet_to_ldm(unet.state_dict(), unet.config)
    _atomic(models_dir / GGUF_NAME, lambda tmp: write_gguf(tmp, ldm_unet, quantize_where_possible(Q.Q8_0), "sd1"))
    _merge_lora(unet, text, LORA_DIR / LORA_NAMES["dusk"])
    style = SyntheticModel("sd1", "demo", unet, vae, [text])
    metadata = {**DEMO_METADATA, "modelspec.title": "Demo shapes, dusk",
                "modelspec.description": f"{DEMO_NAME} with {LORA_NAMES['dusk']} merged in: the background darkens "
                                         "downwards."}
    _atomic(models_dir / STYLE_NAME, lambda tmp: write_a1111_checkpoint(tmp, style, torch.float16, metadata))


def _signature(path: Path) -> tuple[int, int]:
    """Size and modification time: the copy keeps the shipped file's, so a start compares without reading 20 MB."""
    stat = path.stat()
    return stat.st_size, stat.st_mtime_ns


def load_checkpoint(path: Path) -> LoadedModel:
    return load_model(CheckpointInfo(path.name, path, "safetensors"), None, torch.float32, torch.float32, Families())


def _merge_lora(unet: torch.nn.Module, text: torch.nn.Module, path: Path) -> None:
    """Add a LoRA's full weight updates to the layers it adapts, for good (a merge, as checkpoint mergers do)."""
    modules = {DENOISER: unet, "text_encoder": text}
    updates = convert_lora(load_file(str(path)), Family.SD1, modules, path.name)
    with torch.no_grad():
        for (component, name), lora in updates.items():
            modules[component].get_submodule(name).weight += lora.delta()


def _atomic(path: Path, write: Callable[[Path], object]) -> None:
    if path.is_file():
        return
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")  # two processes starting at once write apart
    write(tmp)
    os.replace(tmp, path)
