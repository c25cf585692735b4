"""Outpainting (A1111's img2img script "Poor man's outpainting"): the init image on a larger canvas, extended by some
pixels in the chosen directions to a multiple of 64, and the new border inpainted.

A1111 repaints the border tile by tile, each tile the request's width and height. Here the canvas is inpainted in one
pass at its own size ("whole picture"): every part of the new border sees the whole image, and the memory manager
plans the pass like any other size. As A1111's script, it makes one image (batch size and count are set to 1), the
mask's blur is twice the script's, and the kept picture reaches into the blur by that much.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from PIL import Image, ImageDraw

from webui.engine.inpaint import FILL, FILLS
from webui.errors import UserError

if TYPE_CHECKING:
    from webui.engine.request import GenerationRequest

SCRIPT_TITLE = "Poor man's outpainting"
DIRECTIONS = ("left", "right", "up", "down")
CANVAS_MULTIPLE = 64  # the canvas's sides, as A1111's script rounds them
MAX_BLUR = 64  # the script's slider (the mask's blur is twice this)
FIELD = "script_args"


@dataclass(frozen=True)
class Outpaint:
    """The script's arguments, in A1111's order (``script_args``); a request carries them as its ``outpaint_*``
    fields."""

    pixels: int = 128
    mask_blur: int = 4
    fill: int = FILL  # "Masked content", an index into inpaint.FILLS
    directions: tuple[str, ...] = DIRECTIONS

    @classmethod
    def from_args(cls, args: Sequence[Any]) -> Outpaint:
        """From ``script_args`` (missing ones at the script's defaults), checked; a wrong one is named."""
        if not isinstance(args, (list, tuple)) or len(args) > 4:
            raise UserError(f"{SCRIPT_TITLE} takes [pixels, mask_blur, inpainting_fill, direction], got {args!r}",
                            field=FIELD)
        given = dict(zip(("pixels", "mask_blur", "fill", "directions"), args))
        if isinstance(given.get("fill"), str) and given["fill"] in FILLS:
            given["fill"] = FILLS.index(given["fill"])
        if "directions" in given:
            given["directions"] = tuple(given["directions"]) if isinstance(given["directions"], list) else None
        return cls(**given).checked()

    def checked(self) -> Outpaint:
        for name, low, high in (("pixels", 1, 4096), ("mask_blur", 0, MAX_BLUR), ("fill", 0, len(FILLS) - 1)):
            value = getattr(self, name)
            if isinstance(value, float) and value.is_integer():
                value = int(value)
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise UserError(f"{SCRIPT_TITLE}: {name} must be a whole number from {low} to {high}, got "
                                f"{getattr(self, name)!r}", field=FIELD)
            object.__setattr__(self, name, value)
        if not self.directions or any(d not in DIRECTIONS for d in self.directions):
            raise UserError(f"{SCRIPT_TITLE}: direction must be a list of one or more of {', '.join(DIRECTIONS)}, "
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

    def canvas(self, image: Image.Image) -> tuple[Image.Image, Image.Image]:
        """The picture on its larger canvas (black where new), and the mask: white where painted, which is the new
        border and, on the extended sides, twice the blur into the picture."""
        left, top, right, bottom = self.margins(image.width, image.height)
        size = (image.width + left + right, image.height + top + bottom)
        canvas = Image.new("RGB", size)
        canvas.paste(image.convert("RGB"), (left, top))
        mask = Image.new("L", size, 255)
        reach = 2 * self.mask_blur
        kept = (left + (reach if left else 0), top + (reach if top else 0),
                size[0] - right - (reach if right else 0), size[1] - bottom - (reach if bottom else 0))
        if kept[0] < kept[2] and kept[1] < kept[3]:
            ImageDraw.Draw(mask).rectangle((kept[0], kept[1], kept[2] - 1, kept[3] - 1), fill=0)
        return canvas, mask

    def applied(self, request: GenerationRequest, largest: int) -> GenerationRequest:
        """``request`` as the inpainting of the first init image's canvas, at the canvas's size."""
        if not request.init_images:
            raise UserError(f"{SCRIPT_TITLE} extends an init image: send one", field="init_images")
        canvas, mask = self.canvas(request.init_images[0])
        if max(canvas.size) > largest:
            raise UserError(f"{SCRIPT_TITLE}: the canvas would be {canvas.width}x{canvas.height}, above the largest "
                            f"side ({largest} pixels): expand by fewer pixels", field=FIELD)
        return replace(request, init_images=[canvas], mask=mask, width=canvas.width, height=canvas.height,
                       resize_mode=0, mask_blur=2 * self.mask_blur, inpainting_fill=self.fill, inpaint_full_res=False,
                       inpainting_mask_invert=0, batch_size=1, n_iter=1, outpaint_directions=None)

    def fields(self) -> dict[str, Any]:
        """The request's fields that ask for this outpainting."""
        return {"outpaint_directions": list(self.directions), "outpaint_pixels": self.pixels,
                "outpaint_mask_blur": self.mask_blur, "outpaint_fill": self.fill}
