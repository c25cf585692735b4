"""Upscaler weights in the real state-dict layouts spandrel reads (random values): the tests' tiny models and the
benchmarks' full-size ESRGAN."""
from __future__ import annotations

import torch


def esrgan_state(seed: int = 1, filters: int = 8, grow: int = 32, blocks: int = 1) -> dict[str, torch.Tensor]:
    """An RRDBNet (ESRGAN) 4x of ``blocks`` residual-in-residual blocks, in BasicSR's (Real-ESRGAN's) key layout
    (the released ESRGAN and RealESRGAN_x4plus: 23 blocks, 64 filters, growth 32)."""
    generator = torch.Generator().manual_seed(seed)

    def conv(out: int, inp: int, prefix: str) -> dict[str, torch.Tensor]:
        return {f"{prefix}.weight": torch.randn(out, inp, 3, 3, generator=generator) * 0.05,
                f"{prefix}.bias": torch.randn(out, generator=generator) * 0.01}

    state = {**conv(filters, 3, "conv_first")}
    for block in range(blocks):
        for rdb in (1, 2, 3):
            for number in range(1, 6):
                out = filters if number == 5 else grow
                state |= conv(out, filters + (number - 1) * grow, f"body.{block}.rdb{rdb}.conv{number}")
    for name in ("conv_body", "conv_up1", "conv_up2", "conv_hr"):
        state |= conv(filters, filters, name)
    return state | conv(3, filters, "conv_last")


def compact_state(seed: int = 2, filters: int = 8, convs: int = 1, scale: int = 2) -> dict[str, torch.Tensor]:
    """An SRVGGNetCompact (Real-ESRGAN's realesr-*-x4v3 kind): conv, PReLU, ``convs`` x (conv, PReLU), conv to
    3 * scale² channels, pixel shuffle."""
    generator = torch.Generator().manual_seed(seed)
    state, index = {}, 0
    for out, inp in [(filters, 3)] + [(filters, filters)] * convs:
        state[f"body.{index}.weight"] = torch.randn(out, inp, 3, 3, generator=generator) * 0.1
        state[f"body.{index}.bias"] = torch.randn(out, generator=generator) * 0.01
        state[f"body.{index + 1}.weight"] = torch.full((filters,), 0.25)
        index += 2
    state[f"body.{index}.weight"] = torch.randn(3 * scale * scale, filters, 3, 3, generator=generator) * 0.1
    state[f"body.{index}.bias"] = torch.zeros(3 * scale * scale)
    return state
