"""Train the demo model on a GPU: ``python -m webui.demo.train --out DIR`` (about 15 minutes on one H100).

Four phases, each seeded, on pictures ``shapes.draw`` makes (no data is downloaded):

1. the VAE (SD's AutoencoderKL, 8x downscale, shrunk) on all the pictures' kinds, then rescaled so that its
   latents times SD1's 0.18215 have unit spread, as A1111 files assume;
2. the text encoder (CLIP with the real tokenizer, 64 wide) and the UNet (SD1.x layout, shrunk) together, as SD1.x
   was trained: epsilon prediction on SD1's noise schedule, captions left out 10 % of the time for CFG;
3. a LoRA over every UNet layer on "dusk" pictures (the background darkens downwards): merged into the base it
   makes the second, differently styled checkpoint;
4. a LoRA over every UNet layer on outlined pictures: shipped as a LoRA.

Each phase's weights are written to DIR as it ends (diffusers names, float16), with ``config.json`` and the
losses; ``python -m webui.demo.package DIR`` turns them into the files the app ships.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import CLIPTextModel

from webui.demo.shapes import CAPTION_PARTS, Scene, all_scenes, draw
from webui.engine.conditioning.tokenizer import clip_tokenizer
from webui.synthetic.builders import clip_config, sd1_unet_config, vae_body

SD1_SCALE = 0.18215
SD1_SCHEDULE = dict(num_train_timesteps=1000, beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear")


@dataclass
class TrainConfig:
    seed: int = 0
    size: int = 128
    pictures: int = 30000  # per kind of picture: flat, dusk, outlined
    text_width: int = 64
    text_layers: int = 3
    unet_channels: tuple[int, ...] = (64, 128, 128)
    vae_channels: tuple[int, ...] = (32, 64, 64, 64)
    vae_steps: int = 2000
    vae_batch: int = 128
    vae_lr: float = 1e-3
    kl_weight: float = 1e-6
    base_steps: int = 3500
    base_batch: int = 1024  # a step of this small UNet costs about the same up to ~1024 pictures
    base_lr: float = 8e-4
    warmup: int = 300
    ema: float = 0.998
    uncond: float = 0.1
    lora_rank: int = 8
    lora_steps: int = 600
    lora_batch: int = 512
    lora_lr: float = 1e-3
    min_snr: float = 5.0


# The three components, as SD1.x's with the config's widths (the loaders read them back from the shapes).
BUILDERS: dict[str, Callable[[TrainConfig], nn.Module]] = {
    "vae": lambda c: AutoencoderKL(**vae_body(c.vae_channels, 1) | dict(latent_channels=4, sample_size=c.size,
                                                                        scaling_factor=SD1_SCALE)),
    "unet": lambda c: UNet2DConditionModel(**sd1_unet_config(c.unet_channels, 1, c.text_width, c.size // 8)),
    "text_encoder": lambda c: CLIPTextModel(clip_config(c.text_width, c.text_layers, "quick_gelu")),
}


def read_config(run: Path) -> TrainConfig:
    fields = json.loads((run / "config.json").read_text())
    return TrainConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in fields.items()})


def load_component(name: str, config: TrainConfig, run: Path | None) -> nn.Module | None:
    """A component a run wrote (``<name>.safetensors``), or None where it has none."""
    path = run / f"{name}.safetensors" if run is not None else None
    if path is None or not path.is_file():
        return None
    state = {k: v.float() for k, v in load_file(str(path)).items()}
    module = BUILDERS[name](config)
    module.load_state_dict(state, strict=False)  # float16 files hold the floating-point tensors only
    return module.eval().requires_grad_(False)


class Log:
    def __init__(self, out: Path):
        self.out, self.lines, self.start = out, [], time.time()

    def __call__(self, phase: str, step: int, loss: float) -> None:
        line = {"phase": phase, "step": step, "loss": round(loss, 5), "seconds": round(time.time() - self.start, 1)}
        self.lines.append(line)
        print(json.dumps(line), flush=True)
        (self.out / "losses.json").write_text(json.dumps(self.lines))


def save(path: Path, module_or_tensors: nn.Module | dict[str, torch.Tensor]) -> None:
    tensors = module_or_tensors.state_dict() if isinstance(module_or_tensors, nn.Module) else module_or_tensors
    save_file({k: v.detach().to("cpu", torch.float16).contiguous() for k, v in tensors.items()
               if v.is_floating_point()}, str(path))


KINDS = {"flat": dict(), "dusk": dict(style="dusk"), "outline": dict(outline=True)}
CHUNK = 1000


def training_scenes(config: TrainConfig) -> list[Scene]:
    rng = random.Random(config.seed)
    scenes = all_scenes()
    return [rng.choice(scenes) for _ in range(config.pictures)]


def draw_kind(kind: str, scenes: list[Scene], config: TrainConfig, device: torch.device) -> torch.Tensor:
    """The training pictures of one kind (flat, dusk or outlined), as uint8 on the device to save memory; edges
    smoothed 2x, which is plenty for training and twice as quick."""
    seed = config.seed * 100 + list(KINDS).index(kind) * 10
    chunks = [draw(scenes[i:i + CHUNK], config.size, seed=seed + i // CHUNK, device=device, supersample=2,
                   **KINDS[kind]) for i in range(0, len(scenes), CHUNK)]
    return ((torch.cat(chunks) + 1) * 127.5).round().to(torch.uint8)


def as_float(batch: torch.Tensor) -> torch.Tensor:
    return batch.float() / 127.5 - 1


def lr_at(step: int, steps: int, peak: float, warmup: int) -> float:
    if step < warmup:
        return peak * (step + 1) / warmup
    return peak * 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(steps - warmup, 1)))


def train_vae(config: TrainConfig, every: torch.Tensor, log: Log, device: torch.device) -> AutoencoderKL:
    """The VAE, on pictures of every kind (uint8), then rescaled (``rescale_latents``)."""
    vae = BUILDERS["vae"](config).to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=config.vae_lr, weight_decay=0.0)
    generator = torch.Generator(device).manual_seed(config.seed)
    for step in range(config.vae_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.vae_steps, config.vae_lr, 200)
        index = torch.randint(0, len(every), (config.vae_batch,), device=device, generator=generator)
        x = as_float(every[index])
        with torch.autocast(device.type, torch.bfloat16):
            posterior = vae.encode(x).latent_dist
            z = posterior.sample(generator=generator)
            reconstruction = vae.decode(z).sample
        loss = F.mse_loss(reconstruction.float(), x) + config.kl_weight * posterior.kl().mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == config.vae_steps - 1:
            log("vae", step, loss.item())
    vae.eval().requires_grad_(False)
    return rescale_latents(vae, as_float(every[: 4096:4]))


@torch.no_grad()
def rescale_latents(vae: AutoencoderKL, sample: torch.Tensor) -> AutoencoderKL:
    """Scale the latent space (quant_conv out, post_quant_conv in) so that latents x 0.18215 have unit std: exact,
    the decoder sees the same numbers."""
    std = torch.cat([vae.encode(chunk).latent_dist.mean for chunk in sample.split(256)]).float().std().item()
    k = 1 / (SD1_SCALE * std)
    vae.quant_conv.weight[:4] *= k
    vae.quant_conv.bias[:4] *= k
    vae.quant_conv.bias[4:] += 2 * math.log(k)
    vae.post_quant_conv.weight /= k
    return vae


@torch.no_grad()
def encode_all(vae: AutoencoderKL, pictures: torch.Tensor) -> torch.Tensor:
    return torch.cat([vae.encode(as_float(chunk)).latent_dist.mean * SD1_SCALE for chunk in pictures.split(512)])


class Captions:
    """Every caption a training picture can get (size, place and background each dropped or not), tokenized once;
    a batch picks among them on the GPU."""

    VARIANTS = CAPTION_PARTS + 1

    def __init__(self, scenes: list[Scene], device: torch.device, seed: int, without: int = 0):
        """``without``: the caption parts (bits of ``Scene.partial_caption``) no caption has."""
        tokenizer = clip_tokenizer()
        unique = sorted(set(scenes), key=Scene.caption)
        index = {scene: i for i, scene in enumerate(unique)}
        texts = [scene.partial_caption(v & ~without) for scene in unique for v in range(self.VARIANTS)] + [""]
        self.tokens = tokenizer(texts, padding="max_length", max_length=77, truncation=True,
                                return_tensors="pt").input_ids.to(device)
        self.scene_index = torch.tensor([index[s] for s in scenes], device=device)
        self.empty = len(texts) - 1
        self.generator = torch.Generator(device).manual_seed(seed)

    def batch(self, picture_index: torch.Tensor, uncond: float) -> torch.Tensor:
        n = len(picture_index)
        full = torch.rand(n, device=picture_index.device, generator=self.generator) < 0.5  # half the time all words
        variant = torch.where(full, self.VARIANTS - 1,
                              torch.randint(0, self.VARIANTS, (n,), device=picture_index.device,
                                            generator=self.generator))
        rows = self.scene_index[picture_index] * self.VARIANTS + variant
        empty = torch.rand(n, device=picture_index.device, generator=self.generator) < uncond
        return self.tokens[torch.where(empty, self.empty, rows)]


def noise_levels(device: torch.device) -> torch.Tensor:
    """SD1's alphas_cumprod, on the device once (a copy from the CPU every step would stall the GPU)."""
    return DDPMScheduler(**SD1_SCHEDULE).alphas_cumprod.to(device)


Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # (noisy, t, context) -> noise


def unet_denoise(unet: UNet2DConditionModel) -> Denoise:
    return lambda noisy, t, context: unet(noisy, t, context).sample


def diffusion_loss(denoise: Denoise, text: nn.Module, latents: torch.Tensor, tokens: torch.Tensor,
                   alphas_cumprod: torch.Tensor, generator: torch.Generator, min_snr: float,
                   high_noise: float = 0.0) -> torch.Tensor:
    """SD1's objective, epsilon prediction, weighted by min-SNR (gamma ``min_snr``) for quicker training;
    ``high_noise``: the share of the batch whose noise level is drawn from the noisier 60 % (where a picture's layout
    is decided), the rest from all of them."""
    noise = torch.randn(latents.shape, device=latents.device, generator=generator)
    levels = len(alphas_cumprod)
    t = torch.randint(0, levels, (len(latents),), device=latents.device, generator=generator)
    if high_noise:  # (drawn only then: the demo's own phases draw what they drew when it was trained)
        high = torch.rand(len(latents), device=latents.device, generator=generator) < high_noise
        t = torch.where(high, levels * 2 // 5 + t * 3 // 5, t)
    alphas = alphas_cumprod[t]
    noisy = alphas.sqrt()[:, None, None, None] * latents + (1 - alphas).sqrt()[:, None, None, None] * noise
    with torch.autocast(latents.device.type, torch.bfloat16):
        context = text(tokens).last_hidden_state
        prediction = denoise(noisy, t, context)
    snr = alphas / (1 - alphas)
    weight = torch.clamp(snr, max=min_snr) / snr
    per_sample = F.mse_loss(prediction.float(), noise, reduction="none").mean(dim=(1, 2, 3))
    return (per_sample * weight).mean()


def train_base(config: TrainConfig, latents: torch.Tensor, captions: Captions, log: Log, device: torch.device,
               out: Path, start: tuple[UNet2DConditionModel, CLIPTextModel] | None = None,
               ) -> tuple[UNet2DConditionModel, CLIPTextModel]:
    """The UNet and the text encoder, trained together (from ``start`` when given, else from scratch); their running
    average (EMA) is what is kept, and written to ``out`` every 1000 steps too."""
    torch.manual_seed(config.seed)
    unet, text = start or (BUILDERS["unet"](config), BUILDERS["text_encoder"](config))
    unet, text = unet.to(device).train().requires_grad_(True), text.to(device).train().requires_grad_(True)
    params = [*unet.parameters(), *text.parameters()]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=config.base_lr, weight_decay=0.01, fused=device.type == "cuda")
    alphas_cumprod = noise_levels(device)
    generator = torch.Generator(device).manual_seed(config.seed + 1)
    for step in range(config.base_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.base_steps, config.base_lr, config.warmup)
        index = torch.randint(0, len(latents), (config.base_batch,), device=device, generator=generator)
        tokens = captions.batch(index, config.uncond)
        loss = diffusion_loss(unet_denoise(unet), text, latents[index], tokens, alphas_cumprod, generator,
                              config.min_snr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        with torch.no_grad():
            decay = min(config.ema, (1 + step) / (10 + step))
            torch._foreach_lerp_(ema, [p.detach() for p in params], 1 - decay)
        if step % 500 == 0 or step == config.base_steps - 1:
            log("base", step, loss.item())
        if step % 1000 == 999:
            with _swapped(params, ema):
                save(out / "unet.safetensors", unet)
                save(out / "text_encoder.safetensors", text)
    with torch.no_grad():
        for p, e in zip(params, ema):
            p.copy_(e)
    return unet.eval().requires_grad_(False), text.eval().requires_grad_(False)


@contextmanager
def _swapped(params: list[torch.Tensor], ema: list[torch.Tensor]) -> Iterator[None]:
    """The EMA weights in the model for the duration of the block."""
    with torch.no_grad():
        kept = [p.detach().clone() for p in params]
        torch._foreach_copy_(params, ema)
        try:
            yield
        finally:
            torch._foreach_copy_(params, kept)


class LoraLayer(nn.Module):
    """A low-rank update beside a frozen Linear or Conv2d: ``up(down(x))``, up starting at zero."""

    def __init__(self, base: nn.Linear | nn.Conv2d, rank: int):
        super().__init__()
        if isinstance(base, nn.Linear):
            self.down = nn.Linear(base.in_features, rank, bias=False)
            self.up = nn.Linear(rank, base.out_features, bias=False)
        else:
            self.down = nn.Conv2d(base.in_channels, rank, base.kernel_size, base.stride, base.padding, bias=False)
            self.up = nn.Conv2d(rank, base.out_channels, 1, bias=False)
        nn.init.zeros_(self.up.weight)
        self.to(base.weight.device)

    def hook(self, module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return output + self.up(self.down(inputs[0].to(self.down.weight.dtype))).to(output.dtype)


def train_lora(name: str, seed: int, config: TrainConfig, unet: UNet2DConditionModel, text: CLIPTextModel, latents: torch.Tensor,
               captions: Captions, log: Log, device: torch.device) -> dict[str, torch.Tensor]:
    """A LoRA of rank ``config.lora_rank`` over every Linear and Conv2d of the UNet, trained on ``latents``;
    its tensors by diffusers module path (``<path>.lora_down.weight`` / ``.lora_up.weight``, alpha = rank)."""
    targets = {path: module for path, module in unet.named_modules() if isinstance(module, (nn.Linear, nn.Conv2d))}
    adapters = {path: LoraLayer(module, config.lora_rank) for path, module in targets.items()}
    handles = [targets[path].register_forward_hook(adapter.hook) for path, adapter in adapters.items()]
    params = [p for adapter in adapters.values() for p in adapter.parameters()]
    optimizer = torch.optim.AdamW(params, lr=config.lora_lr, weight_decay=0.0, fused=device.type == "cuda")
    alphas_cumprod = noise_levels(device)
    generator = torch.Generator(device).manual_seed(seed)
    for step in range(config.lora_steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, config.lora_steps, config.lora_lr, 100)
        index = torch.randint(0, len(latents), (config.lora_batch,), device=device, generator=generator)
        tokens = captions.batch(index, config.uncond)
        loss = diffusion_loss(unet_denoise(unet), text, latents[index], tokens, alphas_cumprod, generator,
                              config.min_snr)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % 500 == 0 or step == config.lora_steps - 1:
            log(name, step, loss.item())
    for handle in handles:
        handle.remove()
    return {f"{path}.lora_{part}.weight": getattr(adapter, part).weight for path, adapter in adapters.items()
            for part in ("down", "up")}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--resume", type=Path, default=None,
                        help="a folder of an earlier run: its VAE, UNet and text encoder are used, not trained again")
    parser.add_argument("--skip-loras", action="store_true", help="stop after the base model")
    parser.add_argument("--continue-base", action="store_true",
                        help="train the --resume run's UNet and text encoder further (--base-steps more steps)")
    for field, value in asdict(TrainConfig()).items():
        if not isinstance(value, tuple):
            parser.add_argument(f"--{field.replace('_', '-')}", type=type(value), default=value)
    args = parser.parse_args(argv)
    config = TrainConfig(**{k: v for k, v in vars(args).items() if k in TrainConfig.__dataclass_fields__})
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps(asdict(config), indent=2))
    log = Log(out)
    scenes = training_scenes(config)
    vae = load_component("vae", config, args.resume)
    if vae is None:
        vae = train_vae(config, torch.cat([draw_kind(kind, scenes, config, device) for kind in KINDS]), log, device)
        save(out / "vae.safetensors", vae)
    vae = vae.to(device)

    def latents(kind: str) -> torch.Tensor:
        encoded = encode_all(vae, draw_kind(kind, scenes, config, device))
        log(f"data {kind}", len(encoded), 0.0)
        return encoded

    captions = Captions(scenes, device, config.seed)
    unet, text = (load_component(name, config, args.resume) for name in ("unet", "text_encoder"))
    if unet is None or args.continue_base:
        unet, text = train_base(config, latents("flat"), captions, log, device, out,
                                start=None if unet is None else (unet, text))
        save(out / "unet.safetensors", unet)
        save(out / "text_encoder.safetensors", text)
    unet, text = unet.to(device), text.to(device)
    if args.skip_loras:
        return
    for seed, name in enumerate(("dusk", "outline"), start=config.seed + 2):
        lora = train_lora(name, seed, config, unet, text, latents(name), captions, log, device)
        save(out / f"lora-{name}.safetensors", lora)
    print(f"done in {time.time() - log.start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
