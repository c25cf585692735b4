"""Host stalls in the denoising loop (issue 24: a resident SD1.5 step cost 48 ms in a whole image, 1.7× the diffusers
pipeline's). For each sampler, one resident whole image (full-size SD1.5, random weights, 512², 20 steps, CFG 7):

- the calls that make the host wait for the GPU inside the denoise phase, counted with torch's sync debug mode
  ("warn") and grouped by the first frame of ours, diffusers' or k-diffusion's that made them;
- the host's time to queue the whole loop beside the GPU's time to run it: a loop without stalls returns to the host
  long before the GPU is done; one that waits every step does not.

    python3 -m benchmarks.host_stalls [--samplers "Euler,Euler a,DPM++ 2M,DPM++ 2M SDE"] [--workdir /tmp/bench]
"""
from __future__ import annotations

import argparse
import collections
import time
import traceback
import warnings
from pathlib import Path

import torch

from benchmarks.memory import engine_for, write_checkpoint
from benchmarks.table import print_table

STEPS = 20
OWN_CODE = ("/webui/", "/diffusers/", "/k_diffusion/")


def stall_site(stack: list[traceback.FrameSummary]) -> str:
    """The innermost frame of ours, diffusers' or k-diffusion's that led to a synchronisation."""
    for frame in reversed(stack):
        if any(part in frame.filename for part in OWN_CODE):
            return f"{frame.filename.split('/site-packages/')[-1].split('/work/')[-1]}:{frame.lineno} {frame.name}"
    return "elsewhere"


def measured_loop(family, denoise):
    """``family.denoise`` wrapped: it records the loop's host and GPU seconds and each synchronisation's site."""
    record = {"sites": collections.Counter()}

    def wrapped(*args, **kwargs):
        start_event, end_event = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        sites = []

        def note(message, category, filename, lineno, file=None, line=None):
            sites.append(stall_site(traceback.extract_stack()[:-1]))

        start_event.record()
        host_start = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("always")
            warnings.showwarning = note
            torch.cuda.set_sync_debug_mode("warn")
            try:
                latents = denoise(*args, **kwargs)
            finally:
                torch.cuda.set_sync_debug_mode("default")
        record["host_s"] = time.perf_counter() - host_start
        end_event.record()
        torch.cuda.synchronize()
        record["gpu_s"] = start_event.elapsed_time(end_event) / 1000
        record["sites"] = collections.Counter(sites)
        return latents

    family.denoise = wrapped
    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--samplers", default="Euler,Euler a,DPM++ 2M,DPM++ 2M SDE")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from webui.engine.request import GenerationRequest

    engine = engine_for(write_checkpoint("sd1", args.workdir / "SD1.5.safetensors"), args.workdir)
    rows = []
    for number, sampler in enumerate(args.samplers.split(",")):
        def image(prompt: str, steps: int = STEPS):
            return engine.txt2img(GenerationRequest(prompt=prompt, width=512, height=512, steps=steps, cfg_scale=7.0,
                                                    sampler_name=sampler, seed=1, save_images=False))

        image("warm-up", steps=2)
        family = engine.models.current.kind
        record = measured_loop(family, family.denoise)
        try:
            result = image(f"a photo of a cat number {number}")
        finally:
            del family.denoise  # the class's method again
        stalls = sum(record["sites"].values())
        where = "; ".join(f"{site} ×{count}" for site, count in record["sites"].most_common(4)) or "none"
        rows.append(f"| {sampler} | {result.seconds * 1000:.0f} ms | {record['gpu_s'] * 1000:.0f} ms | "
                    f"{record['host_s'] * 1000:.0f} ms | {stalls} ({stalls / STEPS:.1f} a step) | {where} |")
        print(rows[-1], flush=True)
    print_table("Host stalls in the denoising loop (issue 24)",
                f"`python3 -m benchmarks.host_stalls --samplers \"{args.samplers}\"` — full-size SD1.5, 512², {STEPS} "
                "steps, CFG 7, resident, a new prompt; the loop's GPU time (CUDA events) beside the host's time to "
                "queue it, and the synchronising calls inside it (torch sync debug mode) by where they are made.",
                ["sampler", "whole image", "denoise on the GPU", "host queued it in", "synchronisations",
                 "made at (most first)"], rows)


if __name__ == "__main__":
    main()
