"""The resident denoiser replayed as a CUDA graph (issue 33), in whole images as a user gets them (as
``benchmarks.whole_image``: text encoding, 20 or 28 steps, VAE decode, a new prompt each image, no synchronisation
inside the loop): graphs beside eager and beside diffusers' pipeline over the same modules, in one process, with the
floor beside each.

    python3 -m benchmarks.graphs [--only sd15,sdxl,sd35-fp8,flux-q8] [--repeat 3] [--workdir /tmp/bench-whole]

The floor is steps × one replayed denoiser call (the captured graph replayed alone, timed by CUDA events) + the
image's text encoding + its VAE decode (the graphed image's own phases). Goal: within 1.2× of the floor in every row,
SD1.5 512² ≤ 350 ms on an H100. Also reported: the device memory of each captured shape (its pool and static
inputs) and the capture's time (warm-up calls and capture).
"""
from __future__ import annotations

import argparse
import functools
import statistics
from pathlib import Path

import torch

from benchmarks.table import print_table
from benchmarks.whole_image import CASES, engine_for, median, ours, reference, release
from webui.engine.graphs import graphs_of

GOAL = 1.2
SD15_GOAL_MS = 350


def replay_ms(captured, calls: int = 20, repeat: int = 3) -> float:
    """One replay of a captured call, ms (the median of ``repeat`` runs of ``calls`` replays)."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(calls):
            captured.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / calls)
    return statistics.median(times)


def case_row(key: str, root: Path, repeat: int) -> str:
    case = CASES[key]
    checkpoint = case.write(root)
    engine = engine_for(case, checkpoint, root, ("Async", "Shared"))
    engine.options.update({"cuda_graphs": True, "compile_denoiser": False, "attention_backend": "SDPA"})
    first, _ = ours(engine, case)  # captures
    graphed = median(repeat, lambda: ours(engine, case)[0])
    _, result = ours(engine, case)
    held = graphs_of(engine.models.current.denoiser, engine.memory.device)
    captured = next(reversed(held.calls.values()))
    step = replay_ms(captured)
    timings = result.timings
    floor = (case.steps * step + (timings.get("encode", 0) + timings.get("decode", 0)) * 1000)
    engine.options.update({"cuda_graphs": False})
    eager = median(repeat, lambda: ours(engine, case)[0])
    pipe = case.reference(engine, root, str(engine.memory.device))
    plain = median(repeat, functools.partial(reference, pipe, case))
    del pipe
    release(engine)
    ratio = graphed * 1000 / floor
    met = ratio <= GOAL and (key != "sd15" or graphed * 1000 <= SD15_GOAL_MS)
    return (f"| {case.label} | {graphed * 1000:.0f} ms | {eager * 1000:.0f} ms ({eager / graphed:.2f}×) | "
            f"{plain * 1000:.0f} ms ({plain / graphed:.2f}×) | {floor:.0f} ms ({case.steps} × {step:.1f} + encode "
            f"{timings.get('encode', 0) * 1000:.0f} + decode {timings.get('decode', 0) * 1000:.0f}) | {ratio:.2f}× | "
            f"≤ {GOAL}×{' and ≤ 350 ms' if key == 'sd15' else ''} | {'yes' if met else '**no**'} | "
            f"{captured.nbytes / 2**20:.0f} MB | {captured.seconds:.2f} s (first image {first * 1000:.0f} ms) | "
            f"{result.memory.peak_vram_mb:.0f} MB |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="sd15,sdxl,sd35-fp8,flux-q8")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-whole"))
    args = parser.parse_args()
    rows = []
    for key in args.only.split(","):
        rows.append(case_row(key, args.workdir, args.repeat))
        print(rows[-1], flush=True)
    print_table("The resident denoiser as a CUDA graph (issue 33)",
                f"`python3 -m benchmarks.graphs --only {args.only} --repeat {args.repeat}` — whole images (encode, "
                f"every step, decode; a new prompt each image; Euler), medians of {args.repeat}, one process. Floor: "
                "steps × one replayed call + the image's encode and decode.",
                ["model", "graphs", "eager (÷ graphs)", "diffusers pipeline (÷ graphs)", "floor", "graphs ÷ floor",
                 "goal", "met", "memory per shape", "capture", "peak VRAM"], rows)


if __name__ == "__main__":
    main()
