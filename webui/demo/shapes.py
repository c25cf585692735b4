"""The demo model's world: one flat shape on a plain background, drawn by code with a caption, and read back.

Pictures are drawn with torch on any device, a batch at a time (the training set is drawn on the GPU), with 4x
supersampling for smooth edges. ``read_picture`` measures what a picture shows (background and object colour,
where the object is, dark outline pixels, how the background darkens downwards) so that tests can check that a
generated picture matches its prompt.
"""
from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

SHAPES = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40), "orange": (245, 140, 20), "yellow": (240, 220, 40), "green": (40, 170, 70),
    "blue": (40, 90, 230), "purple": (150, 60, 200), "white": (245, 245, 245),
}
OUTLINE_RGB = (20, 20, 20)  # the outline LoRA's; no caption colour is this dark
POSITIONS: dict[str, tuple[float, float]] = {
    "left": (0.28, 0.5), "right": (0.72, 0.5), "top": (0.5, 0.28), "bottom": (0.5, 0.72), "centre": (0.5, 0.5),
}
PLACE_WORDS = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
               "centre": "in the centre"}
SIZES = {"small": 0.13, "large": 0.21}  # the shape's radius, as a fraction of the picture's side
JITTER = 0.03  # positions and radii vary this much (fraction of the side) around their named values
OUTLINE_WIDTH = 0.035
DUSK_FLOOR = 0.45  # the "dusk" style's background: full colour at the top, this fraction of it at the bottom
STYLES = ("flat", "dusk")
CAPTION_PARTS = 7  # size, place and background: the bits of Scene.partial_caption


@dataclass(frozen=True)
class Scene:
    shape: str
    colour: str
    background: str
    position: str
    size: str

    def caption(self) -> str:
        """The whole caption, e.g. "a large red circle on the left, blue background"."""
        return self.partial_caption(CAPTION_PARTS)

    def partial_caption(self, parts: int) -> str:
        """The caption with only some of its size (bit 1), place (bit 2) and background (bit 4): training uses
        them all, so that the model learns what each word does alone and fills in what a prompt leaves out."""
        size = f"{self.size} " if parts & 1 else ""
        place = f" {PLACE_WORDS[self.position]}" if parts & 2 else ""
        background = f", {self.background} background" if parts & 4 else ""
        return f"a {size}{self.colour} {self.shape}{place}{background}"


def all_scenes() -> list[Scene]:
    return [Scene(shape, colour, background, position, size) for shape in SHAPES for colour in COLOURS
            for background in COLOURS if background != colour for position in POSITIONS for size in SIZES]


def _polygon(shape: str) -> torch.Tensor:
    """Unit-radius vertices (x, y; y downwards) of the polygon shapes, sized to look as big as a circle."""
    if shape == "square":
        s = 0.886  # the square with a unit circle's area
        return torch.tensor([[-s, -s], [s, -s], [s, s], [-s, s]])
    if shape == "triangle":
        r = 1.3
        return torch.tensor([[r * math.cos(a), r * math.sin(a)] for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)])
    outer, inner = 1.35, 0.55
    return torch.tensor([[(outer if i % 2 == 0 else inner) * math.cos(-math.pi / 2 + i * math.pi / 5),
                          (outer if i % 2 == 0 else inner) * math.sin(-math.pi / 2 + i * math.pi / 5)]
                         for i in range(10)])


def _inside(shape: str, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Whether points (in units of the shape's radius, centred on it) are inside the shape."""
    if shape == "circle":
        return x * x + y * y <= 1
    vertices = _polygon(shape).to(x.device)
    inside = torch.zeros_like(x, dtype=torch.bool)
    for (x1, y1), (x2, y2) in zip(vertices.tolist(), vertices.roll(-1, 0).tolist()):
        if y1 == y2:
            continue
        crosses = ((y1 > y) != (y2 > y)) & (x < (x2 - x1) * (y - y1) / (y2 - y1) + x1)
        inside ^= crosses
    return inside


def draw(scenes: list[Scene], size: int = 128, style: str = "flat", outline: bool = False, seed: int = 0,
         device: str | torch.device = "cpu", supersample: int = 4) -> torch.Tensor:
    """Pictures of ``scenes`` as a float tensor (N, 3, size, size) in [-1, 1]; positions and radii jittered by
    ``seed``. ``style`` "dusk" darkens the background downwards; ``outline`` rings the shape in near-black. Edges
    are smoothed by drawing ``supersample`` times larger, then averaging."""
    if style not in STYLES:
        raise ValueError(f"style must be one of {STYLES}, got {style!r}")
    generator = torch.Generator().manual_seed(seed)
    n, fine = len(scenes), size * supersample
    jitter = (torch.rand(n, 3, generator=generator) * 2 - 1) * JITTER
    centre = torch.tensor([POSITIONS[s.position] for s in scenes]) + jitter[:, :2]
    radius = torch.tensor([SIZES[s.size] for s in scenes]) + jitter[:, 2] / 2
    coords = (torch.arange(fine, device=device, dtype=torch.float32) + 0.5) / fine
    ys, xs = coords[:, None].expand(fine, fine), coords[None, :].expand(fine, fine)
    background = torch.tensor([COLOURS[s.background] for s in scenes], dtype=torch.float32, device=device)
    image = background[:, :, None, None].expand(n, 3, fine, fine).clone()
    if style == "dusk":
        image *= 1 - (1 - DUSK_FLOOR) * ys
    for shape in SHAPES:
        index = [i for i, s in enumerate(scenes) if s.shape == shape]
        if not index:
            continue
        c = centre[index].to(device)
        r = radius[index].to(device)[:, None, None]
        x, y = (xs - c[:, 0, None, None]) / r, (ys - c[:, 1, None, None]) / r
        colour = torch.tensor([COLOURS[scenes[i].colour] for i in index], dtype=torch.float32, device=device)
        if outline:
            grow = 1 + OUTLINE_WIDTH / r
            ring = _inside(shape, x / grow, y / grow)
            image[index] = torch.where(ring[:, None], torch.tensor(OUTLINE_RGB, device=device,
                                                                   dtype=torch.float32)[None, :, None, None],
                                       image[index])
        body = _inside(shape, x, y)
        image[index] = torch.where(body[:, None], colour[:, :, None, None], image[index])
    image = torch.nn.functional.avg_pool2d(image, supersample)
    return image / 127.5 - 1


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    array = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in array]


@dataclass(frozen=True)
class Reading:
    """What a picture shows, as measured: ``colour`` / ``position`` are None when no object stands out."""

    background: str
    colour: str | None
    position: str | None
    object_fraction: float  # of the picture's pixels
    outline_fraction: float  # near-black pixels, of the picture's
    dusk: float  # how much darker the background's bottom rows are than its top rows (0: not at all)

    def matches(self, scene: Scene) -> bool:
        return (self.background, self.colour, self.position) == (scene.background, scene.colour, scene.position)


_NAMES = [*COLOURS, "outline"]
_PALETTE = np.array([*COLOURS.values(), OUTLINE_RGB], dtype=np.float32)
_OUTLINE = len(_NAMES) - 1
STANDS_OUT = 60.0  # RGB distance from its row's background from which a pixel belongs to the object


def _classes(rgb: np.ndarray) -> np.ndarray:
    """Each pixel's nearest palette colour, as an index into _NAMES."""
    return ((rgb[..., None, :] - _PALETTE) ** 2).sum(-1).argmin(-1)


def read_picture(image: Image.Image) -> Reading:
    """Measure a picture. Each row's background is its median colour (the object never covers half a row), so a
    background that darkens downwards is still background; the object is what stands out from it, outline pixels
    aside, if that is at least 1 % of the picture; its place is the named position nearest its centroid."""
    rgb = np.asarray(image.convert("RGB"), dtype=np.float32)
    h, w, _ = rgb.shape
    row_background = np.median(rgb, axis=1)  # (h, 3)
    classes = _classes(rgb)
    stands_out = np.sqrt(((rgb - row_background[:, None, :]) ** 2).sum(-1)) > STANDS_OUT
    candidates = Counter(classes[stands_out & (classes != _OUTLINE)].tolist())
    colour, position, fraction = None, None, 0.0
    if candidates:
        best, count = candidates.most_common(1)[0]
        fraction = count / (h * w)
        if fraction >= 0.01:
            colour = _NAMES[best]
            ys, xs = np.nonzero(stands_out & (classes == best))
            cx, cy = (xs.mean() + 0.5) / w, (ys.mean() + 0.5) / h
            position = min(POSITIONS, key=lambda p: (POSITIONS[p][0] - cx) ** 2 + (POSITIONS[p][1] - cy) ** 2)
    quarter = max(h // 4, 1)
    top, bottom = row_background[:quarter].mean(0), row_background[-quarter:].mean(0)
    background = _NAMES[int(_classes(row_background[: max(h // 8, 1)].mean(0)))]
    dusk = 1 - float(bottom.sum()) / max(float(top.sum()), 1e-6)
    return Reading(background, colour, position, fraction, float((classes == _OUTLINE).mean()), dusk)
