"""ControlNet's cost in whole images (issue 27), a new prompt each image: SDXL 1024², 20 Euler steps, CFG 7, with no,
one and two full-size ControlNets (diffusers' layout, fp16, grown from the checkpoint's UNet as they are trained),
resident beside diffusers' StableDiffusionXLControlNetPipeline over the same modules; Flux-dev Q8_0 1344×768 with no
and one Flux ControlNet of InstantX's size (5 double and 10 single blocks, bf16); each also on a simulated 8 GB card.

    python3 -m benchmarks.controlnet [--only sdxl,flux-q8] [--cards 8192] [--repeat 2] [--workdir /tmp/bench-whole]

"per step" is the image's time over the one without ControlNet, per step. Goals: resident ≤ 1.0× the pipeline
(SDXL; Flux's rows have no reference here); on the card, peak VRAM within it.
"""
from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.memory import diffusers_pipeline
from benchmarks.pipelines import CONTEXT_MB, simulate_card
from benchmarks.table import print_table
from benchmarks.whole_image import CASES, PROMPTS, Case, engine_for, median, release, synchronize
from webui.engine.control.units import ControlUnit
from webui.engine.request import GenerationRequest


@dataclass(frozen=True)
class Bench:
    case: Case
    names: tuple[str, ...]  # its ControlNets' names (files in models/ControlNet)
    write: Callable[[object, Path], None]  # (engine with the model loaded, file) writes a ControlNet there
    reference: bool  # diffusers' ControlNet pipeline beside the resident rows


def control_image(width: int, height: int, seed: int) -> Image.Image:
    """An edge map of random rings: what a canny preprocessor gives."""
    y, x = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(seed)
    edges = np.zeros((height, width), dtype=bool)
    for cx, cy, r in rng.uniform(0.1, 0.9, (8, 3)) * (width, height, min(width, height)):
        edges |= np.abs(np.hypot(x - cx, y - cy) - r / 3) < 2
    return Image.fromarray((np.stack([edges] * 3, axis=-1) * 255).astype(np.uint8))


def write_controlnets(engine, bench: Bench) -> None:
    folder = engine.config.paths.controlnet_dir
    folder.mkdir(parents=True, exist_ok=True)
    for name in bench.names:
        path = folder / f"{name}.safetensors"
        if not path.exists():
            bench.write(engine, path)
            torch.cuda.empty_cache()


def write_sdxl_controlnet(engine, path: Path) -> None:
    """A ControlNet from the loaded UNet (its encoder copied, as training starts), written in fp16."""
    from diffusers import ControlNetModel

    from webui.synthetic.ldm_export import write_controlnet

    model = ControlNetModel.from_unet(engine.models.current.denoiser).to("cuda", torch.float16)
    generator = torch.Generator("cuda").manual_seed(int(path.stem[-1]))
    for key, parameter in model.named_parameters():  # zero convolutions made non-zero: the residuals count
        if key.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
            parameter.data = torch.randn(parameter.shape, generator=generator, device="cuda",
                                         dtype=parameter.dtype) * 0.01
    write_controlnet(path, model, "diffusers", torch.float16)


def write_flux_controlnet(engine, path: Path) -> None:
    """A Flux ControlNet of InstantX's size for the loaded transformer's width, random bf16, in diffusers' layout."""
    from diffusers import FluxControlNetModel
    from safetensors.torch import save_file

    config = dict(engine.models.current.denoiser.config)
    with torch.device("cuda"):
        model = FluxControlNetModel.from_config(config, num_layers=5, num_single_layers=10).to(torch.bfloat16)
    save_file({k: v.contiguous().cpu() for k, v in model.state_dict().items()}, path)


BENCHES = {"sdxl": Bench(CASES["sdxl"], ("sdxl-control-0", "sdxl-control-1"), write_sdxl_controlnet, True),
           "flux-q8": Bench(CASES["flux-q8"], ("flux-control-0",), write_flux_controlnet, False)}


def ours(engine, bench: Bench, count: int) -> tuple[float, object]:
    case = bench.case
    units = [ControlUnit(model=name, image=control_image(case.width, case.height, seed), weight=0.8)
             for seed, name in enumerate(bench.names[:count])]
    request = GenerationRequest(prompt=next(PROMPTS), width=case.width, height=case.height, steps=case.steps,
                                cfg_scale=case.cfg, sampler_name="Euler", scheduler="Automatic", seed=1,
                                save_images=False, controlnet=units or None, **case.fields)
    synchronize()
    start = time.perf_counter()
    result = engine.txt2img(request)
    return time.perf_counter() - start, result


def reference(engine, bench: Bench, count: int) -> float:
    """diffusers' SDXL ControlNet pipeline over the engine's modules and the ControlNets it loaded (on the GPU)."""
    from diffusers import StableDiffusionXLControlNetPipeline
    from diffusers.models import MultiControlNetModel

    case = bench.case
    plain = diffusers_pipeline(engine)
    models = [model for _, model in engine.controlnets.loaded.values()]
    pipe = StableDiffusionXLControlNetPipeline(**plain.components, controlnet=(
        models[0] if count == 1 else MultiControlNetModel(models)))
    pipe.set_progress_bar_config(disable=True)
    images = [control_image(case.width, case.height, seed) for seed in range(count)]

    def one() -> float:
        synchronize()
        start = time.perf_counter()
        pipe(prompt=next(PROMPTS), width=case.width, height=case.height, num_inference_steps=case.steps,
             guidance_scale=case.cfg, image=images[0] if count == 1 else images,
             controlnet_conditioning_scale=0.8 if count == 1 else [0.8] * count,
             generator=torch.Generator().manual_seed(1))
        synchronize()
        return time.perf_counter() - start

    return median(2, one)


def rows_for(engine, bench: Bench, label: str, repeat: int, card_mb: int | None) -> list[str]:
    rows, plain = [], None
    for count in range(len(bench.names) + 1):
        mine = median(repeat, lambda: ours(engine, bench, count)[0])
        _, result = ours(engine, bench, count)
        plain = mine if count == 0 else plain
        per_step = (mine - plain) / bench.case.steps * 1000
        if card_mb is None:
            versus = reference(engine, bench, count) if count and bench.reference else None
            compared = f"pipeline {versus * 1000:.0f} ms, {mine / versus:.2f}× (≤ 1.0×)" if versus else "—"
            met = versus is None or mine <= versus
        else:
            compared = f"peak within {card_mb - CONTEXT_MB} MB"
            met = result.memory.peak_vram_mb <= card_mb - CONTEXT_MB
        rows.append(f"| {label} | {count} | {mine * 1000:.0f} ms | {per_step:+.0f} ms | {compared} | "
                    f"{'yes' if met else '**no**'} | {result.memory.peak_vram_mb:.0f} MB | "
                    f"{result.memory.streamed_mb:.0f} MB |")
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    from webui.settings import OPTION_DEFAULTS

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", default="sdxl,flux-q8")
    parser.add_argument("--cards", default="8192", help="simulated card sizes, MB ('' for none)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-whole"))
    args = parser.parse_args()
    swap = (OPTION_DEFAULTS["forge_async_loading"], OPTION_DEFAULTS["forge_pin_shared_memory"])
    rows = []
    for key in args.only.split(","):
        bench = BENCHES[key]
        case = bench.case
        checkpoint = case.write(args.workdir)
        engine = engine_for(case, checkpoint, args.workdir, swap)
        ours(engine, bench, 0)  # loads the model
        write_controlnets(engine, bench)
        rows += rows_for(engine, bench, f"{case.label} resident", args.repeat, None)
        release(engine)
        for card in (int(c) for c in args.cards.split(",") if c):
            engine = engine_for(case, checkpoint, args.workdir, swap)
            simulate_card(engine, card)
            rows += rows_for(engine, bench, f"{case.label} {card // 1024} GB card", args.repeat, card)
            release(engine)
            torch.cuda.set_per_process_memory_fraction(1.0)  # (the next case writes its files on the whole card)
    print_table("ControlNet in whole images", __doc__.split("\n\n")[0] + "\n\nCommand: `python3 -m "
                "benchmarks.controlnet`.", ["case", "ControlNets", "image", "per step vs none", "beside",
                                           "goal met", "peak VRAM", "streamed"], rows)


if __name__ == "__main__":
    main()
