"""What the NaN checks cost (issue 10): the denoiser's latents and a half-precision VAE's pixels are tested for
NaN once per batch. Each check is timed on the tensors a whole image makes, beside that whole image, in one run
(full-size SD1.5, random weights, 20 steps, CFG; the VAE runs in bfloat16 on a GPU that has it).

    python3 -m benchmarks.nan_checks [--workdir /tmp/bench] [--repeat 20]

Goal: both checks together ≤ 0.1 % of the image.
"""
from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import torch

from benchmarks.memory import engine_for, write_checkpoint
from webui.engine.weights.fp8 import compute_dtype


def check_seconds(tensor: torch.Tensor, repeat: int) -> float:
    """One finite test as generate.py makes it: reduced on the device, read by the host."""
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        bool(torch.isfinite(tensor).all())
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--repeat", type=int, default=20)
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    from webui.engine.request import GenerationRequest

    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    engine = engine_for(write_checkpoint("sd1", args.workdir / "SD1.5.safetensors"), args.workdir)
    rows = []
    for size, batch in ((512, 1), (512, 4), (1024, 1)):
        request = GenerationRequest(prompt="a photo of a cat", width=size, height=size, steps=20, cfg_scale=7.0,
                                    sampler_name="Euler", seed=1, batch_size=batch, save_images=False)
        engine.txt2img(request)  # load, place, warm up
        images = []
        for _ in range(3):
            torch.cuda.synchronize()
            start = time.perf_counter()
            engine.txt2img(request)
            images.append(time.perf_counter() - start)
        vae_dtype = compute_dtype(engine.models.current.vae)
        latents = torch.randn(batch, 4, size // 8, size // 8, device="cuda", dtype=torch.float16)
        pixels = torch.randn(batch, 3, size, size, device="cuda", dtype=vae_dtype)
        checks = check_seconds(latents, args.repeat) + check_seconds(pixels, args.repeat)
        rows.append((f"{size}², batch {batch}, VAE {str(vae_dtype).removeprefix('torch.')}", statistics.median(images),
                     checks))
    print(f"## NaN checks (issue 10) — {time.strftime('%Y-%m-%d')}, {device}\n")
    print(f"`python3 -m benchmarks.nan_checks --repeat {args.repeat}`\n")
    print("| SD1.5, 20 steps, CFG | whole image | both checks | share | goal | met |")
    print("|---|---|---|---|---|---|")
    for name, image, checks in rows:
        share = checks / image * 100
        print(f"| {name} | {image * 1000:.0f} ms | {checks * 1e6:.0f} µs | {share:.3f} % | ≤ 0.1 % | "
              f"{'yes' if share <= 0.1 else '**no**'} |")


if __name__ == "__main__":
    main()
