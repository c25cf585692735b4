"""Whole images as a user gets them (issue 24): text encoding, 20 steps, VAE decode, a new prompt each image, no
synchronisation inside the loop — resident beside the diffusers pipeline over the same modules, and on simulated
small cards beside the floor and diffusers' model offload under the same allocator cap.

    python3 -m benchmarks.whole_image [--only sd15,sdxl] [--cards 4096,6144,8192,12288] [--repeat 3]

Full-size SD1.5 (512²) and SDXL (1024²) with random weights, CFG 7, Euler. On a card (``pipelines.simulate_card``:
the manager sees that total, the allocator refuses more than it less a CUDA context), Forge's default 1024 MB kept
for computation. The floor is our resident whole image plus the bytes that must cross the bus for the image at the
pinned bandwidth measured in the run: per step, what of the denoiser does not fit beside its activations (measured
in the resident run), and per image the text encoders and VAE when they cannot stay beside it. Goals: resident
≤ 1.0× the pipeline; on a card ≤ 1.15× the floor and ≤ 0.6× diffusers' offload; peak VRAM within the card; the
forecast made before the image ("will it fit?", from the rates of the images before it) within ±15 % of its peak VRAM
and time.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from benchmarks.memory import diffusers_pipeline, engine_for, pinned_bandwidth, pipeline_image, write_checkpoint
from benchmarks.pipelines import CONTEXT_MB, simulate_card
from benchmarks.table import print_table
from webui.engine.memory import MB

STEPS, CFG = 20, 7.0
MODELS = {"sd15": ("SD1.5", "sd1", 512), "sdxl": ("SDXL", "sdxl", 1024)}
PROMPTS = (f"a photo of a cat number {i}" for i in range(1_000_000))  # a new prompt for every image


@dataclass
class Resident:
    seconds: float
    activation_mb: float  # the denoiser's measured peak above the weights


def ours(engine, size: int):
    """One image through the engine: (seconds, its GenerationResult)."""
    from webui.engine.request import GenerationRequest

    request = GenerationRequest(prompt=next(PROMPTS), width=size, height=size, steps=STEPS, cfg_scale=CFG,
                                sampler_name="Euler", scheduler="Automatic", seed=1, save_images=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = engine.txt2img(request)
    return time.perf_counter() - start, result


def forecast_cell(result, seconds: float) -> str:
    """The forecast made before the image beside what it did: peak VRAM and time, each as forecast ÷ measured."""
    forecast = result.forecast
    peak, measured_peak = forecast.peak_vram / MB, result.memory.peak_vram_mb
    if forecast.seconds is None:
        return f"peak {peak:.0f} MB ({peak / measured_peak:.2f}×), time unknown"
    ratios = (peak / measured_peak, forecast.seconds / seconds)
    met = all(abs(r - 1) <= 0.15 for r in ratios)
    return (f"peak {peak:.0f} MB ({ratios[0]:.2f}×), {forecast.seconds * 1000:.0f} ms ({ratios[1]:.2f}×)"
            f"{'' if met else ' **off**'}")


def phases(result) -> str:
    """Where the image's time went, by phase (ms)."""
    return " / ".join(f"{name} {seconds * 1000:.0f}" for name, seconds in result.timings.items())


def reference(pipe, size: int) -> float:
    return pipeline_image(pipe, next(PROMPTS), size, STEPS, CFG)


def median(repeat: int, run) -> float:
    run()  # warm-up
    return statistics.median(run() for _ in range(repeat))


def sizes_mb(engine) -> dict[str, float]:
    return {name: c.nbytes / MB for name, c in engine.memory.components.items()}


def resident_row(name: str, checkpoint: Path, size: int, workdir: Path, repeat: int) -> tuple[str, Resident]:
    engine = engine_for(checkpoint, workdir)
    mine = median(repeat, lambda: ours(engine, size)[0])
    last, result = ours(engine, size)
    activation = result.memory.peak_vram_mb - sum(sizes_mb(engine).values())
    pipe = diffusers_pipeline(engine)
    plain = median(repeat, lambda: reference(pipe, size))
    engine.models.unload()
    ratio = mine / plain
    row = (f"| {name} {size}² | resident | {mine * 1000:.0f} ms | pipeline {plain * 1000:.0f} ms | {ratio:.2f}× | "
           f"≤ 1.0× | {'yes' if ratio <= 1.0 else '**no**'} | {result.memory.peak_vram_mb:.0f} MB | 0 | "
           f"{forecast_cell(result, last)} | {phases(result)} |")
    return row, Resident(mine, activation)


def floor_seconds(sizes: dict[str, float], card_mb: int, activation_mb: float, resident_s: float,
                  bandwidth: float) -> float:
    usable = card_mb - CONTEXT_MB - activation_mb
    per_step = max(0.0, sizes["denoiser"] - usable)
    others = sum(mb for name, mb in sizes.items() if name != "denoiser")
    per_image = others if sizes["denoiser"] + others > usable else 0.0
    return resident_s + (STEPS * per_step + per_image) * MB / bandwidth


def card_row(name: str, checkpoint: Path, size: int, workdir: Path, repeat: int, card_mb: int, base: Resident,
             bandwidth: float) -> str:
    engine = engine_for(checkpoint, workdir)
    simulate_card(engine, card_mb)
    mine = median(repeat, lambda: ours(engine, size)[0])
    last, result = ours(engine, size)
    floor = floor_seconds(sizes_mb(engine), card_mb, base.activation_mb, base.seconds, bandwidth)
    pipe = diffusers_pipeline(engine)
    engine.models.unload()
    pipe.enable_model_cpu_offload()
    try:
        offload = median(max(1, repeat - 1), lambda: reference(pipe, size))
        versus = f"offload {offload * 1000:.0f} ms, ours {mine / offload:.2f}× of it (≤ 0.6×)"
    except torch.OutOfMemoryError:
        versus = "offload: out of memory"
    ratio, stats = mine / floor, result.memory
    met = ratio <= 1.15 and stats.peak_vram_mb <= card_mb - CONTEXT_MB
    return (f"| {name} {size}² | {card_mb // 1024} GB card | {mine * 1000:.0f} ms | floor {floor * 1000:.0f} ms; "
            f"{versus} | {ratio:.2f}× | ≤ 1.15× floor | {'yes' if met else '**no**'} | "
            f"{stats.peak_vram_mb:.0f} MB | {stats.moved_mb / 1024:.1f} GB | {forecast_cell(result, last)} | "
            f"{phases(result)} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default=",".join(MODELS))
    parser.add_argument("--cards", default="4096,6144,8192,12288", help="simulated card sizes, MB")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    bandwidth = pinned_bandwidth()
    rows = []
    for key in args.only.split(","):
        name, family, size = MODELS[key]
        checkpoint = write_checkpoint(family, args.workdir / f"{name}.safetensors")
        row, base = resident_row(name, checkpoint, size, args.workdir, args.repeat)
        print(row, flush=True)
        rows.append(row)
        for card in (int(c) for c in args.cards.split(",")):
            rows.append(card_row(name, checkpoint, size, args.workdir, args.repeat, card, base, bandwidth))
            print(rows[-1], flush=True)
            gc.collect()  # the engine and the pipeline of this card are gone: the next card starts empty
            torch.cuda.empty_cache()
    print_table("Whole images (issue 24)",
                f"`python3 -m benchmarks.whole_image --only {args.only} --cards {args.cards} --repeat {args.repeat}` — "
                f"{STEPS} steps, Euler, CFG {CFG:g}, a new prompt each image, medians of {args.repeat}; pinned "
                f"host→GPU {bandwidth / 1e9:.1f} GB/s.",
                ["model", "where", "ours", "reference", "ratio", "goal", "met", "peak VRAM", "moved per image",
                 "forecast before it (÷ measured)", "phases (ms)"], rows)


if __name__ == "__main__":
    main()
