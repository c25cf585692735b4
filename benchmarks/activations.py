"""Activation memory per phase, measured: what each family's estimates are calibrated on (issue 24).

    python3 -m benchmarks.activations [--only sd15,sdxl,sd3,flux] [--markdown FILE]

Full-size architectures with random weights (values do not change memory), at the precision the
engine computes in. For each phase — text encoding, one denoiser call (batch 1 and 2: CFG runs the
two halves as one batch), a whole (untiled) VAE decode and encode (img2img's) — the peak memory torch
allocated above what was allocated before the call (weights and inputs), at several sizes. Printed beside what
the engine estimates today (``FamilyModel.activation_per_pixel`` through ``memory.activation``, and
``memory.manager.vae_decode_bytes`` / ``vae_encode_bytes``), with the per-pixel coefficient each measurement
implies: bytes per latent pixel per image at 2-byte precision for the denoiser, per image pixel for the VAE.
"""
from __future__ import annotations

import argparse
import gc
from collections.abc import Callable
from dataclasses import dataclass

import torch

from webui.engine.families.registry import Families
from webui.engine.formats.detect import Family
from webui.engine.memory import MB
from webui.engine.memory.activation import activation_bytes
from webui.engine.memory.manager import vae_decode_bytes, vae_encode_bytes


@dataclass
class Measured:
    model: str
    phase: str
    size: str
    images: int
    peak_mb: float
    estimate_mb: float | None
    per_pixel: float | None  # bytes per pixel per image at 2-byte precision (latent pixels for the denoiser)

    def cells(self) -> list[str]:
        estimate = "—" if self.estimate_mb is None else f"{self.estimate_mb:.0f}"
        ratio = "—" if not self.estimate_mb else f"{self.estimate_mb / self.peak_mb:.2f}×"
        per_pixel = "—" if self.per_pixel is None else f"{self.per_pixel:,.0f}"
        return [self.model, self.phase, self.size, str(self.images), f"{self.peak_mb:.0f}", estimate, ratio,
                per_pixel]


def peak_above_now(call: Callable[[], object]) -> float:
    """Bytes torch allocates during ``call`` above what is allocated when it starts."""
    torch.cuda.synchronize()
    gc.collect()
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    with torch.inference_mode():
        call()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def denoiser_rows(name: str, family: Family, call: Callable[[int, int, int], object],
                  sizes: list[tuple[int, int]], dtype: torch.dtype) -> list[Measured]:
    """One denoiser call per size and image count; ``call(width, height, images)`` runs it."""
    per_pixel = Families()[family].activation_per_pixel
    rows = []
    for width, height in sizes:
        for images in (1, 2):
            peak = peak_above_now(lambda: call(width, height, images))
            latent_pixels = (width // 8) * (height // 8) * images
            estimate = activation_bytes(per_pixel, width, height, images, False, dtype)
            scale = torch.finfo(dtype).bits / 16
            rows.append(Measured(name, "denoise", f"{width}×{height}", images, peak / MB, estimate / MB,
                                 peak / latent_pixels / scale))
    return rows


def decode_rows(name: str, vae: torch.nn.Module, sizes: list[tuple[int, int]]) -> list[Measured]:
    dtype = next(vae.parameters()).dtype
    rows = []
    for width, height in sizes:
        latents = torch.randn(1, vae.config.latent_channels, height // 8, width // 8, device="cuda", dtype=dtype)
        peak = peak_above_now(lambda: vae.decode(latents).sample)
        scale = torch.finfo(dtype).bits / 16
        rows.append(Measured(name, f"decode ({str(dtype).removeprefix('torch.')})", f"{width}×{height}", 1,
                             peak / MB, vae_decode_bytes(width, height, 1, dtype) / MB, peak / (width * height) / scale))
        pixels = torch.randn(1, 3, height, width, device="cuda", dtype=dtype)
        peak = peak_above_now(lambda: vae.encode(pixels).latent_dist.mode())
        rows.append(Measured(name, f"VAE encode ({str(dtype).removeprefix('torch.')})", f"{width}×{height}", 1,
                             peak / MB, vae_encode_bytes(width, height, 1, dtype) / MB, peak / (width * height) / scale))
    return rows


def encode_rows(name: str, encoders: list[tuple[str, torch.nn.Module, int]]) -> list[Measured]:
    """Each text encoder over a CFG pair of prompts of ``tokens`` tokens (77 for CLIP, 256/512 for T5)."""
    rows = []
    for label, encoder, tokens in encoders:
        ids = torch.randint(0, 1000, (2, tokens), device="cuda")
        peak = peak_above_now(lambda: encoder(ids, output_hidden_states=True))
        rows.append(Measured(name, f"encode ({label})", f"{tokens} tokens", 2, peak / MB, None, None))
    return rows


def unet_family(name: str, family: Family, synthetic: str, sizes: list[tuple[int, int]],
                decode_sizes: list[tuple[int, int]]) -> list[Measured]:
    from webui.synthetic.builders import build_synthetic_model

    model = build_synthetic_model(synthetic, "full", device="cuda")
    unet = model.denoiser.half()
    context_width = unet.config.cross_attention_dim
    sdxl = unet.config.addition_embed_type == "text_time"

    def call(width: int, height: int, images: int):
        x = torch.randn(images, 4, height // 8, width // 8, device="cuda", dtype=torch.float16)
        context = torch.randn(images, 77, context_width, device="cuda", dtype=torch.float16)
        added = None
        if sdxl:
            added = {"text_embeds": torch.randn(images, 1280, device="cuda", dtype=torch.float16),
                     "time_ids": torch.tensor([[height, width, 0, 0, height, width]] * images, device="cuda",
                                              dtype=torch.float16)}
        return unet(x, torch.tensor([500] * images, device="cuda"), encoder_hidden_states=context,
                    added_cond_kwargs=added).sample

    encoders = [(f"CLIP {i + 1}", te.half(), 77) for i, te in enumerate(model.text_encoders)]
    rows = encode_rows(name, encoders) + denoiser_rows(name, family, call, sizes, torch.float16)
    vae_dtype = torch.float32 if Families()[family].vae_upcast else torch.float16
    return rows + decode_rows(name, model.vae.to(vae_dtype), decode_sizes)


def flow_denoiser(name: str, family: Family, sizes: list[tuple[int, int]]) -> list[Measured]:
    from webui.synthetic.builders import build_flux_transformer, build_sd3_transformer

    dtype = torch.bfloat16
    flux = family is Family.FLUX
    denoiser = (build_flux_transformer if flux else build_sd3_transformer)("full", device="cuda", dtype=dtype)
    config = denoiser.config

    def call(width: int, height: int, images: int):
        h, w, tokens = height // 8, width // 8, 512 if flux else 333
        context = torch.randn(images, tokens, config.joint_attention_dim, device="cuda", dtype=dtype)
        pooled = torch.randn(images, config.pooled_projection_dim, device="cuda", dtype=dtype)
        t = torch.full((images,), 0.5 if flux else 500.0, device="cuda", dtype=dtype)
        if not flux:
            x = torch.randn(images, 16, h, w, device="cuda", dtype=dtype)
            return denoiser(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                            return_dict=False)[0]
        seq = (h // 2) * (w // 2)
        x = torch.randn(images, seq, 64, device="cuda", dtype=dtype)
        img_ids = torch.zeros(seq, 3, device="cuda", dtype=dtype)
        txt_ids = torch.zeros(tokens, 3, device="cuda", dtype=dtype)
        guidance = torch.full((images,), 3.5, device="cuda", dtype=dtype)
        return denoiser(hidden_states=x, encoder_hidden_states=context, pooled_projections=pooled, timestep=t,
                        img_ids=img_ids, txt_ids=txt_ids, guidance=guidance, return_dict=False)[0]

    return denoiser_rows(name, family, call, sizes, dtype)


def t5_and_vae16(name: str, family: Family, sizes: list[tuple[int, int]]) -> list[Measured]:
    from webui.synthetic.builders import build_t5_encoder, build_vae16

    t5 = build_t5_encoder("full", device="cuda", dtype=torch.bfloat16)
    rows = encode_rows(name, [("T5-XXL", t5, 512 if family is Family.FLUX else 256)])
    t5.to("meta")  # its 9.5 GB gone before the VAE is measured
    return rows + decode_rows(name, build_vae16("full", family, device="cuda", dtype=torch.bfloat16), sizes)


def flow_family(name: str, family: Family, sizes: list[tuple[int, int]]) -> list[Measured]:
    rows = flow_denoiser(name, family, sizes)
    gc.collect()
    torch.cuda.empty_cache()
    return rows + t5_and_vae16(name, family, sizes)


MODELS: dict[str, Callable[[], list[Measured]]] = {
    "sd15": lambda: unet_family("SD1.5", Family.SD1, "sd1", [(512, 512), (768, 768), (1024, 1024)],
                                [(512, 512), (1024, 1024)]),
    "sdxl": lambda: unet_family("SDXL", Family.SDXL, "sdxl", [(1024, 1024), (1344, 768), (1536, 1536)],
                                [(1024, 1024), (1536, 1536)]),
    "sd3": lambda: flow_family("SD3.5 Large", Family.SD3, [(1024, 1024), (1344, 768)]),
    "flux": lambda: flow_family("Flux-dev", Family.FLUX, [(1024, 1024), (1344, 768)]),
}
HEADER = ["model", "phase", "size", "images", "peak MB", "estimate MB", "estimate/peak", "bytes/pixel (2-byte)"]


def markdown(rows: list[Measured], command: str) -> str:
    device = torch.cuda.get_device_name()
    lines = [f"`{command}` — {device}, torch {torch.__version__}", "", "| " + " | ".join(HEADER) + " |",
             "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--only", default=",".join(MODELS))
    parser.add_argument("--markdown", help="also write the table to this file")
    args = parser.parse_args()
    rows: list[Measured] = []
    for key in args.only.split(","):
        measured = MODELS[key]()
        for row in measured:
            print(" | ".join(row.cells()), flush=True)
        rows += measured
        gc.collect()
        torch.cuda.empty_cache()
    table = markdown(rows, f"python3 -m benchmarks.activations --only {args.only}")
    print(table)
    if args.markdown:
        with open(args.markdown, "w", encoding="utf-8") as f:
            f.write(table)


if __name__ == "__main__":
    main()
