"""Whole images as a user gets them (issue 24): text encoding, every step, VAE decode, a new prompt each image, no
synchronisation inside the loop — resident beside the diffusers pipeline over the same modules, and on simulated
small cards beside the floor and diffusers' offload under the same allocator cap.

    python3 -m benchmarks.whole_image [--only sd15,sdxl,flux-q8,sd35-fp8] [--cards 4096,6144,8192,12288]
                                      [--repeat 3] [--swap Async,Shared]

Full-size random weights written as the files users have: SD1.5 (512²) and SDXL (1024²) single files, CFG 7, 20
steps; Flux-dev as a Q8_0 GGUF with clip_l, t5xxl_fp8_e4m3fn and ae (1344×768, 20 steps, distilled CFG 3.5; the
resident reference runs diffusers' own GGUF path on the same file); SD3.5 Large FP8 with clip_l, clip_g, the fp8 T5
and its VAE (1024², 28 steps, CFG 4.5). Euler everywhere. ``--swap`` sets Forge's Swap Method and Swap Location
(default: the app's). On a card (``pipelines.simulate_card``: the manager sees that total, the allocator refuses more
than it less a CUDA context), Forge's default 1024 MB kept for computation. The floor is our resident whole image
plus the bytes that must cross the bus for the image at the pinned bandwidth measured in the run: per step, what of
the denoiser does not fit beside its activations (measured in the resident run), and per image the text encoders
and VAE when they cannot stay beside it. diffusers' offload is its model offload where the denoiser fits the card
whole, else its group offload (a block at a time, copies on a side stream), whose device use does not depend on the
card: it is measured once, under the smallest card's cap. Goals: resident ≤ 1.0× the pipeline; on a card ≤ 1.15× the
floor and ≤ 0.6× diffusers' offload; peak VRAM within the card; the forecast made before the image ("will it fit?",
from the rates of the images before it) within ±15 % of its peak VRAM and time.
"""
from __future__ import annotations

import argparse
import functools
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from benchmarks.memory import diffusers_pipeline, pinned_bandwidth, write_checkpoint
from benchmarks.pipelines import (CONTEXT_MB, FLUX_MODULES, SD3_MODULES, simulate_card, write_flux_q8, write_modules,
                                  write_sd35)
from benchmarks.table import print_table
from webui.engine.memory import MB

PROMPTS = (f"a photo of a cat number {i}" for i in range(1_000_000))  # a new prompt for every image


@dataclass
class Case:
    """One model as the benchmark runs it."""

    name: str
    width: int
    height: int
    steps: int
    cfg: float
    write: Callable[[Path], str]  # writes its files under the models folder (once); the checkpoint's file name
    reference: Callable[[object, Path, str], object]  # (engine, models folder, device of its own weights) → diffusers
    # pipeline over the same modules
    modules: tuple[str, ...] = ()  # "VAE / Text Encoder" files
    pipe_kwargs: dict = field(default_factory=dict)  # the reference call's guidance fields
    fields: dict = field(default_factory=dict)  # the request's fields beyond the common ones

    @property
    def label(self) -> str:
        size = f"{self.width}²" if self.width == self.height else f"{self.width}×{self.height}"
        return f"{self.name} {size}"


def sd_file(family: str, name: str) -> Callable[[Path], str]:
    return lambda root: write_checkpoint(family, root / "Stable-diffusion" / f"{name}.safetensors").name


def flux_file(root: Path) -> str:
    write_modules(root)
    return write_flux_q8(root).name


def sd35_file(root: Path) -> str:
    write_modules(root)
    return write_sd35(root, torch.float8_e4m3fn, "sd3.5_large_fp8.safetensors").name


def sd_reference(engine, root: Path, device: str):
    return diffusers_pipeline(engine)


def flux_reference(engine, root: Path, device: str):
    """diffusers' FluxPipeline: its own GGUF transformer read from the same file, our text encoders and VAE."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel, GGUFQuantizationConfig

    model = engine.models.current
    config = root / "flux-config"
    model.denoiser.save_config(config)
    transformer = FluxTransformer2DModel.from_single_file(
        str(model.info.path), config=str(config), torch_dtype=torch.bfloat16, local_files_only=True,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16))
    clip = model.text_encoders[0]
    pipe = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
                                                  base_image_seq_len=256, max_image_seq_len=4096),
        vae=model.vae, text_encoder=clip.model, tokenizer=clip.tokenizer, text_encoder_2=model.t5.model,
        tokenizer_2=model.t5.tokenizer, transformer=transformer.to(device))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd3_reference(engine, root: Path, device: str):
    """diffusers' StableDiffusion3Pipeline over our modules."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    model = engine.models.current
    (clip_l, clip_g) = model.text_encoders
    pipe = StableDiffusion3Pipeline(
        transformer=model.denoiser, scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0), vae=model.vae,
        text_encoder=projected(clip_l.model), tokenizer=clip_l.tokenizer, text_encoder_2=clip_g.model,
        tokenizer_2=clip_g.tokenizer, text_encoder_3=model.t5.model, tokenizer_3=model.t5.tokenizer)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def projected(clip: torch.nn.Module) -> torch.nn.Module:
    """SD3's CLIP-L files carry no projection (SD3's is the identity) and load as a CLIPTextModel; diffusers' pipeline
    reads a projected output: the same module under an identity projection."""
    from transformers import CLIPTextModelWithProjection

    if isinstance(clip, CLIPTextModelWithProjection):
        return clip
    with torch.device("meta"):
        wrapped = CLIPTextModelWithProjection(clip.config)
    wrapped.text_model, wrapped.text_projection = clip, torch.nn.Identity()
    return wrapped


CASES = {
    "sd15": Case("SD1.5", 512, 512, 20, 7.0, sd_file("sd1", "SD1.5"), sd_reference),
    "sdxl": Case("SDXL", 1024, 1024, 20, 7.0, sd_file("sdxl", "SDXL"), sd_reference),
    "flux-q8": Case("Flux-dev Q8_0", 1344, 768, 20, 1.0, flux_file, flux_reference, tuple(FLUX_MODULES),
                    dict(guidance_scale=3.5, max_sequence_length=256), dict(distilled_cfg_scale=3.5)),
    "sd35-fp8": Case("SD3.5 Large FP8", 1024, 1024, 28, 4.5, sd35_file, sd3_reference, tuple(SD3_MODULES),
                     dict(max_sequence_length=256)),
}


@dataclass
class Resident:
    seconds: float
    activation_mb: float  # the whole image's measured peak above the weights


def engine_for(case: Case, checkpoint: str, root: Path, swap: tuple[str, str], device: str = "cuda"):
    """An engine on ``root``'s models folder, set for ``case``: its modules, the swap options, no saving."""
    from webui.cli import parse_args
    from webui.engine.engine import Engine
    from webui.settings import AppConfig

    args = ["--data-dir", str(root / "data"), "--models-dir", str(root), "--device", device]
    engine = Engine(AppConfig.from_args(parse_args(args)))
    engine.options.update({"samples_save": False, "forge_additional_modules": list(case.modules),
                           "forge_async_loading": swap[0], "forge_pin_shared_memory": swap[1],
                           "sd_model_checkpoint": checkpoint})
    return engine


def ours(engine, case: Case, suffix: str = ""):
    """One image through the engine, ``suffix`` after its new prompt: (seconds, its GenerationResult)."""
    from webui.engine.request import GenerationRequest

    request = GenerationRequest(prompt=next(PROMPTS) + suffix, width=case.width, height=case.height, steps=case.steps,
                                cfg_scale=case.cfg, sampler_name="Euler", scheduler="Automatic", seed=1,
                                save_images=False, **case.fields)
    synchronize()
    start = time.perf_counter()
    result = engine.txt2img(request)
    return time.perf_counter() - start, result


def reference(pipe, case: Case) -> float:
    """Seconds of one image of a diffusers pipeline, synchronised only around it."""
    kwargs = dict(guidance_scale=case.cfg) | case.pipe_kwargs
    synchronize()
    start = time.perf_counter()
    pipe(prompt=next(PROMPTS), width=case.width, height=case.height, num_inference_steps=case.steps,
         generator=torch.Generator().manual_seed(1), **kwargs)
    synchronize()
    return time.perf_counter() - start


def synchronize() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def forecast_cell(result, seconds: float) -> str:
    """The forecast made before the image beside what it did: peak VRAM and time, each as forecast ÷ measured."""
    forecast = result.forecast
    peak, measured_peak = forecast.peak_vram / MB, result.memory.peak_vram_mb
    if forecast.seconds is None:
        return f"peak {peak:.0f} MB ({peak / measured_peak:.2f}×), time unknown"
    ratios = (peak / measured_peak, forecast.seconds / seconds)
    met = all(abs(r - 1) <= 0.15 for r in ratios)
    by_phase = " / ".join(f"{name} {phase * 1000:.0f}" for name, phase in forecast.phase_seconds().items())
    return (f"peak {peak:.0f} MB ({ratios[0]:.2f}×), {forecast.seconds * 1000:.0f} ms ({ratios[1]:.2f}×)"
            f"{'' if met else f' **off** ({by_phase})'}")


def phases(result, seconds: float) -> str:
    """Each phase's time (ms), the whole image's time outside them, and the out-of-memory retries (a retried
    batch's phases add up)."""
    retries, outside = result.memory.oom_retries, seconds - sum(result.timings.values())
    return " / ".join(f"{name} {phase * 1000:.0f}" for name, phase in result.timings.items()) + (
        f" / other {outside * 1000:.0f}") + (
        f" — {retries} out-of-memory retr{'y' if retries == 1 else 'ies'}" if retries else "")


def median(repeat: int, run) -> float:
    run()  # warm-up
    return statistics.median(run() for _ in range(repeat))


def sizes_mb(engine) -> dict[str, float]:
    return {name: c.nbytes / MB for name, c in engine.memory.components.items()}


def release(engine) -> None:
    engine.models.unload()
    gc.collect()
    torch.cuda.empty_cache()


def resident_row(case: Case, engine, root: Path, repeat: int) -> tuple[str, Resident]:
    mine = median(repeat, lambda: ours(engine, case)[0])
    last, result = ours(engine, case)
    activation = result.memory.peak_vram_mb - sum(sizes_mb(engine).values())
    pipe = case.reference(engine, root, str(engine.memory.device))
    plain = median(repeat, functools.partial(reference, pipe, case))
    del pipe
    release(engine)
    ratio = mine / plain
    row = (f"| {case.label} | resident | {mine * 1000:.0f} ms | pipeline {plain * 1000:.0f} ms | {ratio:.2f}× | "
           f"≤ 1.0× | {'yes' if ratio <= 1.0 else '**no**'} | {result.memory.peak_vram_mb:.0f} MB | 0 | "
           f"{forecast_cell(result, last)} | {phases(result, last)} |")
    return row, Resident(mine, activation)


def offload_kind(engine, card_mb: int) -> str:
    """diffusers' best offload on this card: model offload where the denoiser fits it whole beside Forge's default
    1024 MB for computation, else group offload with a side stream."""
    denoiser_mb = engine.memory.components["denoiser"].nbytes / MB
    return "model offload" if denoiser_mb <= card_mb - CONTEXT_MB - 1024 else "group offload"


def offload_seconds(case: Case, engine, root: Path, kind: str, repeat: int) -> float | str:
    """diffusers' offload under the card's cap, over the engine's modules (which leave the device first): its
    seconds, or why it did not run."""
    try:
        pipe = case.reference(engine, root, "cpu")
        engine.models.unload()
        pipe.to("cpu")
        if kind == "model offload":
            pipe.enable_model_cpu_offload()
        else:
            pipe.enable_group_offload(torch.device("cuda"), offload_type="block_level", num_blocks_per_group=1,
                                      use_stream=True)
        return median(max(1, repeat - 1), functools.partial(reference, pipe, case))
    except torch.OutOfMemoryError:
        return "out of memory"
    except Exception as e:  # a reference that cannot run says so in its cell; our rows still count
        return f"failed ({type(e).__name__}: {str(e)[:80]})"
    finally:
        pipe = None
        engine.models.unload()
        gc.collect()
        torch.cuda.empty_cache()


def floor_seconds(sizes: dict[str, float], card_mb: int, activation_mb: float, resident_s: float,
                  bandwidth: float, steps: int) -> float:
    usable = card_mb - CONTEXT_MB - activation_mb
    per_step = max(0.0, sizes["denoiser"] - usable)
    others = sum(mb for name, mb in sizes.items() if name != "denoiser")
    per_image = others if sizes["denoiser"] + others > usable else 0.0
    return resident_s + (steps * per_step + per_image) * MB / bandwidth


def card_row(case: Case, checkpoint: str, root: Path, swap: tuple[str, str], repeat: int, card_mb: int,
             base: Resident, bandwidth: float, group_offloads: dict[str, float | str]) -> str:
    engine = engine_for(case, checkpoint, root, swap)
    simulate_card(engine, card_mb)
    mine = median(repeat, lambda: ours(engine, case)[0])
    last, result = ours(engine, case)
    floor = floor_seconds(sizes_mb(engine), card_mb, base.activation_mb, base.seconds, bandwidth, case.steps)
    kind = offload_kind(engine, card_mb)
    if kind == "group offload" and case.name in group_offloads:  # measured on a smaller card: it is the same here
        offload = group_offloads[case.name]
        engine.models.unload()
    else:
        offload = offload_seconds(case, engine, root, kind, repeat)
        if kind == "group offload" and not isinstance(offload, str):  # one that failed may run on a larger card
            group_offloads[case.name] = offload
    versus = (f"{kind}: {offload}" if isinstance(offload, str) else
              f"{kind} {offload * 1000:.0f} ms, ours {mine / offload:.2f}× of it (≤ 0.6×)")
    ratio, stats = mine / floor, result.memory
    met = ratio <= 1.15 and stats.peak_vram_mb <= card_mb - CONTEXT_MB
    return (f"| {case.label} | {card_mb // 1024} GB card | {mine * 1000:.0f} ms | floor {floor * 1000:.0f} ms; "
            f"{versus} | {ratio:.2f}× | ≤ 1.15× floor | {'yes' if met else '**no**'} | "
            f"{stats.peak_vram_mb:.0f} MB | {stats.moved_mb / 1024:.1f} GB | {forecast_cell(result, last)} | "
            f"{phases(result, last)} |")


def main() -> None:
    from webui.settings import OPTION_DEFAULTS

    default_swap = f"{OPTION_DEFAULTS['forge_async_loading']},{OPTION_DEFAULTS['forge_pin_shared_memory']}"
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="sd15,sdxl")
    parser.add_argument("--cards", default="4096,6144,8192,12288", help="simulated card sizes, MB ('' for none)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--swap", default=default_swap, help="Swap Method,Swap Location (Queue|Async,CPU|Shared)")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-whole"))
    args = parser.parse_args()
    swap = tuple(args.swap.split(","))
    cards = [int(c) for c in args.cards.split(",") if c]
    bandwidth = pinned_bandwidth()
    rows, group_offloads = [], {}
    for key in args.only.split(","):
        case = CASES[key]
        checkpoint = case.write(args.workdir)
        row, base = resident_row(case, engine_for(case, checkpoint, args.workdir, swap), args.workdir, args.repeat)
        print(row, flush=True)
        rows.append(row)
        for card in sorted(cards):
            rows.append(card_row(case, checkpoint, args.workdir, swap, args.repeat, card, base, bandwidth, group_offloads))
            print(rows[-1], flush=True)
            gc.collect()  # the engine and the pipeline of this card are gone: the next card starts empty
            torch.cuda.empty_cache()
        torch.cuda.set_per_process_memory_fraction(1.0)
    print_table("Whole images (issue 24)",
                f"`python3 -m benchmarks.whole_image --only {args.only} --cards {args.cards} --repeat {args.repeat} "
                f"--swap {args.swap}` — Euler, a new prompt each image, medians of {args.repeat}; pinned "
                f"host→GPU {bandwidth / 1e9:.1f} GB/s.",
                ["model", "where", "ours", "reference", "ratio", "goal", "met", "peak VRAM", "moved per image",
                 "forecast before it (÷ measured)", "phases (ms)"], rows)


if __name__ == "__main__":
    main()
