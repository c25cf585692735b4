"""Whole images per sampler (issue 21): A1111's samplers on diffusers' schedulers and in sigma space (k-diffusion's
functions, the CPU's noise), beside the plain diffusers pipeline over the same modules, in one run — full-size SD1.5
with random weights, 512², 20 steps, CFG 7, a new prompt for each image, as a user gets them.

    python3 -m benchmarks.samplers [--workdir /tmp/bench] [--repeat 3]

Goals: a pair on a diffusers scheduler ≤ 1.05× the pipeline with that scheduler; a sigma-space pair ≤ 1.10× the same
sampler on its diffusers scheduler (the denoiser wrapper, noise drawn on the CPU and copied each step). The sigma-space
pairs again on a simulated 2 GB card (the UNet partly streamed), against the same sampler's diffusers pair there.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from pathlib import Path

import torch

from benchmarks.memory import engine_for, pipeline_image, write_checkpoint
from benchmarks.pipelines import simulate_card
from benchmarks.table import print_table

SIZE, STEPS, CFG = 512, 20, 7.0
CARD_MB = 2048
# (sampler, schedule type, the pair it is compared with where no diffusers scheduler runs it)
CASES = [("DPM++ 2M", "Karras", None), ("Euler a", "Automatic", None), ("DPM++ SDE", "Karras", None),
         ("DPM++ 2M SDE", "Exponential", None), ("DDIM", "Automatic", None), ("DPM2 a", "Automatic", None),
         ("Euler a", "Karras", ("Euler a", "Automatic")), ("DPM++ 2M", "KL Optimal", ("DPM++ 2M", "Karras")),
         ("DPM++ 2M SDE Heun", "Align Your Steps", ("DPM++ 2M SDE", "Exponential")),
         ("DPM++ 2S a", "Karras", ("DPM2 a", "Automatic"))]  # two UNet evaluations a step, like DPM2 a


PROMPTS = (f"a photo of a cat number {i}" for i in range(1_000_000))  # a new prompt for every image


def whole_image(engine, sampler: str, schedule: str) -> float:
    """Seconds of one image through the engine, as a user gets it."""
    from webui.engine.request import GenerationRequest

    request = GenerationRequest(prompt=next(PROMPTS), width=SIZE, height=SIZE, steps=STEPS, cfg_scale=CFG,
                                sampler_name=sampler, scheduler=schedule, seed=1, save_images=False)
    torch.cuda.synchronize()
    start = time.perf_counter()
    engine.txt2img(request)
    return time.perf_counter() - start


def median_of(repeat: int, run) -> float:
    run()  # a first image warms its kernels up
    return statistics.median(run() for _ in range(repeat))


def pipeline_over(engine):
    """The plain diffusers pipeline over the engine's loaded modules; a function timing one of its images."""
    from diffusers import StableDiffusionPipeline

    model = engine.models.current
    # The pipeline feeds the VAE latents in the UNet's fp16; ours runs the VAE in bf16: give it an fp16 copy.
    pipe = StableDiffusionPipeline(vae=copy.deepcopy(model.vae).half(), text_encoder=model.text_encoders[0].model,
                                   tokenizer=model.text_encoders[0].tokenizer, unet=model.denoiser, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def plain(sampler: str, schedule: str) -> float:
        pipe.scheduler = engine.samplers.choose(sampler, schedule).scheduler(model.scheduler_config, seed=[1])
        return pipeline_image(pipe, next(PROMPTS), SIZE, STEPS, CFG)

    return plain


def resident_rows(engine, repeat: int) -> list[str]:
    whole_image(engine, "DPM++ 2M", "Karras")  # load and place
    plain = pipeline_over(engine)
    measured: dict[tuple[str, str], float] = {}
    rows = []
    for sampler, schedule, against in CASES:
        path = "diffusers scheduler" if engine.samplers.choose(sampler, schedule).native else "sigma space"
        mine = measured[(sampler, schedule)] = median_of(repeat, lambda: whole_image(engine, sampler, schedule))
        if against is None:
            reference, what, goal = median_of(repeat, lambda: plain(sampler, schedule)), \
                "diffusers pipeline, same scheduler", 1.05
        else:
            reference, what, goal = measured[against], f"ours, {against[0]} / {against[1]}", 1.10
        rows.append(row(f"{sampler} / {schedule}", path, mine, reference, what, goal))
    return rows


def small_card_rows(engine, repeat: int) -> list[str]:
    """The sigma-space pairs with the UNet partly streamed, against the same sampler's diffusers pair there."""
    simulate_card(engine, CARD_MB)
    whole_image(engine, "DPM++ 2M", "Karras")  # load and place on the small card
    rows = []
    for sampler, schedule, against in CASES:
        if against is not None:
            native = median_of(repeat, lambda: whole_image(engine, *against))
            sigma = median_of(repeat, lambda: whole_image(engine, sampler, schedule))
            rows.append(row(f"{sampler} / {schedule}, {CARD_MB} MB card", "sigma space, streamed", sigma, native,
                            f"ours, {against[0]} / {against[1]}, same card", 1.10))
    return rows


def row(case: str, path: str, mine: float, reference: float, what: str, goal: float) -> str:
    ratio = mine / reference
    return (f"| {case} | {path} | {mine * 1000:.0f} ms | {reference * 1000:.0f} ms ({what}) | {ratio:.2f}× | "
            f"≤ {goal:.2f}× | {'yes' if ratio <= goal else '**no**'} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    checkpoint = write_checkpoint("sd1", args.workdir / "SD1.5.safetensors")
    rows = resident_rows(engine_for(checkpoint, args.workdir), args.repeat)
    gc.collect()
    torch.cuda.empty_cache()  # the first engine and the pipeline are gone: the card starts empty
    rows += small_card_rows(engine_for(checkpoint, args.workdir), args.repeat)
    print_table("Samplers: whole images (issue 21)",
                f"`python3 -m benchmarks.samplers --repeat {args.repeat}` — SD1.5 full size, random weights, {SIZE}², "
                f"{STEPS} steps, CFG {CFG:g}, a new prompt each image; medians of {args.repeat}.",
                ["sampler / schedule type", "runs on", "ours", "reference", "ratio", "goal", "met"], rows)


if __name__ == "__main__":
    main()
