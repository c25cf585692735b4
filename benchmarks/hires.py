"""Hires. fix on a small card (issue 25): whole jobs as a user gets them, resident and on simulated cards, beside
diffusers' img2img pipeline over the same modules for the second pass, and the first pass alone.

    python3 -m benchmarks.hires [--model sdxl|flux-q8] [--cards 8192,12288] [--steps 20] [--upscaler Latent|ESRGAN]

Full-size random weights written as the files users have (``benchmarks.whole_image``'s cases): SDXL 1024² → 2048²
(CFG 7), Flux-dev Q8_0 GGUF 1024² → 1536² (distilled CFG 3.5); Euler, denoising 0.5. ``--upscaler ESRGAN``
upscales the decoded first pass with a full-size ESRGAN 4x (RRDBNet, 23 blocks, 64 filters: random weights in
BasicSR's layout, read by spandrel from models/ESRGAN) and encodes it again, instead of the latent upscale. The
reference is diffusers' img2img pipeline (``AutoPipelineForImage2Image`` from the case's txt2img pipeline) at the
hires size: from latents of that size for SDXL, from a picture of it for Flux. Goals: completes on an 8 GB card, its
peak VRAM within the card; the second pass no slower than diffusers' img2img resident.
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import time
from pathlib import Path

import torch
from PIL import Image

from benchmarks.pipelines import CONTEXT_MB, simulate_card
from benchmarks.table import print_table
from benchmarks.whole_image import CASES, Case, engine_for, phases

STRENGTH = 0.5
HIRES_SCALE = {"sdxl": 2.0, "flux-q8": 1.5}
PROMPTS = (f"a photo of a cat number {i}" for i in range(1_000_000))
ESRGAN_FILE = "4x-ESRGAN-random"
SWAP = ("Async", "Shared")


def request(case: Case, scale: float, steps: int, hires: bool, upscaler: str):
    from webui.engine.request import GenerationRequest

    return GenerationRequest(prompt=next(PROMPTS), width=case.width, height=case.height, steps=steps,
                             cfg_scale=case.cfg, sampler_name="Euler", scheduler="Automatic", seed=1, save_images=False,
                             enable_hr=hires, hr_scale=scale, hr_upscaler=ESRGAN_FILE if upscaler == "ESRGAN" else upscaler,
                             denoising_strength=STRENGTH, **case.fields)


def write_esrgan(engine) -> None:
    """A full-size ESRGAN 4x in the engine's models/ESRGAN, as Real-ESRGAN's .pth files hold it (once)."""
    from webui.synthetic.upscalers import esrgan_state

    path = engine.config.paths.models_dir / "ESRGAN" / f"{ESRGAN_FILE}.pth"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({"params_ema": esrgan_state(filters=64, grow=32, blocks=23)}, path)


def timed(run) -> tuple[float, object]:
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = run()
    torch.cuda.synchronize()
    return time.perf_counter() - start, result


def reference_second_pass(case: Case, engine, root: Path, steps: int, size: tuple[int, int]) -> float:
    """diffusers' img2img at the hires size over the engine's modules: SDXL from latents of that size (the latent
    upscale's hand-over), Flux from a picture of it (its img2img pipeline encodes what it is given)."""
    from diffusers import AutoPipelineForImage2Image

    device = engine.memory.device
    pipe = AutoPipelineForImage2Image.from_pipe(case.reference(engine, root, str(device)))
    pipe.set_progress_bar_config(disable=True)
    factor = engine.models.current.vae_scale_factor
    image = (torch.randn(1, 4, size[1] // factor, size[0] // factor, device=device, dtype=pipe.unet.dtype)
             if case.name == "SDXL" else Image.new("RGB", size, (120, 110, 100)))
    kwargs = dict(guidance_scale=case.cfg) | case.pipe_kwargs
    run = lambda: pipe(prompt=next(PROMPTS), image=image, strength=STRENGTH, num_inference_steps=steps,  # noqa: E731
                       width=size[0], height=size[1], generator=torch.Generator().manual_seed(1), **kwargs)
    timed(run)  # warm-up
    return timed(run)[0]


def row(label: str, where: str, seconds: float, result, reference: str) -> str:
    stats = result.memory
    return (f"| {label} | {where} | {seconds * 1000:.0f} ms | {reference} | {stats.peak_vram_mb:.0f} MB | "
            f"{stats.moved_mb / 1024:.1f} GB | {phases(result, seconds)} |")


def label(case: Case, scale: float, upscaler: str) -> str:
    return f"{case.label} → {int(case.width * scale)}² {upscaler}"


def resident_rows(case: Case, checkpoint: str, root: Path, scale: float, steps: int, upscaler: str) -> list[str]:
    engine = engine_for(case, checkpoint, root, SWAP)
    write_esrgan(engine)
    engine.txt2img(request(case, scale, steps, True, upscaler))  # warm-up: loads the model, learns the rates
    first, first_result = timed(lambda: engine.txt2img(request(case, scale, steps, False, upscaler)))
    seconds, result = timed(lambda: engine.txt2img(request(case, scale, steps, True, upscaler)))
    rows = [row(f"{case.label}, first pass alone", "resident", first, first_result, "—")]
    print(rows[0], flush=True)
    second = result.timings.get("hires denoise", 0.0)
    size = (int(case.width * scale), int(case.height * scale))
    plain = reference_second_pass(case, engine, root, steps, size)
    engine.models.unload()
    return rows + [row(label(case, scale, upscaler), "resident", seconds, result,
                       f"diffusers img2img {size[0]}²: {plain * 1000:.0f} ms; our hires pass {second * 1000:.0f} ms "
                       f"({second / plain:.2f}×)")]


def card_row(case: Case, checkpoint: str, root: Path, scale: float, steps: int, card: int, upscaler: str) -> str:
    engine = engine_for(case, checkpoint, root, SWAP)
    simulate_card(engine, card)
    engine.txt2img(request(case, scale, steps, True, upscaler))
    seconds, result = timed(lambda: engine.txt2img(request(case, scale, steps, True, upscaler)))
    fits = result.memory.peak_vram_mb <= card - CONTEXT_MB
    engine.models.unload()
    return row(label(case, scale, upscaler), f"{card // 1024} GB card", seconds, result,
               f"completes; peak within the card: {'yes' if fits else '**no**'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="sdxl", choices=sorted(HIRES_SCALE))
    parser.add_argument("--cards", default="8192,12288", help="simulated card sizes, MB")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--upscaler", default="Latent", help="a latent mode, or ESRGAN (a full-size ESRGAN 4x file)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-whole"))
    args = parser.parse_args()
    case, scale = dataclasses.replace(CASES[args.model], width=1024, height=1024), HIRES_SCALE[args.model]
    checkpoint = case.write(args.workdir)
    rows = []
    for card in (int(c) for c in args.cards.split(",") if c):  # the cards first: the reference is the longest part
        rows.append(card_row(case, checkpoint, args.workdir, scale, args.steps, card, args.upscaler))
        print(rows[-1], flush=True)
        gc.collect()
        torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(1.0)
    rows += resident_rows(case, checkpoint, args.workdir, scale, args.steps, args.upscaler)
    print_table("Hires. fix (issue 25)",
                f"`python3 -m benchmarks.hires --model {args.model} --cards {args.cards} --steps {args.steps} "
                f"--upscaler {args.upscaler}` — full-size {case.name}, Euler, denoising {STRENGTH}, a new prompt "
                "each image.",
                ["job", "where", "whole image", "reference / goal", "peak VRAM", "moved", "phases (ms)"], rows)


if __name__ == "__main__":
    main()
