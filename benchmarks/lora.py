"""LoRA on a quantized Flux: what a LoRA costs in time to the first step, per step, and in host memory.

    python3 -m benchmarks.lora [--workdir /tmp/bench-pipelines]

Full-size Flux-dev as a Q8_0 GGUF (+ clip_l, fp8 T5, ae: ``benchmarks.pipelines``' files) and random LoRAs
of rank 32 and 128 over every attention and MLP layer, written as kohya files with BFL names (what
Flux LoRAs on civitai are). 1344×768, 20 steps. Per placement (everything resident; GPU Weights =
8 GB), in one fresh process: a generation without LoRA (compiles), then without, with the rank-32
LoRA, with the rank-128 LoRA, and without again (a LoRA taken off). Rows:
1. time from the request to the first denoising step, with vs without the LoRA (goal < 1 s extra;
   Forge issue 1502 spent ~70 s patching);
2. s/it with one rank-32 LoRA vs without (goal ≤ 10 % overhead), over steps 2-20: the first step's one-off
   costs (Triton compiling a kernel for a new LoRA rank, once per process) are in row 1;
3. the process's peak host RSS against the model files + the LoRA files + 1 GB (goal: within).
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.pipelines import FLUX_MODULES, MB, status_mb, write_flux_q8, write_modules

RANKS = (32, 128)


def write_loras(root: Path) -> dict[int, Path]:
    from webui.engine.formats.detect import Family
    from webui.engine.families.flux import load_gguf_flux_transformer
    from webui.synthetic.lora_export import random_lora, write_lora

    folder = root / "Lora"
    folder.mkdir(parents=True, exist_ok=True)
    paths = {rank: folder / f"flux-rank{rank}.safetensors" for rank in RANKS}
    if not all(p.exists() for p in paths.values()):
        model = load_gguf_flux_transformer(write_flux_q8(root), torch.bfloat16)
        for rank, path in paths.items():
            weights = random_lora({"denoiser": model}, Family.FLUX, rank, seed=rank)
            write_lora(path, weights, Family.FLUX, "kohya", dtype=torch.bfloat16)
            print(f"wrote {path.name} ({path.stat().st_size / 1e9:.2f} GB)", flush=True)
    return paths


def run(root: Path, gpu_weights_mb: int | None) -> dict:
    """The generations of one placement in this process; what they measured."""
    from webui.cli import parse_args
    from webui.engine.engine import Engine
    from webui.engine.request import GenerationRequest
    from webui.extensions import load_extensions
    from webui.settings import AppConfig

    args = ["--data-dir", str(root / "data"), "--models-dir", str(root), "--device", "cuda"]
    engine = Engine(AppConfig.from_args(parse_args(args)))
    load_extensions(engine)  # LoRA is a built-in extension
    rss_start = status_mb("VmRSS")
    total_mb = torch.cuda.get_device_properties(0).total_memory / MB
    reserve = 1024 if gpu_weights_mb is None else int(total_mb - gpu_weights_mb)
    engine.options.update({"forge_inference_memory": reserve, "forge_async_loading": "Async",
                           "forge_pin_shared_memory": "Shared", "forge_additional_modules": FLUX_MODULES,
                           "samples_save": False})
    steps: list[float] = []  # when each step ended (synchronised: a benchmark's timing, not the app's)
    engine.hooks.on("denoising_step", lambda step, **_: (torch.cuda.synchronize(), steps.append(time.perf_counter())))
    activation: list[float] = []
    activate = engine.hooks.activate_networks

    def timed_activate(*args, **kwargs):
        start = time.perf_counter()
        answer = activate(*args, **kwargs)
        activation.append(time.perf_counter() - start)
        return answer

    engine.hooks.activate_networks = timed_activate
    checkpoint = write_flux_q8(root).name

    def generate(lora: str) -> dict:
        request = GenerationRequest(prompt=f"a photo of a cat{lora}", width=1344, height=768, steps=20, cfg_scale=1.0,
                                    sampler_name="Euler", seed=1, checkpoint=checkpoint, save_images=False)
        steps.clear()
        start = time.perf_counter()
        result = engine.txt2img(request)
        if ("Lora hashes" in result.infotexts[0]) != bool(lora):
            raise RuntimeError(f"the LoRA was {'not ' if lora else ''}applied: {result.infotexts[0]}")
        return {"to_first_step_s": steps[0] - start, "loading_lora_s": activation[-1],
                "s_per_it": (steps[-1] - steps[0]) / (len(steps) - 1),
                "wall_s": time.perf_counter() - start, "memory": str(result.memory)}

    runs = {"first": generate(""), "without": generate("")}
    for rank in RANKS:
        runs[f"rank {rank}"] = generate(f" <lora:flux-rank{rank}:1>")
    runs["taken off"] = generate("")
    files = [root / "Stable-diffusion" / checkpoint, *(next(root.rglob(m)) for m in FLUX_MODULES)]
    return {"runs": runs, "peak_rss_mb": status_mb("VmHWM"), "rss_start_mb": rss_start,
            "model_mb": sum(f.stat().st_size for f in files) / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-pipelines"))
    parser.add_argument("--run", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.workdir
    if args.run:
        print(json.dumps(run(root, json.loads(args.run))))
        return
    write_modules(root)
    loras = write_loras(root)
    lora_mb = sum(p.stat().st_size for p in loras.values()) / MB
    rows = []
    for label, weights in (("resident", None), ("GPU Weights 8 GB", 8192)):
        out = subprocess.run([sys.executable, "-m", "benchmarks.lora", "--workdir", str(root), "--run",
                              json.dumps(weights)], capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            raise RuntimeError(f"{label} failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        runs, base = r["runs"], r["runs"]["without"]
        for name in (f"rank {rank}" for rank in RANKS):
            extra = runs[name]["to_first_step_s"] - base["to_first_step_s"]
            overhead = runs[name]["s_per_it"] / base["s_per_it"] - 1
            rows.append(f"| Flux-dev Q8_0, {label} | {name} | {base['to_first_step_s']:.2f} s → "
                        f"{runs[name]['to_first_step_s']:.2f} s (+{extra:.2f} s; loading the LoRA "
                        f"{runs[name]['loading_lora_s']:.2f} s) | {base['s_per_it']:.3f} → "
                        f"{runs[name]['s_per_it']:.3f} s/it ({overhead:+.1%}) | |")
        print(label, json.dumps(runs, indent=1), flush=True)
        limit = r["model_mb"] + lora_mb + 1024
        rows.append(f"| Flux-dev Q8_0, {label} | taken off | s/it {runs['taken off']['s_per_it']:.3f} | "
                    f"peak RSS {r['peak_rss_mb']:.0f} MB ≤ {limit:.0f} MB (model {r['model_mb']:.0f} + LoRAs "
                    f"{lora_mb:.0f} + 1024): {'yes' if r['peak_rss_mb'] <= limit else '**no**'} | |")
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    print(f"\n## LoRA on Flux Q8_0 — {time.strftime('%Y-%m-%d')}, {device}\n\n`python3 -m benchmarks.lora`\n\n"
          "| model | LoRA | request → first step | step time | note |\n|---|---|---|---|---|\n" + "\n".join(rows))


if __name__ == "__main__":
    main()
