"""Memory-manager benchmark: ours beside plain diffusers, one run, one table.

    python3 -m benchmarks.memory [--only sd15,sdxl,flux] [--workdir /tmp/bench] [--markdown FILE]

Full-size SD1.5, SDXL and Flux-dev (bf16) with random weights (values do not change speed),
written as real checkpoint files and loaded by our own loader. Rows:
1. resident step time, ours vs the diffusers pipeline over the same modules (goal ≤ 1.0×);
2. overhead per image with the model loaded: everything outside denoising and VAE decode
   (goal ≤ 20 ms, 0 bytes moved), for a new seed of the same prompt and for a new prompt;
   the whole image beside diffusers' enable_model_cpu_offload;
3. Flux at GPU Weights = 50 % of the model (goal ≤ 1.15 × max(resident step, streamed bytes ÷
   pinned bandwidth)) and fully streamed (goal ≤ 1.15 × copy floor), beside diffusers' group
   offloading with a side stream;
4. Flux-dev as a Q8_0 GGUF: resident step beside bf16 (goal ≤ 1.1×) and beside diffusers' own GGUF
   path on the same file, fully streamed (goal ≤ 1.15 × quantized bytes ÷ pinned bandwidth) and at
   GPU Weights = 8 GB (goal ≤ 1.15 × max(resident step, streamed bytes ÷ bandwidth));
5. peak VRAM within budget + activation estimate in every row.
Step times: the median interval between consecutive denoising steps (synchronised at each step,
the same way for both loops); Flux steps are medians of single forwards. Bandwidth is measured
in the run.
"""
from __future__ import annotations

import argparse
import copy
import gc
import statistics
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from webui.engine.memory import MB
from webui.engine.progress import Progress


@dataclass
class Row:
    model: str
    what: str
    ours: float
    reference: float | None
    unit: str
    goal: str
    met: bool | None
    peak_mb: float | None = None
    note: str = ""

    def cells(self) -> list[str]:
        ref = "—" if self.reference is None else f"{self.reference:.1f}"
        ratio = f"{self.ours / self.reference:.2f}×" if self.reference else "—"
        met = {True: "yes", False: "**no**", None: "—"}[self.met]
        peak = "—" if self.peak_mb is None else f"{self.peak_mb:.0f}"
        return [self.model, self.what, f"{self.ours:.1f} {self.unit}", ref, ratio, self.goal, met, peak, self.note]


ROWS: list[Row] = []


def report(row: Row) -> None:
    ROWS.append(row)
    print(" | ".join(row.cells()), flush=True)


def pinned_bandwidth() -> float:
    """Host→GPU copy bandwidth from pinned memory, bytes/s (median of 5 copies of 1 GiB)."""
    src = torch.empty(1024 * MB, dtype=torch.uint8).pin_memory()
    dst = torch.empty_like(src, device="cuda")
    times = []
    for _ in range(6):
        torch.cuda.synchronize()
        start = time.perf_counter()
        dst.copy_(src, non_blocking=True)
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return src.numel() / statistics.median(times[1:])


def timed(fn, repeat: int, warmup: int = 3) -> float:
    """Median seconds of ``fn()`` over ``repeat`` calls after ``warmup`` calls (compiled kernels settle there)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


class StepClock(Progress):
    """Progress that also timestamps every denoising step (synchronised), for either loop."""

    def __init__(self):
        super().__init__()
        self.times: list[list[float]] = []

    def begin(self, job: str, job_count: int, steps: int) -> None:
        super().begin(job, job_count, steps)
        self.times.append([])

    def step(self, step: int, latents, family) -> None:
        super().step(step, latents, family)
        self.tick()

    def tick(self) -> None:
        torch.cuda.synchronize()
        self.times[-1].append(time.perf_counter())

    def step_ms(self) -> float:
        """Median interval between consecutive steps of the recorded runs."""
        gaps = [b - a for run in self.times for a, b in zip(run, run[1:])]
        return statistics.median(gaps) * 1000


# ---- SD1.5 / SDXL through the whole engine --------------------------------------------------------

def write_checkpoint(family: str, path: Path) -> Path:
    from webui.synthetic.builders import build_synthetic_model
    from webui.synthetic.ldm_export import write_a1111_checkpoint

    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        model = build_synthetic_model(family, "full", device="cuda")
        write_a1111_checkpoint(path, model, dtype=torch.float16)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    return path


def engine_for(checkpoint: Path, workdir: Path):
    from webui.cli import parse_args
    from webui.engine.engine import Engine
    from webui.settings import AppConfig

    data = workdir / f"data-{checkpoint.stem}"
    (data / "models" / "Stable-diffusion").mkdir(parents=True, exist_ok=True)
    link = data / "models" / "Stable-diffusion" / checkpoint.name
    if not link.exists():
        link.symlink_to(checkpoint)
    return Engine(AppConfig.from_args(parse_args(["--data-dir", str(data), "--device", "cuda"])))


def diffusers_pipeline(engine):
    """The plain diffusers pipeline (SD or SDXL) over the engine's loaded modules, with Euler."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    model = engine.models.current
    sdxl = len(model.text_encoders) == 2
    # The pipeline feeds the VAE latents in the UNet's fp16; ours runs the VAE in bf16: give it an fp16 copy.
    parts = dict(vae=copy.deepcopy(model.vae).half(), text_encoder=model.text_encoders[0].model,
                 tokenizer=model.text_encoders[0].tokenizer, unet=model.denoiser,
                 scheduler=engine.samplers.make_scheduler("Euler", "Automatic", model.scheduler_config))
    if sdxl:
        parts.update(text_encoder_2=model.text_encoders[1].model, tokenizer_2=model.text_encoders[1].tokenizer)
    else:
        parts.update(safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe = (StableDiffusionXLPipeline if sdxl else StableDiffusionPipeline)(**parts)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pipeline_image(pipe, prompt: str, size: int, steps: int, cfg: float) -> float:
    """Seconds of one image of a diffusers pipeline, synchronised only around it."""
    torch.cuda.synchronize()
    start = time.perf_counter()
    pipe(prompt=prompt, width=size, height=size, num_inference_steps=steps, guidance_scale=cfg,
         generator=torch.Generator().manual_seed(1))
    torch.cuda.synchronize()
    return time.perf_counter() - start


def bench_unet_family(name: str, family: str, size: int, workdir: Path) -> None:
    from webui.engine.request import GenerationRequest

    engine = engine_for(write_checkpoint(family, workdir / f"{name}.safetensors"), workdir)
    request = dict(prompt="a photo of a cat", negative_prompt="", width=size, height=size, cfg_scale=7.0,
                   sampler_name="Euler", scheduler="Automatic", seed=1, save_images=False)

    def ours(steps: int):
        return engine.txt2img(GenerationRequest(steps=steps, **request))

    engine.progress = StepClock()

    def overhead_ms(result) -> float:
        return (result.seconds - result.timings["denoise"] - result.timings["decode"]) * 1000

    ours(2)  # load and place
    engine.progress.times.clear()
    runs = [ours(20) for _ in range(3)]
    step_ms = engine.progress.step_ms()
    moved = max(r.memory.moved_mb for r in runs)
    peak = max(r.memory.peak_vram_mb for r in runs)
    best = runs[-1]
    new_prompts = [engine.txt2img(GenerationRequest(steps=10, **{**request, "prompt": f"a photo of cat {i}"}))
                   for i in range(3)]

    pipe = diffusers_pipeline(engine)

    clock = StepClock()

    def on_step(pipeline, i, t, kwargs):
        clock.tick()
        return kwargs

    def plain(steps: int) -> float:
        clock.times.append([])
        torch.cuda.synchronize()
        start = time.perf_counter()
        pipe(prompt="a photo of a cat", negative_prompt="", width=size, height=size, num_inference_steps=steps,
             guidance_scale=7.0, generator=torch.Generator().manual_seed(1), callback_on_step_end=on_step)
        torch.cuda.synchronize()
        return time.perf_counter() - start

    plain(2)
    clock.times.clear()
    for _ in range(3):
        plain(20)
    ref_step_ms = clock.step_ms()
    activation = peak - best.memory.resident_mb
    report(Row(name, f"resident step, {size}², CFG", step_ms, ref_step_ms, "ms", "≤ 1.0×", step_ms <= ref_step_ms,
               peak, f"diffusers pipeline over the same modules; activations {activation:.0f} MB measured, "
                     f"{best.memory.activation_mb:.0f} MB estimated"))
    same = statistics.median(overhead_ms(r) for r in runs)
    report(Row(name, "overhead per image, same prompt", same, None, "ms", "≤ 20 ms, 0 MB moved",
               same <= 20 and moved == 0, None, f"{moved:.0f} MB moved per image; conditioning reused"))
    fresh = statistics.median(overhead_ms(r) for r in new_prompts)
    encode = statistics.median(r.timings["encode"] * 1000 for r in new_prompts)
    report(Row(name, "overhead per image, new prompt", fresh, None, "ms", "≤ 20 ms, 0 MB moved", fresh <= 20, None,
               f"of which text encoding {encode:.1f} ms"))

    engine.models.unload()
    pipe.enable_model_cpu_offload()
    plain(2)
    offload_s = statistics.median(plain(20) for _ in range(2))
    ours_s = statistics.median(r.seconds for r in runs)  # the same prompt, as the reference's timing runs
    report(Row(name, "whole image, 20 steps", ours_s * 1000, offload_s * 1000, "ms", "—", None, None,
               "reference: diffusers enable_model_cpu_offload (moves models every image)"))


# ---- Flux transformer through the memory manager ---------------------------------------------------

def flux_inputs(width: int = 1344, height: int = 768, text_tokens: int = 512) -> dict:
    tokens = (width // 16) * (height // 16)
    make = dict(device="cuda", dtype=torch.bfloat16)
    ids = torch.zeros(tokens, 3, device="cuda")
    return dict(hidden_states=torch.randn(1, tokens, 64, **make),
                encoder_hidden_states=torch.randn(1, text_tokens, 4096, **make),
                pooled_projections=torch.randn(1, 768, **make), timestep=torch.tensor([0.5], **make),
                guidance=torch.tensor([3.5], **make), img_ids=ids, txt_ids=torch.zeros(text_tokens, 3, device="cuda"),
                return_dict=False)


class FluxBench:
    """One Flux transformer under our memory manager: step time, streamed bytes and peak VRAM per policy."""

    def __init__(self, model, label: str):
        from webui.engine.families.flux import Flux
        from webui.engine.memory.activation import activation_bytes
        from webui.engine.memory.manager import MemoryManager

        self.model, self.label, self.inputs = model, label, flux_inputs()
        self.manager = MemoryManager(torch.device("cuda"))
        self.component = self.manager.register("transformer", model)
        self.size_mb = self.component.nbytes / MB
        self.total_mb = torch.cuda.get_device_properties(0).total_memory / MB
        self.activation = activation_bytes(Flux.activation_per_pixel, 1344, 768, 1, False, torch.bfloat16)

    def step(self, policy) -> tuple[float, float, float]:
        """(ms a step, bytes streamed a step, peak MB)."""
        self.manager.begin(policy, self.activation)
        self.manager.prepare(["transformer"])
        torch.cuda.reset_peak_memory_stats()
        with torch.inference_mode():
            step = timed(lambda: self.model(**self.inputs), repeat=5)
        return step * 1000, self.component.streamed_bytes(), torch.cuda.max_memory_allocated() / MB

    def resident(self) -> tuple[float, float]:
        from webui.engine.memory.manager import MemoryPolicy

        ms, _, peak = self.step(MemoryPolicy(inference_mb=1024))
        return ms, peak

    def with_gpu_weights(self, weights_mb: float, bandwidth: float, resident_ms: float, what: str) -> None:
        from webui.engine.memory.manager import MemoryPolicy

        policy = MemoryPolicy(inference_mb=int(self.total_mb - weights_mb), async_copies=True, pinned=True)
        ms, streamed, peak = self.step(policy)
        floor = max(resident_ms, streamed / bandwidth * 1000)
        budget_mb = weights_mb + self.activation / MB
        report(Row(self.label, what, ms, floor, "ms", "≤ 1.15 × floor", ms <= 1.15 * floor, peak,
                   f"floor = max(resident, {streamed / MB:.0f} MB ÷ bandwidth); "
                   f"peak ≤ {budget_mb:.0f} MB: {'yes' if peak <= budget_mb else 'no'}"))

    def fully_streamed(self, bandwidth: float) -> float:
        from webui.engine.memory.manager import MemoryPolicy

        ms, streamed, peak = self.step(MemoryPolicy(mode="lowvram", async_copies=True, pinned=True))
        floor = streamed / bandwidth * 1000
        report(Row(self.label, "fully streamed", ms, floor, "ms", "≤ 1.15 × copy floor", ms <= 1.15 * floor, peak,
                   f"{streamed / MB:.0f} MB a step over pinned bandwidth"))
        return floor


def flux_bf16_file(workdir: Path) -> Path:
    from webui.synthetic.ldm_export import write_flux_checkpoint

    path = workdir / "flux-dev-bf16.safetensors"
    if not path.exists():
        write_flux_checkpoint(path, "full", device="cuda")
        torch.cuda.empty_cache()
    return path


def bench_flux(workdir: Path, bandwidth: float) -> None:
    from diffusers.hooks import apply_group_offloading

    from webui.engine.families.flux import load_flux_transformer

    start = time.perf_counter()
    bench = FluxBench(load_flux_transformer(flux_bf16_file(workdir), torch.bfloat16), "Flux-dev bf16")
    print(f"Flux: {bench.size_mb:.0f} MB loaded in {time.perf_counter() - start:.1f} s", flush=True)
    resident_ms, resident_peak = bench.resident()
    report(Row(bench.label, "resident step, 1344×768", resident_ms, None, "ms", "—", None, resident_peak,
               f"activations {resident_peak - bench.size_mb:.0f} MB measured, {bench.activation / MB:.0f} MB estimated"))
    bench.with_gpu_weights(bench.size_mb / 2, bandwidth, resident_ms, "GPU Weights = 50 %")
    copy_floor = bench.fully_streamed(bandwidth)

    bench.manager.release_all()
    apply_group_offloading(bench.model, onload_device=torch.device("cuda"), offload_type="block_level",
                           num_blocks_per_group=1, use_stream=True)
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        group_ms = timed(lambda: bench.model(**bench.inputs), repeat=5) * 1000
    report(Row(bench.label, "diffusers group offload (stream)", group_ms, copy_floor, "ms", "reference", None,
               torch.cuda.max_memory_allocated() / MB, "block level, side stream, pinned"))


def bench_flux_q8(workdir: Path, bandwidth: float) -> None:
    """Flux-dev as a Q8_0 GGUF (original key names) beside the same architecture in bf16, and beside diffusers'
    own GGUF path (``from_single_file`` with ``GGUFQuantizationConfig``) on the same file."""
    from diffusers import FluxTransformer2DModel, GGUFQuantizationConfig

    from benchmarks.pipelines import write_flux_q8
    from webui.engine.families.flux import load_gguf_flux_transformer
    from webui.synthetic.builders import build_flux_transformer

    q8_path = write_flux_q8(workdir)
    bf16 = FluxBench(build_flux_transformer("full", device="cuda", dtype=torch.bfloat16).cpu(), "Flux-dev bf16")
    bf16_ms, bf16_peak = bf16.resident()
    report(Row(bf16.label, "resident step, 1344×768", bf16_ms, None, "ms", "—", None, bf16_peak))
    config_dir = workdir / "flux-dev-config"
    bf16.model.save_config(config_dir)
    bf16.manager.release_all()
    del bf16
    gc.collect()
    q8 = FluxBench(load_gguf_flux_transformer(q8_path, torch.bfloat16), "Flux-dev Q8_0 GGUF")
    q8_ms, q8_peak = q8.resident()
    report(Row(q8.label, "resident step, 1344×768", q8_ms, bf16_ms, "ms", "≤ 1.1× bf16", q8_ms <= 1.1 * bf16_ms,
               q8_peak, f"{q8.size_mb:.0f} MB of weights; reference: bf16 resident in this run"))
    q8.fully_streamed(bandwidth)
    q8.with_gpu_weights(8192, bandwidth, q8_ms, "GPU Weights = 8 GB")
    q8.manager.release_all()
    del q8
    gc.collect()
    torch.cuda.empty_cache()
    theirs = FluxTransformer2DModel.from_single_file(
        str(q8_path), config=str(config_dir), torch_dtype=torch.bfloat16, local_files_only=True,
        quantization_config=GGUFQuantizationConfig(compute_dtype=torch.bfloat16)).to("cuda")
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        theirs_ms = timed(lambda: theirs(**flux_inputs()), repeat=5) * 1000
    report(Row("Flux-dev Q8_0 GGUF", "diffusers GGUF path, resident", theirs_ms, bf16_ms, "ms", "reference", None,
               torch.cuda.max_memory_allocated() / MB, "diffusers from_single_file + GGUFQuantizationConfig, same file"))


def markdown(command: str, device: str) -> str:
    header = ["model", "row", "ours", "reference", "ratio", "goal", "met", "peak VRAM MB", "note"]
    lines = [f"## Memory manager — {time.strftime('%Y-%m-%d')}, {device}", "", f"`{command}`", "",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in ROWS]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="sd15,sdxl,flux,flux-q8")
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench"))
    parser.add_argument("--markdown", type=Path, default=None, help="write the table here too")
    args = parser.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    only = set(args.only.split(","))
    device = f"{torch.cuda.get_device_name(0)}, torch {torch.__version__}"
    bandwidth = pinned_bandwidth()
    print(f"{device}; pinned host→GPU {bandwidth / 1e9:.1f} GB/s", flush=True)
    benches = {"sd15": lambda: bench_unet_family("SD1.5", "sd1", 512, args.workdir),
               "sdxl": lambda: bench_unet_family("SDXL", "sdxl", 1024, args.workdir),
               "flux": lambda: bench_flux(args.workdir, bandwidth),
               "flux-q8": lambda: bench_flux_q8(args.workdir, bandwidth)}
    for name, bench in benches.items():
        if name in only:
            bench()
            gc.collect()  # the finished bench's models are unreachable now
            torch.cuda.empty_cache()
    table = markdown("python3 -m benchmarks.memory --only " + args.only, device)
    print(table)
    if args.markdown:
        args.markdown.write_text(table, encoding="utf-8")


if __name__ == "__main__":
    main()
