"""Outpainting, A1111's two img2img scripts as one mode of the img2img path: the init image on a larger canvas,
extended by some pixels in the chosen directions to a multiple of 64, and the new border inpainted.

- "Poor man's outpainting": the new border black, inpainted with the chosen masked content; the mask's blur twice
  the script's, reaching that far into the picture.
- "Outpainting mk2": the new border filled with noise shaped like the picture (its spectrum, its colours:
  ``matched_noise``) and inpainted from that ("original"); the mask's blur four times the script's, across only
  where the sides extended are left or right, down only where they are up or down.

A1111 repaints the border tile by tile (mk2: one side after another), each at the request's size. Here the canvas is
inpainted in one pass at its own size: every part of the border sees the whole picture, and the memory manager plans
the pass like any other size. As A1111's scripts, the latents are kept by a latent mask that keeps a little more of
the picture than the blurred mask; poor man's makes one image, mk2 a batch.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image, ImageDraw

from webui.engine.inpaint import FILL, FILLS, ORIGINAL
from webui.errors import UserError

if TYPE_CHECKING:
    from webui.engine.request import GenerationRequest

SCRIPT_TITLE = "Poor man's outpainting"
MK2_TITLE = "Outpainting mk2"
METHODS = (SCRIPT_TITLE, MK2_TITLE)
DIRECTIONS = ("left", "right", "up", "down")
CANVAS_MULTIPLE = 64  # the canvas's sides, as A1111's scripts round them
MAX_BLUR = 64  # poor man's slider (the mask's blur is twice this)
MAX_MK2_BLUR = 32  # mk2's (four times this stays within a request's largest mask blur)
FIELD = "script_args"


@dataclass(frozen=True)
class Outpaint:
    """The scripts' arguments; a request carries them as its ``outpaint_*`` fields."""

    pixels: int = 128
    mask_blur: int = 4
    fill: int = FILL  # poor man's "Masked content", an index into inpaint.FILLS
    directions: tuple[str, ...] = DIRECTIONS
    method: str = SCRIPT_TITLE
    fall_off: float = 1.0  # mk2: the matched noise's fall-off exponent (lower: more detail)
    colour_variation: float = 0.05  # mk2: how much of the noise's colour is its own (else grey)

    @classmethod
    def from_args(cls, args: Sequence[Any], method: str = SCRIPT_TITLE) -> Outpaint:
        """From a script's ``script_args`` in A1111's order (missing ones at its defaults), checked; a wrong one is
        named. Poor man's: [pixels, mask_blur, inpainting_fill, direction]; mk2: [info (not read), pixels,
        mask_blur, direction, noise_q, color_variation]."""
        names = (("pixels", "mask_blur", "fill", "directions") if method == SCRIPT_TITLE else
                 ("info", "pixels", "mask_blur", "directions", "fall_off", "colour_variation"))
        if not isinstance(args, (list, tuple)) or len(args) > len(names):
            raise UserError(f"{method} takes [{', '.join(names)}], got {args!r}", field=FIELD)
        given = dict(zip(names, args))
        given.pop("info", None)
        if isinstance(given.get("fill"), str) and given["fill"] in FILLS:
            given["fill"] = FILLS.index(given["fill"])
        if "directions" in given:
            given["directions"] = tuple(given["directions"]) if isinstance(given["directions"], list) else None
        defaults = {} if method == SCRIPT_TITLE else {"mask_blur": 8}
        return cls(**(defaults | given), method=method).checked()

    @property
    def mk2(self) -> bool:
        return self.method == MK2_TITLE

    def checked(self) -> Outpaint:
        whole = (("pixels", 1, 4096), ("mask_blur", 0, MAX_MK2_BLUR if self.mk2 else MAX_BLUR),
                 ("fill", 0, len(FILLS) - 1))
        for name, low, high in whole:
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UserError(f"{self.method}: {name} must be a whole number from {low} to {high}, got "
                                f"{getattr(self, name)!r}", field=FIELD)
            object.__setattr__(self, name, value)
        for name, high in (("fall_off", 4.0), ("colour_variation", 1.0)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= high:
                raise UserError(f"{self.method}: {name} must be a number from 0 to {high}, got {value!r}", field=FIELD)
        if self.method not in METHODS:
            raise UserError(f"no outpainting {self.method!r}; there are {', '.join(METHODS)}", field=FIELD)
        if not self.directions or any(d not in DIRECTIONS for d in self.directions):
            raise UserError(f"{self.method}: direction must be a list of one or more of {', '.join(DIRECTIONS)}, "
                            f"got {self.directions!r}", field=FIELD)
        return self

    def margins(self, width: int, height: int) -> tuple[int, int, int, int]:
        """(left, top, right, bottom) pixels added around a ``width`` x ``height`` picture: ``pixels`` on each chosen
        side, grown so that the canvas's sides are multiples of 64, the growth shared by the two sides of an axis in
        proportion. An axis with no chosen side that is not a multiple of 64 grows evenly on both (A1111's leaves a
        black band there; here it is painted like the rest)."""
        def axis(size: int, before: str, after: str) -> tuple[int, int]:
            wanted = [self.pixels if d in self.directions else 0 for d in (before, after)]
            added = math.ceil((size + sum(wanted)) / CANVAS_MULTIPLE) * CANVAS_MULTIPLE - size
            first = added * wanted[0] // sum(wanted) if any(wanted) else added // 2
            return first, added - first

        left, right = axis(width, "left", "right")
        top, bottom = axis(height, "up", "down")
        return left, top, right, bottom

    def canvas(self, image: Image.Image) -> tuple[Image.Image, Image.Image, Image.Image]:
        """The picture on its larger canvas, the mask (white where painted: the new border and, on the extended
        sides, some of the picture) and the latent mask (the same, reaching less far into the picture). The new
        border is black (poor man's) or matched noise (mk2), which fills all the mask paints."""
        left, top, right, bottom = self.margins(image.width, image.height)
        size = (image.width + left + right, image.height + top + bottom)
        canvas = Image.new("RGB", size)
        canvas.paste(image.convert("RGB"), (left, top))
        reach, latent_reach = (self.mask_blur, 2 * self.mask_blur) if self.mk2 else (2 * self.mask_blur,
                                                                                    self.mask_blur // 2)
        mask, latent_mask = (_border_mask(size, (left, top, right, bottom), r) for r in (reach, latent_reach))
        if self.mk2:
            painted = np.asarray(mask) > 0
            picture = np.asarray(canvas, dtype=np.float64) / 255
            noise = matched_noise(picture, painted, self.fall_off, self.colour_variation, np.random.default_rng(0))
            canvas = Image.fromarray(np.round(noise * 255).astype(np.uint8))
        return canvas, mask, latent_mask

    def applied(self, request: GenerationRequest, largest: int) -> GenerationRequest:
        """``request`` as the inpainting of the first init image's canvas, at the canvas's size."""
        if not request.init_images:
            raise UserError(f"{self.method} extends an init image: send one", field="init_images")
        canvas, mask, latent_mask = self.canvas(request.init_images[0])
        if max(canvas.size) > largest:
            raise UserError(f"{self.method}: the canvas would be {canvas.width}x{canvas.height}, above the largest "
                            f"side ({largest} pixels): expand by fewer pixels", field=FIELD)
        if self.mk2:
            across = any(d in self.directions for d in ("left", "right"))
            down = any(d in self.directions for d in ("up", "down"))
            blur = dict(mask_blur=None, mask_blur_x=4 * self.mask_blur if across else 0,
                        mask_blur_y=4 * self.mask_blur if down else 0, inpainting_fill=ORIGINAL)
        else:
            blur = dict(mask_blur=2 * self.mask_blur, inpainting_fill=self.fill, batch_size=1, n_iter=1)
        return replace(request, init_images=[canvas], mask=mask, latent_mask=latent_mask, width=canvas.width,
                       height=canvas.height, resize_mode=0, inpaint_full_res=False, inpainting_mask_invert=0,
                       outpaint_directions=None, **blur)

    def fields(self) -> dict[str, Any]:
        """The request's fields that ask for this outpainting."""
        return {"outpaint_directions": list(self.directions), "outpaint_pixels": self.pixels,
                "outpaint_mask_blur": self.mask_blur, "outpaint_fill": self.fill, "outpaint_method": self.method,
                "outpaint_noise_q": self.fall_off, "outpaint_color_variation": self.colour_variation}


def _border_mask(size: tuple[int, int], margins: tuple[int, int, int, int], reach: int) -> Image.Image:
    """White on the border the margins add and ``reach`` pixels into the picture on the sides that have one."""
    left, top, right, bottom = margins
    mask = Image.new("L", size, 255)
    kept = (left + (reach if left else 0), top + (reach if top else 0),
            size[0] - right - (reach if right else 0), size[1] - bottom - (reach if bottom else 0))
    if kept[0] < kept[2] and kept[1] < kept[3]:
        ImageDraw.Draw(mask).rectangle((kept[0], kept[1], kept[2] - 1, kept[3] - 1), fill=0)
    return mask


def matched_noise(picture: np.ndarray, painted: np.ndarray, fall_off: float, colour_variation: float,
                  rng: np.random.Generator) -> np.ndarray:
    """``picture`` (H, W, 3 in [0, 1]) with its ``painted`` part (H, W bool) replaced by noise shaped like the rest
    (mk2's start): smooth noise, mostly grey, whose spectrum takes the kept picture's magnitude (raised to
    ``fall_off``) and phase, and whose values then take the kept picture's colours, channel by channel, by rank."""
    kept = ~painted
    windowed = picture * kept[..., None]
    windowed = windowed / max(windowed.max(), 1e-6) + picture[kept].mean() * painted[..., None]
    spectrum = _spectrum(windowed)
    magnitude = np.abs(spectrum)
    phase = np.divide(spectrum, magnitude, out=np.ones_like(spectrum), where=magnitude > 0)
    noise = rng.random(picture.shape)
    noise = colour_variation * noise + (1 - colour_variation) * noise.mean(axis=2, keepdims=True)
    noise = np.real(_inverse(_spectrum(noise) * _low_pass(*picture.shape[:2])[..., None]))
    shaped = np.real(_inverse(np.abs(_spectrum(noise)) ** 2 * magnitude ** fall_off * phase))
    shaped = (shaped - shaped.min()) / max(shaped.max() - shaped.min(), 1e-12)
    if painted.any() and kept.any():
        for c in range(picture.shape[2]):
            shaped[..., c][painted] = _ranked_like(shaped[..., c][painted], picture[..., c][kept])
    return np.clip(np.where(painted[..., None], shaped, picture), 0, 1)


def _spectrum(data: np.ndarray) -> np.ndarray:
    """Each channel's 2-D Fourier transform, orthonormal, its zero frequency in the middle."""
    return np.fft.fftshift(np.fft.fft2(np.fft.ifftshift(data, axes=(0, 1)), axes=(0, 1), norm="ortho"), axes=(0, 1))


def _inverse(spectrum: np.ndarray) -> np.ndarray:
    return np.fft.fftshift(np.fft.ifft2(np.fft.ifftshift(spectrum, axes=(0, 1)), axes=(0, 1), norm="ortho"),
                           axes=(0, 1))


def _low_pass(height: int, width: int) -> np.ndarray:
    """A window falling off from the middle frequency as 1 / ((x² + 1)(y² + 1)), the shorter side spanning [-1, 1]."""
    side = min(height, width)
    y = (np.arange(height) / height * 2 - 1) * height / side
    x = (np.arange(width) / width * 2 - 1) * width / side
    return 1 / ((y[:, None] ** 2 + 1) * (x[None, :] ** 2 + 1))


def _ranked_like(values: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """``values`` replaced by the ``reference`` values of the same rank (histogram matching)."""
    order = np.argsort(values, kind="stable")
    quantiles = np.linspace(0, 1, len(values))
    matched = np.empty_like(values)
    matched[order] = np.quantile(reference, quantiles)
    return matched
