"""txt2img: a validated request in, images and infotexts out. The only generation path.

The loop follows diffusers' StableDiffusion(XL)Pipeline step for step (same scheduler calls,
same noise), so the same weights, seed and sampler give the same image as the plain pipeline.
Noise is drawn on the CPU per image from seed+i, as A1111 does, so seeds mean the same on
every device.
"""
from __future__ import annotations

import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm import tqdm

from webui.engine.detect import Family
from webui.engine.fp8 import compute_dtype
from webui.engine.infotext import build_infotext
from webui.engine.load import TEXT_ENCODERS, LoadedModel
from webui.engine.memory import MemoryManager, MemoryPolicy, activation_bytes, vae_decode_bytes
from webui.engine.progress import Progress
from webui.engine.prompts import Conditioning, encode_prompts
from webui.engine.request import MAX_SEED, GenerationRequest, GenerationResult
from webui.engine.samplers import make_scheduler, step_kwargs
from webui.errors import UserError

VERSION = "webui-0.1"
log = logging.getLogger(__name__)


@dataclass
class Resolved:
    """The request with every default filled in from the settings."""

    request: GenerationRequest
    sampler: str  # canonical A1111 names, as the infotext writes them
    schedule: str
    seed: int
    clip_skip: int
    save: bool
    model_hash: str
    vae_name: str | None


def resolve_seed(seed: int) -> int:
    return random.randint(0, MAX_SEED) if seed == -1 else int(seed)


def txt2img(model: LoadedModel, memory: MemoryManager, policy: MemoryPolicy, job: Resolved, progress: Progress,
            save_image: Callable[[Image.Image, int, str, str], Path] | None = None) -> GenerationResult:
    """Run all batches of a request. ``save_image(image, seed, prompt, infotext)`` saves when given.

    An out-of-memory error in a batch is retried once with a smaller resident set and a tiled
    VAE; images already made are kept either way.
    """
    req = job.request
    start = time.perf_counter()
    cfg = req.cfg_scale > 1.0
    activation = activation_bytes(model.family.value, req.width, req.height, req.batch_size, cfg,
                                  compute_dtype(model.denoiser))
    memory.begin(policy, activation)
    result = GenerationResult(request=req, model_name=model.info.model_name, model_hash=job.model_hash,
                              sampler_name=job.sampler, scheduler=job.schedule, clip_skip=job.clip_skip)
    progress.begin("txt2img", req.n_iter, req.steps)
    bar = tqdm(total=req.n_iter * req.steps, desc="txt2img", unit="it", leave=False)
    try:
        for batch_no in range(req.n_iter):
            if progress.interrupted:
                break
            progress.next_batch(batch_no)
            seeds = [job.seed + batch_no * req.batch_size + i for i in range(req.batch_size)]
            images = _with_oom_retry(lambda: _sample_batch(model, memory, req, seeds, job.clip_skip, progress, bar,
                                                           result.timings), memory, req)
            for image, seed in zip(images, seeds):
                infotext = infotext_for(model, job, seed)
                result.images.append(image)
                result.seeds.append(seed)
                result.prompts.append(req.prompt)
                result.negative_prompts.append(req.negative_prompt)
                result.infotexts.append(infotext)
                if save_image is not None and job.save and not progress.interrupted:
                    result.paths.append(save_image(image, seed, req.prompt, infotext))
        result.interrupted = progress.interrupted
    finally:
        bar.close()
        progress.end()
        result.memory = memory.finish()
    result.seconds = time.perf_counter() - start
    return result


def infotext_for(model: LoadedModel, job: Resolved, seed: int) -> str:
    req = job.request
    params = {
        "Steps": req.steps,
        "Sampler": job.sampler,
        "Schedule type": job.schedule,
        "CFG scale": req.cfg_scale,
        "Seed": seed,
        "Size": f"{req.width}x{req.height}",
        "Model hash": job.model_hash,
        "Model": model.info.model_name,
        "VAE": job.vae_name,
        "Clip skip": job.clip_skip if job.clip_skip != 1 else None,
        "Version": VERSION,
    }
    return build_infotext(req.prompt, req.negative_prompt, params)


def _with_oom_retry(run: Callable[[], list[Image.Image]], memory: MemoryManager,
                    req: GenerationRequest) -> list[Image.Image]:
    try:
        return run()
    except torch.OutOfMemoryError:
        log.warning("Out of memory; freeing caches and retrying with half the resident weights and a tiled VAE.")
    memory.recover_from_oom()
    try:
        return run()
    except torch.OutOfMemoryError as e:
        memory.recover_from_oom()
        raise UserError(memory.explain_oom(req.width, req.height, req.batch_size)) from e


@torch.inference_mode()
def _sample_batch(model: LoadedModel, memory: MemoryManager, req: GenerationRequest, seeds: list[int],
                  clip_skip: int, progress: Progress, bar: tqdm, timings: dict[str, float]) -> list[Image.Image]:
    unet, device = model.denoiser, memory.device
    dtype = compute_dtype(unet)
    clock = PhaseClock(device, timings)
    memory.prepare([name for name in TEXT_ENCODERS if name in memory.components])
    cond, uncond = _conditioning(model, req, clip_skip, device, dtype)
    clock.lap("encode")
    memory.prepare(["denoiser"])
    use_cfg = req.cfg_scale > 1.0
    scheduler = make_scheduler(req.sampler_name, req.scheduler, model.scheduler_config, seed=seeds)
    scheduler.set_timesteps(req.steps, device=device)
    generators = [torch.Generator("cpu").manual_seed(s) for s in seeds]
    latents = _initial_noise(model, req, generators).to(device, dtype) * scheduler.init_noise_sigma
    context = torch.cat([uncond.embeds, cond.embeds]) if use_cfg else cond.embeds
    added = _sdxl_added_conditions(model, req, cond, uncond, use_cfg, device, dtype)
    extra = step_kwargs(scheduler, generators)
    total = len(scheduler.timesteps)
    for i, t in enumerate(scheduler.timesteps):
        if progress.interrupted or progress.skipped:
            break
        x = torch.cat([latents] * 2) if use_cfg else latents
        x = scheduler.scale_model_input(x, t)
        noise = unet(x, t, encoder_hidden_states=context, added_cond_kwargs=added).sample
        if use_cfg:
            noise_uncond, noise_cond = noise.chunk(2)
            noise = noise_uncond + req.cfg_scale * (noise_cond - noise_uncond)
        latents = scheduler.step(noise, t, latents, **extra).prev_sample
        progress.step(round((i + 1) * req.steps / total), latents, model.family)
        bar.n = progress.job_no * req.steps + progress.sampling_step
        bar.refresh()
    clock.lap("denoise")
    images = decode(model, memory, latents)
    clock.lap("decode")
    return images


class PhaseClock:
    """Adds each phase's wall time (device work included) to ``timings``."""

    def __init__(self, device: torch.device, timings: dict[str, float]):
        self.device, self.timings = device, timings
        self.last = time.perf_counter()

    def lap(self, phase: str) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        now = time.perf_counter()
        self.timings[phase] = self.timings.get(phase, 0.0) + now - self.last
        self.last = now


def _conditioning(model: LoadedModel, req: GenerationRequest, clip_skip: int, device: torch.device,
                  dtype: torch.dtype) -> tuple[Conditioning, Conditioning]:
    """Positive and negative conditioning, reused while the prompts, clip skip and batch stay the same
    (as A1111 does): a new seed for the same prompt costs no text encoding."""
    key = (req.prompt, req.negative_prompt, clip_skip, req.batch_size, dtype)
    if model.conditioning_cache[0] == key:
        return model.conditioning_cache[1]
    n = req.batch_size
    # One pass for both: encode_prompts pads the shorter prompt with empty chunks, as A1111 does for CFG.
    both = encode_prompts([req.prompt] * n + [req.negative_prompt] * n, model.text_encoders, clip_skip,
                          device=device, dtype=dtype)
    halves = [Conditioning(both.embeds[part], None if both.pooled is None else both.pooled[part])
              for part in (slice(0, n), slice(n, 2 * n))]
    model.conditioning_cache = (key, (halves[0], halves[1]))
    return halves[0], halves[1]


def _initial_noise(model: LoadedModel, req: GenerationRequest, generators: list[torch.Generator]) -> torch.Tensor:
    shape = (1, model.denoiser.config.in_channels, req.height // 8, req.width // 8)
    return torch.cat([torch.randn(shape, generator=g, dtype=torch.float32) for g in generators])


def _sdxl_added_conditions(model: LoadedModel, req: GenerationRequest, cond: Conditioning, uncond: Conditioning,
                           use_cfg: bool, device: torch.device, dtype: torch.dtype) -> dict | None:
    """SDXL's micro-conditioning: pooled text and (original size, crop, target size)."""
    if model.family is not Family.SDXL:
        return None
    size = [req.height, req.width, 0, 0, req.height, req.width]
    time_ids = torch.tensor([size] * req.batch_size, device=device, dtype=dtype)
    pooled = torch.cat([uncond.pooled, cond.pooled]) if use_cfg else cond.pooled
    if use_cfg:
        time_ids = torch.cat([time_ids, time_ids])
    return {"text_embeds": pooled.to(device, dtype), "time_ids": time_ids}


def decode(model: LoadedModel, memory: MemoryManager, latents: torch.Tensor) -> list[Image.Image]:
    """VAE decode to PIL images (tiled when a whole decode would not fit), rounded as diffusers does."""
    vae = model.vae
    batch, _, h, w = latents.shape
    dtype = compute_dtype(vae)
    tiled = memory.prepare_decode("vae", vae_decode_bytes(w * 8, h * 8, batch, dtype))
    vae.enable_tiling() if tiled else vae.disable_tiling()
    latents = latents.to(memory.device, dtype) / vae.config.scaling_factor
    pixels = vae.decode(latents).sample
    pixels = (pixels.float() / 2 + 0.5).clamp(0, 1).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray((p * 255).round().astype(np.uint8)) for p in pixels]
