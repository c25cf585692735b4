"""Turn a training run's weights into the files the app ships: ``python -m webui.demo.package RUN_DIR``.

Writes, into ``webui/assets/demo`` (or ``--dest``): the model as an A1111 single-file checkpoint (float16, with
ModelSpec metadata saying its resolution), and its two LoRAs in kohya's format (sd-scripts' names, the most common
kind users have); with ``--controlnet RUN`` (a ``webui.demo.train_controlnet`` run) its canny ControlNet in
A1111's layout (lllyasviel's ``control_model.`` names). The style checkpoint and the GGUF twin are made from these at
first start (``webui.engine.loading.demo``), so the repository holds one checkpoint.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from diffusers import ControlNetModel
from safetensors.torch import load_file

from webui.demo.train import load_component, read_config
from webui.engine.formats.detect import Family
from webui.engine.loading.demo import (ASSETS, CONTROLNET_DIR, CONTROLNET_NAME, DEMO_METADATA, DEMO_NAME, LORA_DIR,
                                       LORA_NAMES)
from webui.engine.lora.keys import DENOISER, LoraWeights
from webui.synthetic.builders import SyntheticModel
from webui.synthetic.ldm_export import write_a1111_checkpoint, write_controlnet
from webui.synthetic.lora_export import Weights, write_lora


def trained_model(run: Path) -> SyntheticModel:
    """The run's VAE, UNet and text encoder, as the exporters take them."""
    config = read_config(run)
    unet, vae, text = (load_component(name, config, run) for name in ("unet", "vae", "text_encoder"))
    if unet is None or vae is None or text is None:
        raise SystemExit(f"{run} lacks one of unet, vae, text_encoder .safetensors: not a finished training run")
    return SyntheticModel("sd1", "demo", unet, vae, [text])


def lora_weights(path: Path) -> Weights:
    """A LoRA the training wrote (``<module path>.lora_down/up.weight``, alpha = rank) as the LoRA writer takes it."""
    tensors = load_file(str(path))
    paths = sorted({key.rsplit(".lora_", 1)[0] for key in tensors})
    return {(DENOISER, p): LoraWeights(tensors[f"{p}.lora_down.weight"].float(), tensors[f"{p}.lora_up.weight"].float(),
                                       None) for p in paths}


def write_shipped_files(run: Path, dest: Path) -> list[Path]:
    dest.mkdir(parents=True, exist_ok=True)
    written = [write_a1111_checkpoint(dest / DEMO_NAME, trained_model(run), torch.float16, DEMO_METADATA)]
    for kind, name in LORA_NAMES.items():
        written.append(write_lora(dest / LORA_DIR.name / name, lora_weights(run / f"lora-{kind}.safetensors"), Family.SD1, "kohya",
                                  torch.float16))
    return written


def write_shipped_controlnet(run: Path, dest: Path) -> Path:
    config = json.loads((run / "controlnet_config.json").read_text())
    model = ControlNetModel.from_config({k: v for k, v in config.items() if not k.startswith("_")})
    model.load_state_dict({k: v.float() for k, v in load_file(str(run / "controlnet.safetensors")).items()})
    return write_controlnet(dest / CONTROLNET_DIR.name / CONTROLNET_NAME, model, "ldm", torch.float16)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("run", type=Path, nargs="?", help="the folder webui.demo.train wrote")
    parser.add_argument("--controlnet", type=Path, help="the folder webui.demo.train_controlnet wrote")
    parser.add_argument("--dest", type=Path, default=ASSETS)
    args = parser.parse_args(argv)
    written = write_shipped_files(args.run, args.dest) if args.run else []
    if args.controlnet:
        (args.dest / CONTROLNET_DIR.name).mkdir(parents=True, exist_ok=True)
        written.append(write_shipped_controlnet(args.controlnet, args.dest))
    for path in written:
        print(f"{path} ({path.stat().st_size / 2**20:.1f} MB)")


if __name__ == "__main__":
    main()
