"""The starting noise of each image, drawn as A1111 draws it, so that its seeds make the same pictures here.

Each image's noise comes from a CPU generator seeded with its seed (the generator then goes on to feed the
ancestral samplers). A1111's variation seed mixes in a second seed's noise by spherical interpolation
(``subseed_strength`` 0: none of it, 1: all of it), and its "resize seed from" draws the noise of another size and
centres it on the noise of this one, cropped where larger, so that a seed found at one size keeps its composition
at another. Both draw the extra noise from fresh generators, so the images' own generators are used exactly as
without them (one draw of the full size).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Variation:
    """A1111's variation seed and seed resize for one batch: ``subseeds`` one per image, ``resize_from`` the latent
    (height, width) the noise is drawn at first, or None."""

    subseeds: list[int]
    strength: float = 0.0
    resize_from: tuple[int, int] | None = None


def initial_noise(shape: tuple[int, ...], generators: list[torch.Generator], seeds: list[int],
                  variation: Variation | None = None) -> torch.Tensor:
    """One latent of ``shape`` (C, H, W) per image, float32 on the CPU."""
    latents = []
    for i, (generator, seed) in enumerate(zip(generators, seeds)):
        noise = torch.randn(shape, generator=generator, dtype=torch.float32)
        if variation is not None and (variation.strength or variation.resize_from):
            noise = _varied(noise, seed, variation.subseeds[i], variation)
        latents.append(noise)
    return torch.stack(latents)


def _varied(full: torch.Tensor, seed: int, subseed: int, variation: Variation) -> torch.Tensor:
    """The image's noise (C, H, W) with its variation seed mixed in, drawn at the resize-from size and centred on
    ``full`` where asked."""
    drawn = (full.shape[0], *(variation.resize_from or full.shape[1:]))
    noise = full if variation.resize_from is None else _randn(seed, drawn)
    if variation.strength:
        noise = slerp(variation.strength, noise, _randn(subseed, drawn))
    if variation.resize_from is None:
        return noise
    return _centred(noise, full)


def _randn(seed: int, shape: tuple[int, ...]) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator("cpu").manual_seed(seed), dtype=torch.float32)


def _centred(small: torch.Tensor, canvas: torch.Tensor) -> torch.Tensor:
    """``small`` pasted in the middle of ``canvas`` (each cropped to the other where it is larger)."""
    out = canvas.clone()
    (h, w), (big_h, big_w) = small.shape[-2:], canvas.shape[-2:]
    top, left = (big_h - h) // 2, (big_w - w) // 2
    rows, cols = min(h, big_h), min(w, big_w)
    dst_top, dst_left, src_top, src_left = max(top, 0), max(left, 0), max(-top, 0), max(-left, 0)
    out[..., dst_top:dst_top + rows, dst_left:dst_left + cols] = \
        small[..., src_top:src_top + rows, src_left:src_left + cols]
    return out


def slerp(t: float, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation from ``low`` (t = 0) to ``high`` (t = 1) of two (C, H, W) latents, as A1111 computes
    it for variation seeds: angles measured along the H axis, a straight line where the two are nearly parallel."""
    low_unit = low / torch.norm(low, dim=1, keepdim=True)
    high_unit = high / torch.norm(high, dim=1, keepdim=True)
    cosine = (low_unit * high_unit).sum(1)
    if cosine.mean() > 0.9995:
        return low * (1 - t) + high * t
    angle = torch.acos(cosine)
    sine = torch.sin(angle)
    return (torch.sin((1.0 - t) * angle) / sine).unsqueeze(1) * low + (torch.sin(t * angle) / sine).unsqueeze(1) * high
