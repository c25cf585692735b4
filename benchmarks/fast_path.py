"""The fast path (issue 26) in whole images as a user gets them (as ``benchmarks.whole_image``: a new prompt each
image, no synchronisation inside the loop), each model resident on the GPU, every variant beside eager SDPA in the
same process.

    python3 -m benchmarks.fast_path [--only sd15,sdxl,flux-q8,flux-bf16] [--variants compiled,lora,sage,...]
                                    [--repeat 2] [--workdir /tmp/bench-whole]

Variants: ``compiled`` (Compile the denoiser; its first image includes compiling, from the empty cache in the data
dir); ``warm`` (a new process's first compiled image, from that cache); ``lora-eager`` and ``lora`` (compiled): two LoRAs
of rank 16 taking turns, image after image (the graphs compiled after the first LoRA image are counted); ``sage`` and
``sage+compiled`` (SageAttention); ``fp8`` and ``fp8mm`` (the model stored in float8-e4m3fn, Forge's "Diffusion in
Low Bits", upcast per layer, and multiplied in fp8) and ``fp8mm+compiled``; ``streamed`` and ``streamed+compiled``
(a simulated card on which half the denoiser streams); ``graphs`` and ``compiled+graphs`` (the denoiser replayed as a
CUDA graph, on by default in the app and off in every other variant here). "Δ image" is the mean absolute difference from eager SDPA's
image (0-255 levels), same prompt and seed. Goals: compiled ≤ 0.6× eager for SD1.5 512², ≤ 0.7× for SDXL 1024²,
≤ 0.8× for Flux-dev (Q8_0, BF16) 1344×768; streamed+compiled ≤ streamed; Flux fp8mm ≤ 0.75× BF16 eager; a warm
start's compile ≤ 15 s.
"""
from __future__ import annotations

import argparse
import gc
import json
import statistics
import subprocess
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch._dynamo.utils import counters

from benchmarks.pipelines import simulate_card, write_flux_bf16, write_modules
from benchmarks.table import print_table
from benchmarks.whole_image import CASES as WHOLE_IMAGE_CASES
from benchmarks.whole_image import Case, engine_for, ours, release
from webui.engine.memory import MB

CASES = {**WHOLE_IMAGE_CASES, "flux-bf16": replace(
    WHOLE_IMAGE_CASES["flux-q8"], name="Flux-dev BF16", write=lambda root: (write_modules(root),
                                                                            write_flux_bf16(root).name)[1])}
GOALS = {"sd15": 0.6, "sdxl": 0.7, "flux-q8": 0.8, "flux-bf16": 0.8}
FP8_GOAL = 0.75
CACHES = (("inductor", "fxgraph_cache"), ("aot_autograd", "autograd_cache"))  # what a warm start should find
OPTIONS = {  # each variant's settings, over eager SDPA's
    "compiled": dict(compile_denoiser=True),
    "lora-eager": dict(),
    "lora": dict(compile_denoiser=True),
    "sage": dict(attention_backend="SageAttention"),
    "sage+compiled": dict(attention_backend="SageAttention", compile_denoiser=True),
    "fp8": dict(forge_unet_storage_dtype="float8-e4m3fn"),
    "fp8mm": dict(forge_unet_storage_dtype="float8-e4m3fn", fp8_matrix_mult=True),
    "fp8mm+compiled": dict(forge_unet_storage_dtype="float8-e4m3fn", fp8_matrix_mult=True, compile_denoiser=True),
    "streamed": dict(),
    "streamed+compiled": dict(compile_denoiser=True),
    "graphs": dict(cuda_graphs=True),
    "compiled+graphs": dict(compile_denoiser=True, cuda_graphs=True),
}
EAGER = dict(compile_denoiser=False, attention_backend="SDPA", forge_unet_storage_dtype="Automatic",
             fp8_matrix_mult=False, cuda_graphs=False)  # (graphs, on by default, are variants of their own here)


@dataclass
class Measured:
    seconds: float
    first: float  # its first image (a compile, a reload)
    delta: float  # Δ image from eager SDPA's
    compiles: int  # graphs compiled after its first image
    note: str = ""


def graphs() -> int:
    return counters["stats"]["unique_graphs"]


def fixed_image(engine, case: Case) -> np.ndarray:
    from webui.engine.request import GenerationRequest

    request = GenerationRequest(prompt="a lighthouse on a cliff at dusk", width=case.width, height=case.height,
                                steps=case.steps, cfg_scale=case.cfg, sampler_name="Euler", scheduler="Automatic",
                                seed=1, save_images=False, **case.fields)
    return np.asarray(engine.txt2img(request).images[0], dtype=np.int16)


def measure(engine, case: Case, repeat: int, reference: np.ndarray | None, suffixes: list[str] | None = None
            ) -> Measured:
    """The first image, then ``repeat`` more (median), then the fixed one for Δ image. ``suffixes``: one for each
    image's prompt (the LoRAs taking turns)."""
    suffix = iter(suffixes or [""] * (repeat + 1))
    first = ours(engine, case, next(suffix))[0]
    before = graphs()
    seconds = statistics.median(ours(engine, case, next(suffix))[0] for _ in range(repeat))
    compiled = graphs() - before
    image = fixed_image(engine, case)
    delta = float(np.abs(image - reference).mean()) if reference is not None else 0.0
    return Measured(seconds, first, delta, compiled)


def lora_prompts(engine, repeat: int) -> list[str]:
    """Two random LoRAs of rank 16 in the Lora folder; prompts that take them in turns."""
    from webui.engine.lora.network import _lora_components
    from webui.synthetic.lora_export import random_lora, write_lora

    model, folder = engine.models.current, engine.config.paths.lora_dir
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(("style", "other")):
        write_lora(folder / f"{name}.safetensors", random_lora(dict(_lora_components(model)), model.family, rank=16,
                                                               seed=seed), model.family, "kohya", torch.float16)
    return [f" <lora:{('style', 'other')[i % 2]}:{0.5 + 0.1 * (i % 3):.1f}>" for i in range(repeat + 1)]


def warm_start(args: argparse.Namespace, key: str) -> Measured | str:
    """A new process on the same data dir: its eager image, then its first compiled one (inductor's cache)."""
    out = subprocess.run([sys.executable, "-m", "benchmarks.fast_path", "--workdir", str(args.workdir), "--warm",
                          key], capture_output=True, text=True)
    if out.returncode:
        return f"failed: {out.stderr.strip().splitlines()[-1][:120] if out.stderr.strip() else out.returncode}"
    told = json.loads(out.stdout.strip().splitlines()[-1])
    print(out.stderr[-3000:], file=sys.stderr)  # (dynamo's compile times, by phase)
    return Measured(told["compiled"], told["first"], 0.0, 0, told["note"])


def warm_child(args: argparse.Namespace, key: str) -> None:
    from webui.extensions import load_extensions

    case = CASES[key]
    engine = engine_for(case, case.write(args.workdir), args.workdir, ("Async", "Shared"))
    engine.options.update(EAGER)
    load_extensions(engine)
    ours(engine, case)
    engine.options.update(OPTIONS["compiled"])
    first = ours(engine, case)[0]
    hits = {name: counters[group][f"{name}_hit"] for group, name in CACHES}
    misses = {name: counters[group][f"{name}_miss"] for group, name in CACHES}
    note = ", ".join(f"{name} cache {hits[name]} hit / {misses[name]} missed" for _, name in CACHES)
    print(torch._dynamo.utils.compile_times(), file=sys.stderr)
    print(json.dumps({"first": first, "compiled": ours(engine, case)[0], "note": note}))


def run_case(args: argparse.Namespace, key: str, variants: list[str]) -> list[str]:
    from webui.extensions import load_extensions

    case = CASES[key]
    checkpoint = case.write(args.workdir)
    engine = engine_for(case, checkpoint, args.workdir, ("Async", "Shared"))
    engine.options.update(EAGER)  # (the options store of the data dir keeps an earlier run's settings)
    load_extensions(engine)
    eager = measure(engine, case, args.repeat, None)
    reference = fixed_image(engine, case)
    rows = [row(case, "eager (SDPA)", eager, eager, "—")]
    print(rows[-1], flush=True)
    goal = GOALS.get(key, 1.0)
    for variant in variants:
        if variant.startswith("streamed") or variant == "warm":
            continue
        if variant.startswith("fp8") and not key.endswith("bf16"):
            continue
        engine.options.update(EAGER | OPTIONS[variant])
        try:
            measured = measure(engine, case, args.repeat, reference,
                               lora_prompts(engine, args.repeat) if variant.startswith("lora") else None)
        except Exception as e:  # a variant that cannot run says so in its row; the others still count
            rows.append(f"| {case.label} | {variant} | failed: {type(e).__name__}: {str(e)[:100]} |")
            continue
        target = (f"≤ {FP8_GOAL}× BF16 eager" if variant.startswith("fp8mm") else "no compile" if variant == "lora"
                  else f"≤ {goal}× eager" if "compiled" in variant else "—")
        rows.append(row(case, variant, measured, eager, target))
        print(rows[-1], flush=True)
    if "warm" in variants:
        release(engine)
        warm = warm_start(args, key)
        rows.append(f"| {case.label} | warm | {warm} |" if isinstance(warm, str) else
                    row(case, "compiled, new process (warm cache)", warm, eager, "compile ≤ 15 s"))
    if any(v.startswith("streamed") for v in variants):
        release(engine)
        rows += streamed_rows(args, case, checkpoint, reference)
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return rows


def streamed_rows(args: argparse.Namespace, case: Case, checkpoint: str, reference: np.ndarray) -> list[str]:
    """A card on which about half the denoiser streams: eager, then compiled (its resident blocks)."""
    probe = engine_for(case, checkpoint, args.workdir, ("Async", "Shared"))
    probe.options.update(EAGER)
    ours(probe, case)
    denoiser_mb = probe.memory.components["denoiser"].nbytes / MB
    release(probe)
    del probe
    card_mb = int(denoiser_mb * 0.5 + 6144)
    engine = engine_for(case, checkpoint, args.workdir, ("Async", "Shared"))
    engine.options.update(EAGER)
    simulate_card(engine, card_mb)
    rows, base = [], None
    for variant in ("streamed", "streamed+compiled"):
        engine.options.update(EAGER | OPTIONS[variant])
        measured = measure(engine, case, args.repeat, reference)
        _, result = ours(engine, case)
        measured.note = (f"{card_mb // 1024} GB card: {result.memory.streamed_mb / 1024:.1f} of "
                         f"{denoiser_mb / 1024:.1f} GB streamed, compiled={result.memory.compiled}")
        base = base or measured
        rows.append(row(case, variant, measured, base, "≤ streamed eager" if base is not measured else "—"))
        print(rows[-1], flush=True)
    release(engine)
    torch.cuda.set_per_process_memory_fraction(1.0)
    return rows


def row(case: Case, variant: str, m: Measured, eager: Measured, goal: str) -> str:
    ratio = m.seconds / eager.seconds
    met = "—" if goal == "—" else "yes" if _met(goal, ratio, m) else "**no**"
    return (f"| {case.label} | {variant} | {m.seconds * 1000:.0f} ms | {ratio:.2f}× | {goal} | {met} | "
            f"{m.first:.1f} s | {m.compiles} | {m.delta:.2f} | {m.note} |")


def _met(goal: str, ratio: float, m: Measured) -> bool:
    if goal == "no compile":
        return m.compiles == 0
    if goal.startswith("compile"):
        return m.first - m.seconds <= 15
    if goal.startswith("≤ streamed"):
        return ratio <= 1.0
    return ratio <= float(goal.split()[1].rstrip("×"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="sd15,sdxl")
    parser.add_argument("--variants", default="compiled,lora,sage,sage+compiled,warm")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-whole"))
    parser.add_argument("--warm", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.warm:
        return warm_child(args, args.warm)
    variants = args.variants.split(",")
    rows = []
    for key in args.only.split(","):
        rows += run_case(args, key, variants)
    print_table("The fast path (issue 26)",
                f"`python3 -m benchmarks.fast_path --only {args.only} --variants {args.variants} --repeat "
                f"{args.repeat}` — Euler, a new prompt each image, medians of {args.repeat} after a first image.",
                ["model", "variant", "whole image", "× eager", "goal", "met", "first image", "compiles after it",
                 "Δ image", "notes"], rows)


if __name__ == "__main__":
    main()
