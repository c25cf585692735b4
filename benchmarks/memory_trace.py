"""What the memory panel's recording costs: whole images with the trace's sampling thread, beside the same images
with that thread doing nothing, in one run (full-size SD1.5, random weights, 512², 20 steps, CFG).

    python3 -m benchmarks.memory_trace [--workdir /tmp/bench] [--repeat 5]

Rows: the model resident, and the model fully streamed (--lowvram: the main thread busiest with small copies,
where a second Python thread would show most). Goal: ≤ 1.01× (within noise).
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from benchmarks.memory import engine_for, write_checkpoint
from webui.engine.memory_trace import MemoryTrace


def whole_image_seconds(engine, repeat: int) -> tuple[float, int]:
    """Median seconds of an image, and how many samples the last one's timeline holds."""
    from webui.engine.request import GenerationRequest

    request = GenerationRequest(prompt="a photo of a cat", width=512, height=512, steps=20, cfg_scale=7.0,
                                sampler_name="Euler", seed=1, save_images=False)
    engine.txt2img(request)
    times, samples = [], 0
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        result = engine.txt2img(request)
        times.append(time.perf_counter() - start)
        samples = len(result.memory_timeline.samples)
    return statistics.median(times), samples


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--repeat", type=int, default=5)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    checkpoint = write_checkpoint("sd1", args.workdir / "SD1.5.safetensors")
    rows = []
    for mode in ("resident", "lowvram"):
        engine = engine_for(checkpoint, args.workdir)
        engine.config.args.lowvram = mode == "lowvram"
        traced, samples = whole_image_seconds(engine, args.repeat)
        with mock.patch.object(MemoryTrace, "_sample_until_stopped", lambda self: self._stop.wait()):
            quiet, _ = whole_image_seconds(engine, args.repeat)
        rows.append((mode, traced, quiet, samples))
        engine.models.unload()
        torch.cuda.empty_cache()
    print(f"## Memory trace overhead — {time.strftime('%Y-%m-%d')}, {device}\n")
    print("`python3 -m benchmarks.memory_trace`\n")
    print("| SD1.5 512², 20 steps | with sampling | without | ratio | goal | met | samples kept |")
    print("|---|---|---|---|---|---|---|")
    for mode, traced, quiet, samples in rows:
        ratio = traced / quiet
        print(f"| {mode} | {traced * 1000:.0f} ms | {quiet * 1000:.0f} ms | {ratio:.3f}× | ≤ 1.01× | "
              f"{'yes' if ratio <= 1.01 else '**no**'} | {samples} |")


if __name__ == "__main__":
    main()
