"""Train the demo model's ControlNet on a GPU: ``python -m webui.demo.train_controlnet --out DIR`` (a few minutes on
one H100), then ``python -m webui.demo.package --controlnet DIR`` ships it.

A canny ControlNet for the shipped demo checkpoint: diffusers' ``ControlNetModel.from_unet`` (the UNet's encoder
copied, zero convolutions out), trained with the UNet and text encoder frozen on the demo's pictures and their edges
as the app's own canny preprocessor draws them (at the picture's size, as "pixel perfect" asks, or at the default
512), some thickened as a scribble's strokes are. No caption names the place, so the place can only come from the
edges. Two things make a small ControlNet learn in minutes rather than hours: the hint's embedding starts from a
random layer rather than zeros (the zero convolutions alone keep the UNet as it was at the start, and the trunk sees
the edges from the first step), and most of each batch is drawn at the noise levels where the layout is decided.
At the end it measures itself with diffusers' StableDiffusionControlNetPipeline over the same weights: the
share of pictures whose shape lands where the control image puts it (prompts without a place), with and without it
(``eval.json``).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import ControlNetModel, DPMSolverMultistepScheduler, StableDiffusionControlNetPipeline
from PIL import Image

from webui.demo.derive import load_checkpoint
from webui.demo.shapes import Scene, all_scenes, draw, read_picture, to_pil
from webui.demo.train import SD1_SCHEDULE, Captions, Log, diffusion_loss, encode_all, lr_at, noise_levels, save
from webui.engine.conditioning.tokenizer import clip_tokenizer
from webui.engine.control.apply import control_hint
from webui.engine.control.preprocessors import find_preprocessor
from webui.engine.control.units import RESIZE_MODES
from webui.engine.loading.demo import ASSETS, DEMO_NAME
from webui.engine.loading.load import LoadedModel

PLACE = 2  # the place's bit in Scene.partial_caption
DETECT_RESOLUTIONS = (128, 512)  # pixel perfect at the demo's size, and the preprocessor's default


@dataclass
class ControlNetConfig:
    seed: int = 0
    size: int = 128
    pictures: int = 12000
    steps: int = 6000
    batch: int = 256
    lr: float = 5e-4
    warmup: int = 200
    uncond: float = 0.1
    min_snr: float = 5.0
    high_noise: float = 0.6  # of each batch drawn from the noisier 60 % of levels
    scribble: float = 0.3  # of the hints thickened (a 3x3 dilation), as a drawn scribble's strokes
    eval_pictures: int = 60
    eval_every: int = 2000  # a quick measure (20 pictures) this often


def canny_hint(picture: Image.Image, resolution: int, size: int) -> np.ndarray:
    """A picture's edges as the app makes a unit's control image from it: the canny preprocessor at
    ``resolution`` (its default thresholds), then resized to the generation's size; one channel, uint8."""
    canny = find_preprocessor("canny", "module")
    found = canny.detect(np.asarray(picture.convert("RGB")), resolution, *(s.value for s in canny.sliders), None)
    hint = control_hint(Image.fromarray(found.astype(np.uint8)), size, size, RESIZE_MODES[1])
    return (hint[0, 0] * 255).round().to(torch.uint8).numpy()


def _pictures_and_hints(scenes: list[Scene], seed: int, size: int, resolutions: list[int]
                        ) -> tuple[torch.Tensor, np.ndarray]:
    torch.set_num_threads(1)
    pictures = draw(scenes, size, seed=seed, supersample=2)
    hints = np.stack([canny_hint(p, r, size) for p, r in zip(to_pil(pictures), resolutions)])
    return ((pictures + 1) * 127.5).round().to(torch.uint8), hints


def pictures_and_hints(scenes: list[Scene], config: ControlNetConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """The training pictures (uint8) and their edges (uint8, one channel), drawn by a process per core (before the
    GPU is touched: the workers are forked)."""
    rng = random.Random(config.seed)
    resolutions = [rng.choice(DETECT_RESOLUTIONS) for _ in scenes]
    chunks = [(scenes[i:i + 500], config.seed + i, config.size, resolutions[i:i + 500])
              for i in range(0, len(scenes), 500)]
    with multiprocessing.get_context("fork").Pool(os.cpu_count()) as pool:
        drawn = pool.starmap(_pictures_and_hints, chunks)
    return torch.cat([p for p, _ in drawn]), torch.from_numpy(np.concatenate([h for _, h in drawn]))[:, None]


def as_hint(batch: torch.Tensor, scribble: float, generator: torch.Generator) -> torch.Tensor:
    """uint8 edges (N, 1, H, W) as the ControlNet takes them: RGB in [0, 1], a share of them thickened."""
    hints = batch.float() / 255
    thick = torch.rand(len(hints), device=hints.device, generator=generator) < scribble
    hints = torch.where(thick[:, None, None, None], F.max_pool2d(hints, 3, 1, 1), hints)
    return hints.expand(-1, 3, -1, -1)


def train(config: ControlNetConfig, out: Path, device: torch.device) -> tuple[LoadedModel, ControlNetModel]:
    """The ControlNet, and the demo model it was trained with (on ``device``)."""
    log = Log(out)
    rng = random.Random(config.seed)
    scenes = [rng.choice(all_scenes()) for _ in range(config.pictures)]
    pictures, hints = pictures_and_hints(scenes, config)
    log("pictures", len(hints), float(hints.float().mean() / 255))
    model = load_checkpoint(ASSETS / DEMO_NAME)
    unet, vae = model.denoiser.to(device).requires_grad_(False), model.vae.to(device)
    text = model.text_encoders[0].model.to(device).requires_grad_(False)
    latents, hints = encode_all(vae, pictures.to(device)), hints.to(device)
    captions = Captions(scenes, device, config.seed, without=PLACE)
    torch.manual_seed(config.seed)
    controlnet = ControlNetModel.from_unet(unet)
    torch.nn.init.kaiming_uniform_(controlnet.controlnet_cond_embedding.conv_out.weight, a=5 ** 0.5)
    controlnet = controlnet.to(device).train()
    (out / "controlnet_config.json").write_text(json.dumps(dict(controlnet.config), indent=2))  # any save packages
    optimizer = torch.optim.AdamW(controlnet.parameters(), lr=config.lr, weight_decay=0.0,
                                  fused=device.type == "cuda")
    alphas_cumprod = noise_levels(device)
    generator = torch.Generator(device).manual_seed(config.seed + 1)
    for step in range(config.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.steps, config.lr, config.warmup)
        index = torch.randint(0, len(latents), (config.batch,), device=device, generator=generator)
        hint = as_hint(hints[index], config.scribble, generator)

        def denoise(noisy: torch.Tensor, t: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
            down, mid = controlnet(noisy, t, context, hint, return_dict=False)
            return unet(noisy, t, context, down_block_additional_residuals=down,
                        mid_block_additional_residual=mid).sample

        loss = diffusion_loss(denoise, text, latents[index], captions.batch(index, config.uncond), alphas_cumprod,
                              generator, config.min_snr, config.high_noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(controlnet.parameters(), 1.0)
        optimizer.step()
        if step % 250 == 0 or step == config.steps - 1:
            log("controlnet", step, loss.item())
        if step % config.eval_every == config.eval_every - 1 and step < config.steps - 1:
            measured = evaluate(model, controlnet.eval(), 20, config, device, scales=(1.0,))
            log("place at 20 pictures", step, measured["scale 1.0"]["place as the control image"])
            save(out / "controlnet.safetensors", controlnet.train())
    save(out / "controlnet.safetensors", controlnet)
    return model, controlnet.eval().requires_grad_(False)


@torch.no_grad()
def evaluate(model: LoadedModel, controlnet: ControlNetModel, count: int, config: ControlNetConfig,
             device: torch.device, scales: tuple[float, ...] = (1.0, 0.0)) -> dict:
    """Prompts without a place, control images of the same scene: where the shape lands, at each ControlNet scale
    (0: as without it)."""
    pipe = StableDiffusionControlNetPipeline(
        vae=model.vae, text_encoder=model.text_encoders[0].model, tokenizer=clip_tokenizer(), unet=model.denoiser,
        controlnet=controlnet, scheduler=DPMSolverMultistepScheduler(**SD1_SCHEDULE), safety_checker=None,
        feature_extractor=None, requires_safety_checker=False).to(device)
    pipe.set_progress_bar_config(disable=True)
    scenes, size = random.Random(config.seed + 7).sample(all_scenes(), count), config.size
    controls = to_pil(draw(scenes, size, seed=config.seed + 7))
    results = {}
    for scale in scales:
        readings = []
        for i, (scene, picture) in enumerate(zip(scenes, controls)):
            hint = Image.fromarray(canny_hint(picture, size, size)).convert("RGB")
            image = pipe(scene.partial_caption(7 & ~PLACE), image=hint, num_inference_steps=20, guidance_scale=7,
                         controlnet_conditioning_scale=scale, height=size, width=size,
                         generator=torch.Generator(device).manual_seed(i)).images[0]
            readings.append(read_picture(image))
        results[f"scale {scale}"] = {
            "place as the control image": sum(r.position == s.position for r, s in zip(readings, scenes)) / count,
            "colour as the prompt": sum(r.colour == s.colour for r, s in zip(readings, scenes)) / count}
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    for field, value in asdict(ControlNetConfig()).items():
        parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    config = ControlNetConfig(**{k: v for k, v in vars(args).items() if k in ControlNetConfig.__dataclass_fields__})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    model, controlnet = train(config, args.out, device)
    measured = evaluate(model, controlnet, config.eval_pictures, config, device)
    (args.out / "eval.json").write_text(json.dumps(measured, indent=2))
    print(json.dumps(measured), flush=True)


if __name__ == "__main__":
    main()
