"""An upscaler model run over an image in overlapping tiles, so that any size fits the device (A1111's options
``ESRGAN_tile`` and ``ESRGAN_tile_overlap``). Where tiles overlap, their outputs are cross-faded over the middle of the overlap, so no
seam shows; where the model's receptive field is within a quarter of the overlap, the result equals the untiled one.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from webui.errors import UserError

MIN_WEIGHT = 1e-6  # a tile pixel's least blending weight: it counts only where no other tile covers the pixel


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Where tiles start along one side: every ``tile - overlap`` pixels, the last one flush with the end."""
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, tile - overlap))
    return starts + [size - tile]


def ramp(length: int, fade: int, fade_in: bool, fade_out: bool) -> torch.Tensor:
    """A tile's blending weight along one side, where a neighbour overlaps it by ``fade`` pixels: about 0 over the
    outer quarter of the overlap (a tile's edge pixels are the ones its padding spoils), rising linearly over its
    middle half, 1 beyond; 1 all along a side without a neighbour. Never quite 0, so that every pixel has weight."""
    weight = torch.ones(length)
    if fade:
        edge = ((torch.arange(min(fade, length)) + 0.5 - fade / 4) / (fade / 2)).clamp(MIN_WEIGHT, 1.0)
        if fade_in:
            weight[:edge.numel()] = torch.minimum(weight[:edge.numel()], edge)
        if fade_out:
            weight[-edge.numel():] = torch.minimum(weight[-edge.numel():], edge.flip(0))
    return weight


def upscale_tiled(run: Callable[[torch.Tensor], torch.Tensor], image: torch.Tensor, scale: int, tile: int,
                  overlap: int, interrupted: Callable[[], bool] = lambda: False) -> torch.Tensor:
    """``run`` (a (1, C, h, w) tensor → (1, C, h*scale, w*scale), on the CPU) over ``image`` in tiles of ``tile``
    pixels overlapping by ``overlap``; ``tile`` 0: the whole image at once. The output is put together on the CPU."""
    _, channels, height, width = image.shape
    if tile == 0 or (height <= tile and width <= tile):
        return run(image)
    if not 0 <= overlap < tile:
        raise UserError(f"must be less than the tile size ({tile}), got {overlap}", field="ESRGAN_tile_overlap")
    out = torch.zeros(1, channels, height * scale, width * scale)
    weights = torch.zeros(1, 1, height * scale, width * scale)
    rows, columns = tile_starts(height, tile, overlap), tile_starts(width, tile, overlap)
    for y in rows:
        for x in columns:
            if interrupted():
                raise UserError("Interrupted: the upscale was stopped")
            h, w = min(tile, height), min(tile, width)
            result = run(image[:, :, y:y + h, x:x + w])
            weight = (ramp(h * scale, overlap * scale, y > 0, y + h < height)[:, None]
                      * ramp(w * scale, overlap * scale, x > 0, x + w < width)[None, :])
            box = (slice(None), slice(None), slice(y * scale, (y + h) * scale), slice(x * scale, (x + w) * scale))
            out[box] += result * weight
            weights[box] += weight
    return out / weights
