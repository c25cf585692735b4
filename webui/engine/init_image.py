"""img2img's init images brought to the size asked for, with A1111's four resize modes, ready for the VAE."""
from __future__ import annotations

from PIL import Image, ImageOps

RESIZE_MODES = ("Just resize", "Crop and resize", "Resize and fill", "Just resize (latent upscale)")
LATENT_UPSCALE = 3  # the image is encoded at its own size and its latents are resized (bilinear), as A1111 does
BACKGROUND = "#ffffff"  # what shows through a transparent init image (A1111's img2img_background_color default)
MAX_DECODED_SIDE_FACTOR = 4  # an init image may be this many times the largest side a generation may have


def prepare(image: Image.Image, mode: int, width: int, height: int, factor: int) -> Image.Image:
    """An RGB image of ``width`` x ``height`` (latent upscale: of its own size, down to a multiple of the VAE's
    ``factor``), turned as its EXIF says, transparency flattened onto white."""
    image = flatten(image)
    if mode == LATENT_UPSCALE:
        width, height = (max(side // factor * factor, factor) for side in image.size)
        return image if image.size == (width, height) else _resize(image, width, height)
    return resize(image, mode, width, height)


def flatten(image: Image.Image) -> Image.Image:
    """RGB, turned as its EXIF says, transparency flattened onto white (A1111's img2img background colour)."""
    image = ImageOps.exif_transpose(image)
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        flat = Image.new("RGBA", rgba.size, BACKGROUND)
        image = Image.alpha_composite(flat, rgba)
    return image.convert("RGB")


def resize(image: Image.Image, mode: int, width: int, height: int) -> Image.Image:
    """A1111's ``resize_image``: 0 stretches to the size; 1 scales to cover it and crops the centre; 2 scales to fit
    inside it and fills the bands left over with the image's edges stretched."""
    if mode == 0:
        return _resize(image, width, height)
    ratio, source_ratio = width / height, image.width / image.height
    covers = ratio > source_ratio if mode == 1 else ratio < source_ratio  # scaled to the target's width
    scaled_w = width if covers else image.width * height // image.height
    scaled_h = image.height * width // image.width if covers else height
    scaled = _resize(image, scaled_w, scaled_h)
    canvas = Image.new(image.mode, (width, height))
    canvas.paste(scaled, box=(width // 2 - scaled_w // 2, height // 2 - scaled_h // 2))
    if mode == 2:
        _fill(canvas, scaled, ratio, source_ratio)
    return canvas


def _fill(canvas: Image.Image, scaled: Image.Image, ratio: float, source_ratio: float) -> None:
    """Resize and fill: the bands above and below (or left and right of) the image get its first and last row
    (column) stretched across them."""
    width, height = canvas.size
    if ratio < source_ratio:
        band = height // 2 - scaled.height // 2
        if band > 0:
            canvas.paste(scaled.resize((width, band), box=(0, 0, width, 0)), box=(0, 0))
            canvas.paste(scaled.resize((width, band), box=(0, scaled.height, width, scaled.height)),
                         box=(0, band + scaled.height))
    elif ratio > source_ratio:
        band = width // 2 - scaled.width // 2
        if band > 0:
            canvas.paste(scaled.resize((band, height), box=(0, 0, 0, height)), box=(0, 0))
            canvas.paste(scaled.resize((band, height), box=(scaled.width, 0, scaled.width, height)),
                         box=(band + scaled.width, 0))


def _resize(image: Image.Image, width: int, height: int) -> Image.Image:
    return image.resize((width, height), resample=Image.Resampling.LANCZOS)
