"""ControlNet's cost in whole images (issue 27): SDXL 1024², 20 Euler steps, CFG 7, a new prompt each image, with no,
one and two full-size ControlNets (diffusers' layout, fp16, grown from the checkpoint's UNet as they are trained),
resident beside diffusers' StableDiffusionXLControlNetPipeline over the same modules, and on a simulated 8 GB card.

    python3 -m benchmarks.controlnet [--cards 8192] [--repeat 2] [--workdir /tmp/bench-whole]

"per step" is the image's time over the one without ControlNet, per step. Goals: resident ≤ 1.0× the pipeline;
on the card, peak VRAM within it.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from benchmarks.memory import diffusers_pipeline
from benchmarks.pipelines import CONTEXT_MB, simulate_card
from benchmarks.table import print_table
from benchmarks.whole_image import CASES, PROMPTS, engine_for, median, release, synchronize
from webui.engine.control.units import ControlUnit
from webui.engine.request import GenerationRequest

CASE = CASES["sdxl"]
NAMES = ("sdxl-control-0", "sdxl-control-1")


def control_image(size: int, seed: int) -> Image.Image:
    """An edge map of random rings: what a canny preprocessor gives."""
    y, x = np.mgrid[0:size, 0:size]
    rng = np.random.default_rng(seed)
    edges = np.zeros((size, size), dtype=bool)
    for cx, cy, r in rng.uniform(0.1, 0.9, (8, 3)) * size:
        edges |= np.abs(np.hypot(x - cx, y - cy) - r / 3) < 2
    return Image.fromarray((np.stack([edges] * 3, axis=-1) * 255).astype(np.uint8))


def write_controlnets(engine, root: Path) -> None:
    """Two ControlNets from the loaded UNet (its encoder copied, as training starts), written in fp16."""
    from diffusers import ControlNetModel

    from webui.synthetic.ldm_export import write_controlnet

    folder = engine.config.paths.controlnet_dir
    folder.mkdir(parents=True, exist_ok=True)
    for seed, name in enumerate(NAMES):
        path = folder / f"{name}.safetensors"
        if path.exists():
            continue
        model = ControlNetModel.from_unet(engine.models.current.denoiser).to("cuda", torch.float16)
        generator = torch.Generator("cuda").manual_seed(seed)
        for key, parameter in model.named_parameters():  # zero convolutions made non-zero: the residuals count
            if key.startswith(("controlnet_down_blocks", "controlnet_mid_block")):
                parameter.data = torch.randn(parameter.shape, generator=generator, device="cuda",
                                             dtype=parameter.dtype) * 0.01
        write_controlnet(path, model, "diffusers", torch.float16)
        del model
        torch.cuda.empty_cache()


def ours(engine, count: int) -> tuple[float, object]:
    units = [ControlUnit(model=name, image=control_image(CASE.width, seed), weight=0.8)
             for seed, name in enumerate(NAMES[:count])]
    request = GenerationRequest(prompt=next(PROMPTS), width=CASE.width, height=CASE.height, steps=CASE.steps,
                                cfg_scale=CASE.cfg, sampler_name="Euler", scheduler="Automatic", seed=1,
                                save_images=False, controlnet=units or None)
    synchronize()
    start = time.perf_counter()
    result = engine.txt2img(request)
    return time.perf_counter() - start, result


def reference(engine, count: int) -> float:
    """diffusers' SDXL ControlNet pipeline over the engine's modules and the ControlNets it loaded (on the GPU)."""
    from diffusers import StableDiffusionXLControlNetPipeline
    from diffusers.models import MultiControlNetModel

    plain = diffusers_pipeline(engine)
    models = [model for _, model in engine.controlnets.loaded.values()]
    pipe = StableDiffusionXLControlNetPipeline(**plain.components, controlnet=(
        models[0] if count == 1 else MultiControlNetModel(models)))
    pipe.set_progress_bar_config(disable=True)
    images = [control_image(CASE.width, seed) for seed in range(count)]

    def one() -> float:
        synchronize()
        start = time.perf_counter()
        pipe(prompt=next(PROMPTS), width=CASE.width, height=CASE.height, num_inference_steps=CASE.steps,
             guidance_scale=CASE.cfg, image=images[0] if count == 1 else images,
             controlnet_conditioning_scale=0.8 if count == 1 else [0.8] * count,
             generator=torch.Generator().manual_seed(1))
        synchronize()
        return time.perf_counter() - start

    return median(2, one)


def rows_for(engine, label: str, repeat: int, card_mb: int | None) -> list[str]:
    rows, plain = [], None
    for count in (0, 1, 2):
        mine = median(repeat, lambda: ours(engine, count)[0])
        _, result = ours(engine, count)
        plain = mine if count == 0 else plain
        per_step = (mine - plain) / CASE.steps * 1000
        if card_mb is None:
            versus = reference(engine, count) if count else None
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
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cards", default="8192", help="simulated card sizes, MB ('' for none)")
    parser.add_argument("--repeat", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=Path("/tmp/bench-whole"))
    args = parser.parse_args()
    from webui.settings import OPTION_DEFAULTS

    swap = (OPTION_DEFAULTS["forge_async_loading"], OPTION_DEFAULTS["forge_pin_shared_memory"])
    checkpoint = CASE.write(args.workdir)
    engine = engine_for(CASE, checkpoint, args.workdir, swap)
    ours(engine, 0)  # loads the model
    write_controlnets(engine, args.workdir)
    rows = rows_for(engine, f"{CASE.label} resident", args.repeat, None)
    release(engine)
    for card in (int(c) for c in args.cards.split(",") if c):
        engine = engine_for(CASE, checkpoint, args.workdir, swap)
        simulate_card(engine, card)
        rows += rows_for(engine, f"{CASE.label} {card // 1024} GB card", args.repeat, card)
        release(engine)
    print_table("ControlNet in whole images", __doc__.split("\n\n")[0] + "\n\nCommand: `python3 -m "
                "benchmarks.controlnet`.", ["case", "ControlNets", "image", "per step vs none", "beside",
                                           "goal met", "peak VRAM", "streamed"], rows)


if __name__ == "__main__":
    main()
