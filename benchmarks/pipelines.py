"""Whole generations of Flux and SD3.5 through the engine, on a GPU budget of a consumer card.

    python3 -m benchmarks.pipelines [--only flux-q8,sd35] [--workdir /tmp/bench]

Full-size random weights written as the files users have (values do not change speed):
1. Flux-dev Q8_0 GGUF (original key names) + clip_l + t5xxl_fp8_e4m3fn + ae, 1344×768, 20 steps,
   at GPU Weights = 8 GB on this GPU, and on this GPU made an 8 GB card (``simulate_card``: the
   manager sees 8 GB, the allocator refuses more than 8 GB less a CUDA context): wall time, s/it,
   peak VRAM, and the process's peak host RSS against the size of the files it loaded (goal ≤ 1.1×:
   no tensor held twice, the GGUF memory-mapped once), also counted from the process's RSS before loading.
2. SD3.5 Large FP8 + 8-bit T5 (bitsandbytes, from the fp8 T5 file; + clip_l, clip_g, VAE), 1024², 28
   steps, CFG 4.5, GPU Weights sized for an 11 GB card: peak VRAM (goal ≤ 11 GB) and s/it; the same in
   BF16 beside it.
Each generation runs in a fresh process (``--run``), so its RSS is its own.
"""
from __future__ import annotations

import argparse
import gc
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from webui.engine.memory import MB

GB = 1024 * MB
CONTEXT_MB = 512  # what a CUDA context and cuBLAS take on a card before torch allocates anything
FLUX_MODULES = ["ae.safetensors", "clip_l.safetensors", "t5xxl_fp8_e4m3fn.safetensors"]
SD3_MODULES = ["sd3_vae.safetensors", "clip_l_sd3.safetensors", "clip_g.safetensors", "t5xxl_fp8_e4m3fn.safetensors"]


def _write(path: Path, make) -> Path:
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        make(path)
        gc.collect()
        torch.cuda.empty_cache()
        print(f"wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB) in {time.perf_counter() - start:.0f} s",
              flush=True)
    return path


def write_modules(root: Path) -> None:
    """Text encoders (fp8 T5-XXL, CLIP-L with and without projection, CLIP-G), VAEs and the tokenizer."""
    from webui.engine.conditioning.tokenizer import write_t5_tokenizer
    from webui.engine.formats.detect import Family
    from webui.synthetic.builders import build_clip_text, build_t5_encoder, build_vae16
    from webui.synthetic.ldm_export import write_clip_file, write_t5_file, write_vae_file

    enc, vae = root / "text_encoder", root / "VAE"
    enc.mkdir(parents=True, exist_ok=True)
    vae.mkdir(parents=True, exist_ok=True)
    bf16, fp8 = torch.bfloat16, torch.float8_e4m3fn
    _write(enc / "t5xxl_fp8_e4m3fn.safetensors",
           lambda p: write_t5_file(p, build_t5_encoder("full", device="cuda", dtype=bf16), fp8))
    _write(enc / "clip_l.safetensors", lambda p: write_clip_file(
        p, build_clip_text("clip_l", "full", device="cuda", dtype=bf16), torch.float16, projection=False))
    _write(enc / "clip_l_sd3.safetensors", lambda p: write_clip_file(
        p, build_clip_text("clip_l", "full", seed=1, device="cuda", dtype=bf16), torch.float16, projection=False))
    _write(enc / "clip_g.safetensors", lambda p: write_clip_file(
        p, build_clip_text("clip_g", "full", device="cuda", dtype=bf16), torch.float16))
    _write(vae / "ae.safetensors", lambda p: write_vae_file(p, build_vae16("full", Family.FLUX, device="cuda")))
    _write(vae / "sd3_vae.safetensors", lambda p: write_vae_file(p, build_vae16("full", Family.SD3, device="cuda")))
    if not (enc / "t5_tokenizer").is_dir():
        write_t5_tokenizer(enc / "t5_tokenizer")


def write_flux_q8(root: Path) -> Path:
    from gguf import GGMLQuantizationType

    from webui.engine.weights.gguf_load import quantize_where_possible, write_gguf
    from webui.synthetic.builders import build_flux_transformer, flux_architecture
    from webui.synthetic.ldm_export import flux_to_bfl

    def make(path: Path) -> None:
        model = build_flux_transformer("full", device="cuda", dtype=torch.bfloat16)
        tensors = {k: v.cpu() for k, v in model.state_dict().items()}
        del model
        torch.cuda.empty_cache()
        write_gguf(path, flux_to_bfl(tensors, flux_architecture("full")),
                   quantize_where_possible(GGMLQuantizationType.Q8_0))

    return _write(root / "Stable-diffusion" / "flux1-dev-Q8_0.gguf", make)


def write_flux_bf16(root: Path) -> Path:
    """Flux-dev's transformer alone in BF16, BFL's key names (23.8 GB)."""
    from webui.synthetic.builders import build_flux_transformer
    from webui.synthetic.ldm_export import write_flux_transformer

    def make(path: Path) -> None:
        model = build_flux_transformer("full", device="cuda", dtype=torch.bfloat16)
        write_flux_transformer(path, model, torch.bfloat16)

    return _write(root / "Stable-diffusion" / "flux1-dev-bf16.safetensors", make)


def write_sd35(root: Path, dtype: torch.dtype, name: str) -> Path:
    from webui.synthetic.ldm_export import write_sd3_checkpoint

    return _write(root / "Stable-diffusion" / name, lambda p: write_sd3_checkpoint(p, "full", dtype=dtype))


def status_mb(key: str) -> float:
    """A line of /proc/self/status in MB: VmRSS now, VmHWM the peak since this process started (ru_maxrss
    would also count the parent's peak before exec)."""
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith(key + ":")) / 1024


def simulate_card(engine, card_mb: int) -> None:
    """Make this GPU a ``card_mb`` card for the engine: the manager sees that total, and as free what torch has
    not allocated of it after a CUDA context's share; the allocator refuses more (an out-of-memory error)."""
    from webui.engine.memory.manager import DeviceMemory, MemoryManager

    class CardMemory(DeviceMemory):
        def total(self) -> int:
            return card_mb * MB

        def free(self) -> int:
            return max(0, (card_mb - CONTEXT_MB) * MB - torch.cuda.memory_allocated(self.device))

    device = torch.device("cuda")
    torch.cuda.set_per_process_memory_fraction((card_mb - CONTEXT_MB) * MB / torch.cuda.get_device_properties(0).total_memory)
    engine.memory = engine.models.memory = MemoryManager(device, CardMemory(device))


def run(root: Path, checkpoint: str, modules: list[str], width: int, height: int, steps: int, cfg: float,
        gpu_weights_mb: int | None = None, card_mb: int | None = None, t5_storage: str = "Automatic") -> dict:
    """One generation in this process (after loading the model once); what it measured, as a dict.

    ``gpu_weights_mb`` sets GPU Weights on this GPU; ``card_mb`` makes it a card of that size instead, with
    Forge's default 1024 MB kept for computation.
    """
    from webui.cli import parse_args
    from webui.engine.engine import Engine
    from webui.engine.request import GenerationRequest
    from webui.settings import AppConfig

    data = root / "data"
    args = ["--data-dir", str(data), "--models-dir", str(root), "--device", "cuda"]
    engine = Engine(AppConfig.from_args(parse_args(args)))
    torch.zeros(1, device="cuda")
    rss_start = status_mb("VmRSS")
    total_mb = torch.cuda.get_device_properties(0).total_memory / MB
    if card_mb:
        simulate_card(engine, card_mb)
    engine.options.update({"forge_inference_memory": 1024 if card_mb else int(total_mb - gpu_weights_mb),
                           "forge_async_loading": "Async", "forge_pin_shared_memory": "Shared",
                           "forge_additional_modules": modules, "t5_storage_dtype": t5_storage, "samples_save": False})
    request = GenerationRequest(prompt="a photo of a cat", width=width, height=height, steps=steps, cfg_scale=cfg,
                                sampler_name="Euler", seed=1, checkpoint=checkpoint, save_images=False)
    start = time.perf_counter()
    engine.models.get(engine.checkpoint(checkpoint), None, "Automatic", tuple(modules), True, t5_storage)
    load_s = time.perf_counter() - start
    rss_load = status_mb("VmHWM")
    start = time.perf_counter()
    first_result = engine.txt2img(request)  # the first one compiles the dequantization kernels
    first = time.perf_counter() - start
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    result = engine.txt2img(request)
    wall = time.perf_counter() - start
    files = [root / "Stable-diffusion" / checkpoint] + [next(root.rglob(m)) for m in modules]
    return {
        "checkpoint": checkpoint, "size": f"{width}x{height}", "steps": steps, "load_s": load_s, "wall_s": wall,
        "first_wall_s": first,
        "s_per_it": result.timings.get("denoise", 0.0) / steps, "timings": result.timings,
        "peak_vram_mb": torch.cuda.max_memory_allocated() / MB, "peak_rss_mb": status_mb("VmHWM"),
        "rss_after_load_mb": rss_load,
        "rss_start_mb": rss_start, "files_mb": sum(f.stat().st_size for f in files) / MB,
        "gpu_weights_mb": engine.memory.last.budget_mb, "memory": str(result.memory),
        "first_memory": str(first_result.memory),
    }


def in_subprocess(root: Path, **kwargs) -> dict:
    out = subprocess.run([sys.executable, "-m", "benchmarks.pipelines", "--workdir", str(root), "--run",
                          json.dumps(kwargs)], capture_output=True, text=True)
    told = [line for line in out.stderr.splitlines() if "Out of memory" in line or line.startswith("Traceback")]
    sys.stderr.write("\n".join(told) + "\n" + out.stderr[-2000:])
    if out.returncode:
        raise RuntimeError(f"run failed: {out.returncode}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def row(label: str, r: dict, goal: str) -> str:
    grown = r["peak_rss_mb"] - r["rss_start_mb"]
    return (f"| {label} | {r['size']}, {r['steps']} steps | {r['wall_s']:.1f} s (first {r['first_wall_s']:.1f} s) | "
            f"{r['s_per_it']:.2f} s/it | "
            f"{r['peak_vram_mb']:.0f} | {r['peak_rss_mb']:.0f} | {grown:.0f} | {r['files_mb']:.0f} | "
            f"{r['peak_rss_mb'] / r['files_mb']:.2f}× ({grown / r['files_mb']:.2f}×) | {r['load_s']:.1f} s | {goal} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="flux-q8,sd35")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-pipelines"))
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.workdir
    if args.run:
        print(json.dumps(run(root, **json.loads(args.run))))
        return
    only = set(args.only.split(","))
    write_modules(root)
    rows = []
    if "flux-q8" in only:
        ckpt = write_flux_q8(root).name
        for label, where in (("GPU Weights 8 GB", dict(gpu_weights_mb=8192)), ("an 8 GB card", dict(card_mb=8192))):
            r = in_subprocess(root, checkpoint=ckpt, modules=FLUX_MODULES, width=1344, height=768, steps=20, cfg=1.0,
                              **where)
            rows.append(row(f"Flux-dev Q8_0 GGUF, {label}", r, "RSS ≤ 1.1× files" +
                            (", peak VRAM ≤ 7.5 GB" if "card_mb" in where else "")))
            print(rows[-1], r["memory"], r["timings"], "RSS after load", r["rss_after_load_mb"], "first:",
                  r["first_memory"], flush=True)
    if "sd35" in only:
        for dtype, name in ((torch.float8_e4m3fn, "sd3.5_large_fp8.safetensors"),
                            (torch.bfloat16, "sd3.5_large_bf16.safetensors")):
            ckpt = write_sd35(root, dtype, name).name
            r = in_subprocess(root, checkpoint=ckpt, modules=SD3_MODULES, gpu_weights_mb=9216, width=1024,
                              height=1024, steps=28, cfg=4.5, t5_storage="bnb-int8")
            rows.append(row(f"SD3.5 Large {name.split('_')[-1].split('.')[0].upper()}, 8-bit T5 (bnb), GPU Weights "
                            "9 GB", r, "peak VRAM ≤ 11 GB"))
            print(rows[-1], r["memory"], r["timings"], "RSS after load", r["rss_after_load_mb"], flush=True)
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    header = ("| model | generation | wall | s/it | peak VRAM MB | peak RSS MB | RSS growth MB | files MB | "
              "RSS ÷ files (growth ÷ files) | load | goal |\n|---|---|---|---|---|---|---|---|---|---|---|")
    print(f"\n## Whole generations — {time.strftime('%Y-%m-%d')}, {device}\n\n"
          f"`python3 -m benchmarks.pipelines --only {args.only}`\n\n{header}\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
