"""What the memory panel's recording costs: whole images with the trace's sampling thread, beside the same images
with that thread doing nothing, in one run (full-size SD1.5, random weights, 512², 20 steps, CFG).

    python3 -m benchmarks.memory_trace [--workdir /tmp/bench] [--repeat 5]

Rows: the model resident, and the model fully streamed (--lowvram: the main thread busiest with small copies,
where a second Python thread would show most). Goal: ≤ 1.01× (within noise).
"""
from __future__ import annotations

import argparse
import statistics
import threading
import time
from pathlib import Path
from unittest import mock

import torch

from benchmarks.memory import engine_for, write_checkpoint
from webui.engine.memory.trace import SAMPLE_SECONDS, SAMPLER, MemoryTrace


def image_seconds(engine, request) -> tuple[float, int]:
    """Seconds of one whole image, and how many samples its timeline holds."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    result = engine.txt2img(request)
    return time.perf_counter() - start, len(result.memory_timeline.samples)


def sample_microseconds(engine) -> float:
    """One sample (GPU allocated, process RAM), timed alone."""
    trace = MemoryTrace(engine.device, 0)
    start = time.perf_counter()
    for _ in range(1000):
        trace.sample()
    return (time.perf_counter() - start) * 1000


def first_sample_in_a_new_thread_ms(engine) -> float:
    """What a thread's first sample costs (why the sampler is one thread for the process's life)."""
    trace, took = MemoryTrace(engine.device, 0), []

    def first() -> None:
        start = time.perf_counter()
        trace.sample()
        took.append(time.perf_counter() - start)

    thread = threading.Thread(target=first)
    thread.start()
    thread.join()
    return took[0] * 1000


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--repeat", type=int, default=6)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from webui.engine.request import GenerationRequest

    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    checkpoint = write_checkpoint("sd1", args.workdir / "SD1.5.safetensors")
    request = GenerationRequest(prompt="a photo of a cat", width=512, height=512, steps=20, cfg_scale=7.0,
                                sampler_name="Euler", seed=1, save_images=False)
    quiet = mock.patch.object(SAMPLER, "watch", lambda trace: None)
    rows = []
    for mode in ("resident", "lowvram"):
        engine = engine_for(checkpoint, args.workdir)
        engine.config.args.lowvram = mode == "lowvram"
        for _ in range(2):
            engine.txt2img(request)  # load, place, warm up
        traced, silent, samples = [], [], 0
        for i in range(args.repeat):  # alternating, in turn first, so that drift and order touch both alike
            for sampled in ((True, False) if i % 2 else (False, True)):
                if sampled:
                    seconds, samples = image_seconds(engine, request)
                    traced.append(seconds)
                else:
                    with quiet:
                        silent.append(image_seconds(engine, request)[0])
        rows.append((mode, statistics.median(traced), statistics.median(silent), samples))
        engine.models.unload()
        torch.cuda.empty_cache()
    sample_us, first_ms = sample_microseconds(engine), first_sample_in_a_new_thread_ms(engine)
    print(f"## Memory trace overhead — {time.strftime('%Y-%m-%d')}, {device}\n")
    print(f"`python3 -m benchmarks.memory_trace` (one sample: {sample_us:.0f} µs, every {SAMPLE_SECONDS * 1000:.0f} ms;"
          f" the first in a new thread: {first_ms:.1f} ms)\n")
    print("| SD1.5 512², 20 steps | with sampling | without | ratio | goal | met | samples kept |")
    print("|---|---|---|---|---|---|---|")
    for mode, traced, silent, samples in rows:
        ratio = traced / silent
        print(f"| {mode} | {traced * 1000:.0f} ms | {silent * 1000:.0f} ms | {ratio:.3f}× | ≤ 1.01× | "
              f"{'yes' if ratio <= 1.01 else '**no**'} | {samples} |")


if __name__ == "__main__":
    main()
