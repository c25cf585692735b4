"""Whole images per sampler (issue 21): A1111's samplers on diffusers' schedulers and in sigma space (k-diffusion's
functions, the CPU's noise), beside the plain diffusers pipeline over the same modules, in one run — full-size SD1.5
with random weights, 512², 20 steps, CFG 7, a new prompt for each image, as a user gets them.

    python3 -m benchmarks.samplers [--workdir /tmp/bench] [--repeat 3]

Goals: a pair on a diffusers scheduler ≤ 1.05× the pipeline with that scheduler; a sigma-space pair ≤ 1.10× the same
sampler on its diffusers scheduler (the denoiser wrapper, noise drawn on the CPU and copied each step).
"""
from __future__ import annotations

import argparse
import copy
import statistics
import time
from pathlib import Path

import torch

from benchmarks.memory import engine_for, write_checkpoint

SIZE, STEPS, CFG = 512, 20, 7.0
# (sampler, schedule type, the pair it is compared with where no diffusers scheduler runs it)
CASES = [("DPM++ 2M", "Karras", None), ("Euler a", "Automatic", None), ("DPM++ SDE", "Karras", None),
         ("DPM++ 2M SDE", "Exponential", None), ("DDIM", "Automatic", None),
         ("Euler a", "Karras", ("Euler a", "Automatic")), ("DPM++ 2M", "KL Optimal", ("DPM++ 2M", "Karras")),
         ("DPM++ 2M SDE Heun", "Align Your Steps", ("DPM++ 2M SDE", "Exponential")),
         ("DPM++ 2S a", "Karras", ("Euler a", "Automatic"))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--repeat", type=int, default=3)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from diffusers import StableDiffusionPipeline

    from webui.engine.request import GenerationRequest
    from webui.engine.samplers import choose

    engine = engine_for(write_checkpoint("sd1", args.workdir / "SD1.5.safetensors"), args.workdir)
    prompts = (f"a photo of a cat number {i}" for i in range(10_000))

    def ours(sampler: str, schedule: str) -> float:
        request = GenerationRequest(prompt=next(prompts), width=SIZE, height=SIZE, steps=STEPS, cfg_scale=CFG,
                                    sampler_name=sampler, scheduler=schedule, seed=1, save_images=False)
        torch.cuda.synchronize()
        start = time.perf_counter()
        engine.txt2img(request)
        return time.perf_counter() - start

    ours("DPM++ 2M", "Karras")  # load, place, warm up
    model = engine.models.current
    # The pipeline feeds the VAE latents in the UNet's fp16; ours runs the VAE in bf16: give it an fp16 copy.
    pipe = StableDiffusionPipeline(vae=copy.deepcopy(model.vae).half(), text_encoder=model.text_encoders[0].model,
                                   tokenizer=model.text_encoders[0].tokenizer, unet=model.denoiser, scheduler=None,
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def plain(sampler: str, schedule: str) -> float:
        pipe.scheduler = choose(sampler, schedule).scheduler(model.scheduler_config, seed=[1])
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(prompt=next(prompts), width=SIZE, height=SIZE, num_inference_steps=STEPS, guidance_scale=CFG,
             generator=torch.Generator().manual_seed(1))
        torch.cuda.synchronize()
        return time.perf_counter() - start

    measured: dict[tuple[str, str], float] = {}
    rows = []
    for sampler, schedule, against in CASES:
        path = "diffusers scheduler" if choose(sampler, schedule).native else "sigma space"
        ours(sampler, schedule)  # its first image warms its kernels up
        mine = statistics.median(ours(sampler, schedule) for _ in range(args.repeat))
        measured[(sampler, schedule)] = mine
        if against is None:
            plain(sampler, schedule)
            reference, what, goal = statistics.median(plain(sampler, schedule) for _ in range(args.repeat)), \
                "diffusers pipeline, same scheduler", 1.05
        else:
            reference, what, goal = measured[against], f"ours, {against[0]} / {against[1]}", 1.10
        ratio = mine / reference
        rows.append(f"| {sampler} / {schedule} | {path} | {mine * 1000:.0f} ms | {reference * 1000:.0f} ms ({what}) | "
                    f"{ratio:.2f}× | ≤ {goal:.2f}× | {'yes' if ratio <= goal else '**no**'} |")
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    print(f"## Samplers: whole images (issue 21) — {time.strftime('%Y-%m-%d')}, {device}\n")
    print(f"`python3 -m benchmarks.samplers --repeat {args.repeat}` — SD1.5 full size, random weights, {SIZE}², "
          f"{STEPS} steps, CFG {CFG:g}, a new prompt each image; medians of {args.repeat}.\n")
    print("| sampler / schedule type | runs on | ours | reference | ratio | goal | met |")
    print("|---|---|---|---|---|---|---|")
    print("\n".join(rows))


if __name__ == "__main__":
    main()
