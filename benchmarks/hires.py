"""Hires. fix on a small card (issue 25): SDXL 1024² → 2048² (Latent), whole images as a user gets them, resident and on
simulated cards, beside diffusers' img2img pipeline over the same modules for the second pass (its input the same
upscaled latents), and the first pass alone.

    python3 -m benchmarks.hires [--cards 8192,12288] [--steps 20] [--upscaler Latent|ESRGAN]

Full-size SDXL with random weights, Euler, CFG 7, denoising 0.5 (11 of 20 steps at 2048²). ``--upscaler ESRGAN``
upscales the decoded first pass with a full-size ESRGAN 4x (RRDBNet, 23 blocks, 64 filters: random weights in
BasicSR's layout, read by spandrel from models/ESRGAN) and encodes it again, instead of the latent upscale. Goals:
completes on an 8 GB card, its peak VRAM within the card; the second pass no slower than diffusers' img2img resident.
"""
from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from benchmarks.memory import diffusers_pipeline, engine_for, write_checkpoint
from benchmarks.pipelines import CONTEXT_MB, simulate_card
from benchmarks.table import print_table
from benchmarks.whole_image import phases

CFG, STRENGTH = 7.0, 0.5
PROMPTS = (f"a photo of a cat number {i}" for i in range(1_000_000))


ESRGAN_FILE = "4x-ESRGAN-random"


def request(steps: int, hires: bool, upscaler: str):
    from webui.engine.request import GenerationRequest

    return GenerationRequest(prompt=next(PROMPTS), width=1024, height=1024, steps=steps, cfg_scale=CFG,
                             sampler_name="Euler", scheduler="Automatic", seed=1, save_images=False, enable_hr=hires,
                             hr_scale=2, hr_upscaler=ESRGAN_FILE if upscaler == "ESRGAN" else upscaler,
                             denoising_strength=STRENGTH)


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


def reference_second_pass(engine, steps: int) -> float:
    """diffusers' SDXL img2img at 2048² over the engine's modules, from upscaled latents of the first pass's size."""
    from diffusers import StableDiffusionXLImg2ImgPipeline

    pipe = StableDiffusionXLImg2ImgPipeline(**diffusers_pipeline(engine).components)
    pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 256, 256, device="cuda", dtype=torch.float16)
    run = lambda: pipe(prompt=next(PROMPTS), image=latents, strength=STRENGTH, num_inference_steps=steps,  # noqa: E731
                       guidance_scale=CFG, width=2048, height=2048, generator=torch.Generator().manual_seed(1))
    timed(run)  # warm-up
    return timed(run)[0]


def row(name: str, where: str, seconds: float, result, reference: str) -> str:
    stats = result.memory
    return (f"| {name} | {where} | {seconds * 1000:.0f} ms | {reference} | {stats.peak_vram_mb:.0f} MB | "
            f"{stats.moved_mb / 1024:.1f} GB | {phases(result, seconds)} |")


def resident_rows(checkpoint: Path, workdir: Path, steps: int, upscaler: str) -> list[str]:
    engine = engine_for(checkpoint, workdir)
    write_esrgan(engine)
    engine.txt2img(request(steps, True, upscaler))  # warm-up: loads the model, learns the rates
    first, first_result = timed(lambda: engine.txt2img(request(steps, False, upscaler)))
    seconds, result = timed(lambda: engine.txt2img(request(steps, True, upscaler)))
    second = result.timings.get("hires denoise", 0.0)
    plain = reference_second_pass(engine, steps)
    engine.models.unload()
    return [row("SDXL 1024², first pass alone", "resident", first, first_result, "—"),
            row(f"SDXL 1024² → 2048² {upscaler}", "resident", seconds, result,
                f"diffusers img2img 2048²: {plain * 1000:.0f} ms; our hires pass {second * 1000:.0f} ms "
                f"({second / plain:.2f}×)")]


def card_row(checkpoint: Path, workdir: Path, steps: int, card: int, upscaler: str) -> str:
    engine = engine_for(checkpoint, workdir)
    simulate_card(engine, card)
    engine.txt2img(request(steps, True, upscaler))
    seconds, result = timed(lambda: engine.txt2img(request(steps, True, upscaler)))
    fits = result.memory.peak_vram_mb <= card - CONTEXT_MB
    engine.models.unload()
    return row(f"SDXL 1024² → 2048² {upscaler}", f"{card // 1024} GB card", seconds, result,
               f"completes; peak within the card: {'yes' if fits else '**no**'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", default="8192,12288", help="simulated card sizes, MB")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--upscaler", default="Latent", help="a latent mode, or ESRGAN (a full-size ESRGAN 4x file)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = write_checkpoint("sdxl", args.workdir / "SDXL.safetensors")
    rows = resident_rows(checkpoint, args.workdir, args.steps, args.upscaler)
    print(*rows, sep="\n", flush=True)
    for card in (int(c) for c in args.cards.split(",")):
        gc.collect()
        torch.cuda.empty_cache()
        rows.append(card_row(checkpoint, args.workdir, args.steps, card, args.upscaler))
        print(rows[-1], flush=True)
    print_table("Hires. fix (issue 25)",
                f"`python3 -m benchmarks.hires --cards {args.cards} --steps {args.steps} --upscaler {args.upscaler}` — "
                "full-size SDXL, Euler, "
                f"CFG {CFG:g}, denoising {STRENGTH}, a new prompt each image.",
                ["job", "where", "whole image", "reference / goal", "peak VRAM", "moved", "phases (ms)"], rows)


if __name__ == "__main__":
    main()
