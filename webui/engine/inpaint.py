"""Inpainting's pictures, as A1111 makes them: the mask read, inverted and blurred; the part of the picture the
generation sees (the whole picture, or only the masked part with padding, cut out at the request's aspect and
scaled to its size); the masked content filled; and each finished image put back into the original, whose kept part
is laid over it through the blurred mask. The latents' side is ``sampling.steps.InitLatents``."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from PIL import Image, ImageFilter
from scipy.ndimage import gaussian_filter1d

from webui.engine import init_image
from webui.engine.init_image import resize

if TYPE_CHECKING:
    from webui.engine.request import GenerationRequest

FILLS = ("fill", "original", "latent noise", "latent nothing")  # A1111's "Masked content", by inpainting_fill
FILL, ORIGINAL, LATENT_NOISE, LATENT_NOTHING = range(len(FILLS))
INPAINT_AREAS = ("Whole picture", "Only masked")  # by inpaint_full_res
MASK_MODES = ("Inpaint masked", "Inpaint not masked")  # by inpainting_mask_invert
BLUR_REACH = 2.5  # the blur's kernel reaches 2.5 sigmas each way, as OpenCV's that A1111 uses
# A1111's fill: the kept part blurred ever less, each laid over the last (radius, times), so that the masked part
# takes the colours around it
FILL_PASSES = ((256, 1), (64, 1), (16, 2), (4, 4), (2, 2), (0, 1))


@dataclass(frozen=True)
class InpaintOptions:
    """How a mask is used (the request's fields of the same names)."""

    blur_x: int = 4
    blur_y: int = 4
    fill: int = FILL
    only_masked: bool = True
    padding: int = 0
    invert: bool = False


@dataclass(frozen=True)
class InpaintImages:
    """A request's inpainting, prepared: what the generation sees and how its images go back."""

    images: list[Image.Image]  # what the VAE encodes, each at the request's size, its masked content filled
    mask: Image.Image  # "L" at the request's size: 255 where the picture is repainted (blurred)
    overlays: list[Image.Image]  # "RGBA" at the result's size: each original where it is kept, laid over the result
    paste_to: tuple[int, int, int, int] | None  # (x, y, width, height) the generation fills (only masked)
    notices: tuple[str, ...] = ()
    latent: Image.Image | None = None  # A1111's latent_mask: used as it is for the latents instead of ``mask``

    def latent_mask(self, height: int, width: int, rounded: bool = True) -> torch.Tensor:
        """(1, 1, height, width) float32: 1 where the latents are repainted, 0 where kept; rounded (A1111's
        mask_round) unless asked to keep the blur's shades. A request's latent mask is taken as it is (not blurred,
        inverted nor cut out), resized to the latents, as A1111 takes it."""
        source = self.mask if self.latent is None else self.latent.convert("L")
        small = np.asarray(source.resize((width, height), Image.Resampling.BICUBIC), dtype=np.float32) / 255
        return torch.from_numpy(np.round(small) if rounded else small)[None, None]

    def pixel_mask(self) -> torch.Tensor:
        """(1, 1, H, W) float32 at the request's size, 1 where repainted (rounded): what an inpainting model is told
        is masked."""
        return torch.from_numpy(np.round(np.asarray(self.mask, dtype=np.float32) / 255))[None, None]

    def finish(self, image: Image.Image, index: int, shown: Image.Image | None = None) -> Image.Image:
        """A finished image put back: scaled into its place in the original (only masked), the original's kept part
        over it: where the blurred mask keeps it, or (soft inpainting) where ``shown``, at the request's size, is
        not white."""
        overlay = self.overlays[min(index, len(self.overlays) - 1)]
        if shown is not None:
            overlay = _kept(overlay, self._uncropped(shown, overlay.size))
        if self.paste_to is not None:
            x, y, width, height = self.paste_to
            canvas = Image.new("RGBA", overlay.size)
            canvas.paste(resize(image, 1, width, height), (x, y))
            image = canvas
        image = image.convert("RGBA")
        image.alpha_composite(overlay)
        return image.convert("RGB")

    def _uncropped(self, mask: Image.Image, size: tuple[int, int]) -> Image.Image:
        """A mask of what was generated (the request's size) at the result's ``size``: black where nothing was."""
        if self.paste_to is None:
            return mask
        x, y, width, height = self.paste_to
        whole = Image.new("L", size, 0)
        whole.paste(mask.resize((width, height), Image.Resampling.LANCZOS), (x, y))
        return whole


def init_pictures(request: GenerationRequest, factor: int) -> tuple[list[Image.Image] | None, InpaintImages | None]:
    """img2img's pictures as the VAE encodes them (``factor``: the VAE's scale), and with a mask its inpainting;
    txt2img's none."""
    if request.init_images is None:
        return None, None
    if request.mask is None:
        return [init_image.prepare(image, request.resize_mode, request.width, request.height, factor)
                for image in request.init_images], None
    inpainting = prepare([init_image.flatten(image) for image in request.init_images], request.mask,
                         request.inpaint_options(), request.resize_mode, request.width, request.height)
    if request.latent_mask is not None:
        inpainting = dataclasses.replace(inpainting, latent=request.latent_mask)
    return inpainting.images, inpainting


def prepare(images: list[Image.Image], mask: Image.Image, options: InpaintOptions, resize_mode: int, width: int,
            height: int) -> InpaintImages:
    """``images`` (flattened RGB, each the mask's size) and the mask as the generation and the overlay use them.
    "Only masked" with nothing masked inpaints the whole picture (as A1111), and says so."""
    mask = read_mask(mask, options)
    notices: tuple[str, ...] = ()
    region = masked_region(mask, options.padding) if options.only_masked else None
    if options.only_masked and region is None:
        notices = ("Inpaint area \"Only masked\": the mask is empty, so the whole picture was used.",)
    if region is not None:
        region = fit_aspect(region, width, height, *mask.size)
        overlay_mask = mask
        seen = resize(mask.crop(region), 2, width, height)
        pictures = [resize(image.crop(region), 2, width, height) for image in images]
        paste_to = (region[0], region[1], region[2] - region[0], region[3] - region[1])
    else:
        seen = resize(mask, resize_mode, width, height)
        # the overlay keeps only what lies well outside the blurred edge (A1111 doubles the mask)
        overlay_mask = Image.fromarray(np.clip(np.asarray(seen, dtype=np.float32) * 2, 0, 255).astype(np.uint8))
        images = [resize(image, resize_mode, width, height) for image in images]
        pictures, paste_to = images, None
    overlays = [_kept(image, overlay_mask) for image in images]
    if options.fill != ORIGINAL:
        pictures = [fill(picture, seen) for picture in pictures]
    return InpaintImages(pictures, seen, overlays, paste_to, notices)


def read_mask(mask: Image.Image, options: InpaintOptions) -> Image.Image:
    """The mask as "L", white where repainted: an RGBA mask with transparency is its opaque part (a drawn layer);
    inverted for "Inpaint not masked"; blurred across and down by its own amounts."""
    if mask.mode == "RGBA" and mask.getextrema()[3][0] < 255:
        mask = mask.getchannel("A").point(lambda alpha: 255 if alpha > 128 else 0)
    values = np.asarray(mask.convert("L"), dtype=np.float32)
    if options.invert:
        values = 255 - values
    for axis, sigma in ((1, options.blur_x), (0, options.blur_y)):
        if sigma > 0:
            values = gaussian_filter1d(values, sigma, axis=axis, mode="mirror",
                                       truncate=int(BLUR_REACH * sigma + 0.5) / sigma)
    return Image.fromarray(np.clip(np.round(values), 0, 255).astype(np.uint8))


def masked_region(mask: Image.Image, padding: int) -> tuple[int, int, int, int] | None:
    """(left, top, right, bottom) around every masked pixel, ``padding`` wider each way within the picture; None
    where nothing is masked."""
    box = mask.getbbox()
    if box is None:
        return None
    left, top, right, bottom = box
    return (max(left - padding, 0), max(top - padding, 0), min(right + padding, mask.width),
            min(bottom + padding, mask.height))


def fit_aspect(region: tuple[int, int, int, int], width: int, height: int, image_width: int,
               image_height: int) -> tuple[int, int, int, int]:
    """The region grown about its centre to ``width``:``height`` (so the cut-out scales to the request's size
    undistorted), moved back inside the picture where it sticks out, and cut at its edges where it cannot fit."""
    left, top, right, bottom = region
    if (right - left) / (bottom - top) > width / height:
        top, bottom = _grown(top, bottom, int((right - left) * height / width - (bottom - top)), image_height)
    else:
        left, right = _grown(left, right, int((bottom - top) * width / height - (right - left)), image_width)
    return left, top, right, bottom


def _grown(low: int, high: int, extra: int, limit: int) -> tuple[int, int]:
    low, high = low - extra // 2, high + extra - extra // 2
    if high > limit:
        low, high = low - (high - limit), limit
    if low < 0:
        low, high = 0, min(high - low, limit)
    return low, high


def fill(image: Image.Image, mask: Image.Image) -> Image.Image:
    """"fill": the masked part painted with the colours around it, the kept part blurred less and less over it."""
    kept = _kept(image, mask)
    premultiplied = kept.convert("RGBa")
    out = Image.new("RGBA", image.size)
    for radius, times in FILL_PASSES:
        layer = premultiplied.filter(ImageFilter.GaussianBlur(radius)).convert("RGBA")
        for _ in range(times):
            out.alpha_composite(layer)
    return out.convert("RGB")


def _kept(image: Image.Image, mask: Image.Image) -> Image.Image:
    """``image`` as RGBA, opaque where ``mask`` keeps it (black), transparent where it is repainted (white)."""
    kept = image.convert("RGBA")
    kept.putalpha(Image.eval(mask.convert("L"), lambda value: 255 - value))
    return kept
