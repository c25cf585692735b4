"""The Extras tab's job, as A1111 does it: each image upscaled by a factor or to a size (cropped to fit where asked),
by one upscaler or two blended (the second's visibility), with a "Postprocess ..." line saying what was done.

As in A1111, an upscaler reaches the size in up to three passes of its own scale, then Lanczos makes the exact size:
the width and height times the factor, rounded down to a multiple of 8.
"""
from __future__ import annotations

import io
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image
from PIL.PngImagePlugin import PngInfo

from webui.engine.infotext import build_infotext, parse_infotext
from webui.engine.outputs import save_image
from webui.engine.upscale.found import LANCZOS, NEAREST, NONE, UpscalerInfo, find_upscaler
from webui.engine.upscale.model import UpscaleSetup, load_upscaler, model_on_device
from webui.errors import UserError

PASSES = 3  # an upscaler is applied at most this many times to reach the size (A1111's)
SIZE_MULTIPLE = 8
RESIZE_BY, RESIZE_TO = 0, 1  # A1111's resize_mode
MAX_FACTOR = 8.0  # A1111's largest "Scale by"
POSTPROCESSING_KEY = "postprocessing"  # the PNG text chunk A1111 gives an Extras image's line
ImageStep = Callable[[Image.Image], Image.Image]
BUILTIN_RESAMPLING = {LANCZOS: Image.Resampling.LANCZOS, NEAREST: Image.Resampling.NEAREST}


@dataclass
class ExtrasRequest:
    """An Extras job: the images and A1111's upscale fields (their names as in its API)."""

    images: list[Image.Image]
    resize_mode: int = RESIZE_BY
    upscaling_resize: float = 2.0
    upscaling_resize_w: int = 512
    upscaling_resize_h: int = 512
    upscaling_crop: bool = True
    upscaler_1: str = NONE
    upscaler_2: str = NONE
    extras_upscaler_2_visibility: float = 0.0
    save: bool = False  # the UI saves to outdir_extras_samples (as A1111's tab); the API does not (as A1111's)

    def __post_init__(self) -> None:
        self.images = [image if image.mode == "RGB" else image.convert("RGB") for image in self.images]

    def scale_for(self, image: Image.Image) -> float:
        """The factor for one image: the one asked, or the one that covers the size asked."""
        if self.resize_mode == RESIZE_TO:
            return max(self.upscaling_resize_w / image.width, self.upscaling_resize_h / image.height)
        return self.upscaling_resize

    def output_size(self, image: Image.Image) -> tuple[int, int]:
        if self.resize_mode == RESIZE_TO and self.upscaling_crop:
            return self.upscaling_resize_w, self.upscaling_resize_h
        return target_size(image, self.scale_for(image))

    @property
    def blends(self) -> bool:
        return self.upscaler_2 != NONE and self.extras_upscaler_2_visibility > 0

    def check(self, max_side: int) -> None:
        """Values no upscaler can take (a mode, factor, size or visibility out of range) and, when upscaler 1 is one,
        an output side below 8 pixels or beyond the largest allowed (the option max_image_side): each a UserError
        naming its field."""
        if self.resize_mode not in (RESIZE_BY, RESIZE_TO):
            raise UserError(f"must be 0 (scale by) or 1 (scale to), got {self.resize_mode}", field="resize_mode")
        if not 0 < self.upscaling_resize <= MAX_FACTOR:
            raise UserError(f"must be above 0 and at most {MAX_FACTOR:g}, got {self.upscaling_resize}",
                            field="upscaling_resize")
        for name in ("upscaling_resize_w", "upscaling_resize_h"):
            if getattr(self, name) < 1:
                raise UserError(f"must be at least 1, got {getattr(self, name)}", field=name)
        if not 0 <= self.extras_upscaler_2_visibility <= 1:
            raise UserError(f"must be between 0 and 1, got {self.extras_upscaler_2_visibility}",
                            field="extras_upscaler_2_visibility")
        if self.upscaler_1 == NONE:
            return
        for number, image in enumerate(self.images, start=1):
            sizes = (target_size(image, self.scale_for(image)), self.output_size(image))
            for side, name in ((0, "upscaling_resize_w"), (1, "upscaling_resize_h")):
                if all(SIZE_MULTIPLE <= size[side] <= max_side for size in sizes):
                    continue
                made = "x".join(str(n) for n in sizes[0])
                raise UserError(f"would make image {number} ({image.width}x{image.height}) {made}; sides must be "
                                f"from {SIZE_MULTIPLE} to {max_side} pixels (max_image_side in Settings)",
                                field=name if self.resize_mode == RESIZE_TO else "upscaling_resize")

    def infotext(self) -> str:
        """A1111's "Postprocess ..." line (the same for every image); empty when upscaler 1 is None (nothing is
        done)."""
        if self.upscaler_1 == NONE:
            return ""
        params: dict[str, object] = {}
        if self.resize_mode == RESIZE_TO:
            params["Postprocess upscale to"] = f"{self.upscaling_resize_w}x{self.upscaling_resize_h}"
            if self.upscaling_crop:
                params["Postprocess crop to"] = f"{self.upscaling_resize_w}x{self.upscaling_resize_h}"
        else:
            params["Postprocess upscale by"] = self.upscaling_resize
        params["Postprocess upscaler"] = self.upscaler_1
        if self.blends:
            params["Postprocess upscaler 2"] = self.upscaler_2
        return build_infotext("", "", params)


@dataclass
class ExtrasResult:
    images: list[Image.Image]
    infotexts: list[str]  # each image's "Postprocess ..." line
    pngs: list[bytes]  # each image as PNG, with its source's parameters and its line (what the API sends)
    paths: list[Path] = field(default_factory=list)  # where they were saved, when they were
    seconds: float = 0.0


def target_size(image: Image.Image, scale: float) -> tuple[int, int]:
    """A1111's size for a factor: each side times it, rounded down to a multiple of 8."""
    return (int(image.width * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE,
            int(image.height * scale) // SIZE_MULTIPLE * SIZE_MULTIPLE)


def upscale(image: Image.Image, scale: float, step: ImageStep, size: tuple[int, int]) -> Image.Image:
    """``step`` (one pass of an upscaler) until the image covers ``size`` (at most three passes; at least one for a
    factor of 1, a restoration model's), then Lanczos to exactly ``size``."""
    for number in range(PASSES):
        if image.width >= size[0] and image.height >= size[1] and (number > 0 or scale != 1):
            break
        before = image.size
        image = step(image)
        if image.size == before:
            break
    return image if image.size == size else image.resize(size, Image.Resampling.LANCZOS)


def crop_centre(image: Image.Image, width: int, height: int) -> Image.Image:
    """The middle ``width`` x ``height`` of the image (black where it is smaller), as A1111's "Crop to fit"."""
    left, top = image.width // 2 - width // 2, image.height // 2 - height // 2
    return image.crop((left, top, left + width, top + height))


def builtin_step(name: str, scale: float) -> ImageStep:
    """One pass of a built-in upscaler: Lanczos and Nearest resize by the factor (None is never run)."""
    resample = BUILTIN_RESAMPLING[name]

    def step(image: Image.Image) -> Image.Image:
        return image.resize((int(image.width * scale), int(image.height * scale)), resample)

    return step


@contextmanager
def upscaler_steps(info: UpscalerInfo, field_name: str, setup: UpscaleSetup, largest: tuple[int, int],
                   own_job: bool = True) -> Iterator[Callable[[float], ImageStep]]:
    """One pass of the upscaler for a factor: a built-in resize, or the model file loaded and placed for the block
    (``own_job``: as ``model.model_on_device``)."""
    if info.path is None:
        yield lambda scale: builtin_step(info.name, scale)
        return
    with model_on_device(load_upscaler(info.path, field_name), setup, largest, own_job) as run:
        yield lambda scale: run


def upscale_all(request: ExtrasRequest, info: UpscalerInfo, field_name: str, setup: UpscaleSetup) -> list[Image.Image]:
    """Every image of the request through one upscaler, cropped as asked; its model loaded once for all."""
    largest = (max(i.width for i in request.images), max(i.height for i in request.images))
    done = []
    with upscaler_steps(info, field_name, setup, largest) as steps:
        for image in request.images:
            scale = request.scale_for(image)
            result = upscale(image, scale, steps(scale), target_size(image, scale))
            if request.resize_mode == RESIZE_TO and request.upscaling_crop:
                result = crop_centre(result, request.upscaling_resize_w, request.upscaling_resize_h)
            done.append(result)
    return done


def extras_png(image: Image.Image, parameters: str | None, line: str) -> bytes:
    """The image as PNG with its source's generation parameters kept and the Extras line beside them, as A1111."""
    info = PngInfo()
    if parameters:
        info.add_text("parameters", parameters)
    if line:
        info.add_text(POSTPROCESSING_KEY, line)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info)
    return buffer.getvalue()


def run_extras(request: ExtrasRequest, upscalers: list[UpscalerInfo], setup: UpscaleSetup, max_side: int,
               parameters: list[str | None]) -> ExtrasResult:
    """The job: check, look the upscalers up in the list found on disk, upscale, blend. ``parameters``: each
    source image's generation parameters (kept in its PNG)."""
    start = time.perf_counter()
    first = find_upscaler(upscalers, request.upscaler_1, "upscaler_1")
    second = find_upscaler(upscalers, request.upscaler_2, "upscaler_2")
    request.check(max_side)
    images = request.images
    if first.name != NONE:
        images = upscale_all(request, first, "upscaler_1", setup)
        if request.blends:
            others = upscale_all(request, second, "upscaler_2", setup)
            images = [Image.blend(a, b, request.extras_upscaler_2_visibility) for a, b in zip(images, others)]
    lines = [request.infotext()] * len(images)
    pngs = [extras_png(image, given, line) for image, given, line in zip(images, parameters, lines)]
    return ExtrasResult(images, lines, pngs, seconds=time.perf_counter() - start)


def save_extras(result: ExtrasResult, outdir: Path, parameters: list[str | None]) -> list[Path]:
    """Each image saved as the day's next numbered PNG in ``outdir``, named after its source's seed and prompt where
    its parameters give them."""
    paths = []
    for image, png, given in zip(result.images, result.pngs, parameters):
        source = parse_infotext(given) if given else {}
        seed = source.get("Seed", "")
        paths.append(save_image(image, outdir, int(seed) if seed.isdigit() else 0, source.get("Prompt", ""), "",
                                png=png))
    return paths
