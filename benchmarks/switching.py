"""Model switching in an X/Y/Z plot: 3 checkpoints × 4 seeds, three times, with 1 and with 3 models kept in memory.

    python3 -m benchmarks.switching [--workdir /tmp/bench-pipelines] [--write-only]

Full-size random weights written as users have them: SD1.5 and SDXL as A1111 single files (fp16), Flux-dev
as a Q8_0 GGUF with clip_l, an fp8 T5-XXL and ae beside it. Each cache limit (``sd_checkpoints_limit``) runs
in a fresh process: the same plot (X: Seed 1-4, Y: Checkpoint name, so checkpoints switch in the outer
loop) three times, then every model unloaded. Reported per switch: whether the model was loaded from disk
or was kept in memory, the seconds the switch took (``ModelManager.get``) and the weights then moved to the
GPU; per cycle: host RSS (anonymous and file-backed: mapped model files), VRAM allocated and reserved after
the cycle (flat from cycle to cycle: nothing left behind), and the cycle's wall time.
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

from benchmarks.memory import write_checkpoint
from benchmarks.pipelines import FLUX_MODULES, MB, status_mb, write_flux_q8, write_modules

CHECKPOINTS = ("sd15.safetensors", "sdxl.safetensors", "flux1-dev-Q8_0.gguf")
SEED_VALUES = (1, 2, 3, 4)
CYCLES = 3
SIZE, STEPS = 768, 6


def write_files(root: Path) -> None:
    write_modules(root)
    write_flux_q8(root)
    for family, name in (("sd1", CHECKPOINTS[0]), ("sdxl", CHECKPOINTS[1])):
        write_checkpoint(family, root / "Stable-diffusion" / name)


def run(root: Path, limit: int) -> dict:
    """The plot ``CYCLES`` times in this process with ``limit`` models kept; what was measured."""
    from webui.cli import parse_args
    from webui.engine.engine import Engine
    from webui.engine.request import GenerationRequest
    from webui.engine.xyz import BUILTIN_AXES, AxisChoice, run_plot
    from webui.settings import AppConfig

    data = root / f"data-limit-{limit}"
    engine = Engine(AppConfig.from_args(parse_args(["--data-dir", str(data), "--models-dir", str(root),
                                                    "--device", "cuda"])))
    engine.options.update({"sd_checkpoints_limit": limit, "forge_additional_modules": FLUX_MODULES,
                           "samples_save": False, "grid_save": False})
    switches: list[dict] = []  # one per change of checkpoint, in order
    loads: list[str] = []  # checkpoints read from disk
    get, load_new = engine.models.get, engine.models._load_new

    def timed_get(info, *args):
        start = time.perf_counter()
        previous = engine.models.current
        model = get(info, *args)
        if model is not previous:
            switches.append({"checkpoint": info.name, "get_s": time.perf_counter() - start, "loaded": False})
        return model

    def counted_load(info, *args):
        loads.append(info.name)
        return load_new(info, *args)

    engine.models.get, engine.models._load_new = timed_get, counted_load
    base = GenerationRequest(prompt="a photo of a cat", width=SIZE, height=SIZE, steps=STEPS, cfg_scale=1.0,
                             sampler_name="Euler", seed=1, save_images=False)
    choices = [AxisChoice("Seed", ", ".join(map(str, SEED_VALUES))),
               AxisChoice("Checkpoint name", ", ".join(CHECKPOINTS))]
    torch.zeros(1, device="cuda")
    cycles = [_memory("before") | {"seconds": 0.0, "switches": []}]
    for _ in range(CYCLES):
        switches.clear()
        loads.clear()
        start = time.perf_counter()
        plot = run_plot(engine, base, choices, BUILTIN_AXES)
        seconds = time.perf_counter() - start
        first_cells = plot.cells[::len(SEED_VALUES)]  # a checkpoint's row starts with its switch
        for switch, cell in zip(switches, first_cells):
            switch["loaded"] = switch["checkpoint"] in loads
            switch["to_gpu_s"] = cell.memory.move_seconds
            switch["moved_mb"] = cell.memory.moved_mb
        cycles.append(_memory(str(len(cycles))) | {"seconds": seconds, "switches": list(switches)})
    engine.models.unload()
    cycles.append(_memory("all unloaded") | {"seconds": 0.0, "switches": []})
    return {"limit": limit, "cycles": cycles, "peak_rss_mb": status_mb("VmHWM"),
            "files_mb": sum((root / "Stable-diffusion" / c).stat().st_size for c in CHECKPOINTS) / MB}


def _memory(label: str) -> dict:
    return {"label": label, "rss_mb": status_mb("VmRSS"), "anon_mb": status_mb("RssAnon"),
            "file_mb": status_mb("RssFile"), "allocated_mb": torch.cuda.memory_allocated() / MB,
            "reserved_mb": torch.cuda.memory_reserved() / MB}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-pipelines"))
    parser.add_argument("--write-only", action="store_true", help="write the model files and stop")
    parser.add_argument("--run", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    root = args.workdir
    if args.run is not None:
        print(json.dumps(run(root, args.run)))
        return
    write_files(root)
    if args.write_only:
        return
    switch_rows, cycle_rows = [], []
    for limit in (1, 3):
        out = subprocess.run([sys.executable, "-m", "benchmarks.switching", "--workdir", str(root), "--run",
                              str(limit)], capture_output=True, text=True)
        if out.returncode:
            sys.stderr.write(out.stderr[-3000:])
            raise RuntimeError(f"limit {limit} failed")
        r = json.loads(out.stdout.strip().splitlines()[-1])
        for cycle in r["cycles"]:
            cycle_rows.append(f"| {limit} | {cycle['label']} | {cycle['rss_mb']:.0f} ({cycle['anon_mb']:.0f} + "
                              f"{cycle['file_mb']:.0f}) | {cycle['allocated_mb']:.0f} | {cycle['reserved_mb']:.0f} | "
                              f"{cycle['seconds']:.1f} s |")
            for switch in cycle["switches"]:
                how = "loaded from disk" if switch["loaded"] else "kept in host memory"
                switch_rows.append(f"| {limit} | {cycle['label']} | {switch['checkpoint']} | {how} | "
                                   f"{switch['get_s']:.2f} s | {switch['moved_mb']:.0f} MB in "
                                   f"{switch['to_gpu_s']:.2f} s |")
        print(f"limit {limit}: peak RSS {r['peak_rss_mb']:.0f} MB, checkpoint files {r['files_mb']:.0f} MB",
              flush=True)
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    print(f"\n## Model switching in an X/Y/Z plot — {time.strftime('%Y-%m-%d')}, {device}\n\n"
          "`python3 -m benchmarks.switching`\n\n"
          "| models kept | cycle | checkpoint | model | load / switch | to the GPU (first image) |\n"
          "|---|---|---|---|---|---|\n" + "\n".join(switch_rows)
          + "\n\n| models kept | after cycle | RSS MB (anonymous + files) | VRAM allocated MB | VRAM reserved MB | "
          "cycle |\n"
          "|---|---|---|---|---|---|\n" + "\n".join(cycle_rows))


if __name__ == "__main__":
    main()
