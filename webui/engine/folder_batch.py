"""img2img over a folder (A1111's img2img Batch tab): every image of an input folder through the one img2img path with
the form's request; a mask of the same name in a mask folder (or the only image there, for all) inpaints; where asked,
parameters from each input's PNG info (its prompt added to the form's); the images written to an output folder under
their input's name, or saved as any img2img image where no output folder is given.

The folders are the server's, typed in the UI: ``--hide-ui-dir-config`` turns the batch off (A1111's flag). A file
that is not an image, or whose generation is refused (a mask of another size), is skipped and named in the result's
notices; the others go on. An output file of the same name is never overwritten: a number is added.
"""
from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from webui.engine.infotext import read_png_infotext, request_fields
from webui.engine.init_image import MAX_DECODED_SIDE_FACTOR
from webui.engine.outputs import png_bytes
from webui.engine.progress import Progress
from webui.engine.request import GenerationRequest, GenerationResult, combined
from webui.engine.upscale.request import open_image
from webui.errors import UserError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
# A1111's "Parameters to take from png info" (its "Model hash" is not taken here: a batch keeps its model)
PNG_INFO_FIELDS = {"Prompt": ("prompt",), "Negative prompt": ("negative_prompt",), "Seed": ("seed",),
                   "CFG scale": ("cfg_scale",), "Sampler": ("sampler_name", "scheduler"), "Steps": ("steps",)}
DEFAULT_PNG_INFO_FIELDS = ("Prompt", "Negative prompt")


@dataclass(frozen=True)
class FolderBatch:
    """The Batch tab's fields (A1111's names in the API of its UI: img2img_batch_*)."""

    input_dir: str
    output_dir: str = ""  # empty: saved as any img2img image
    mask_dir: str = ""  # empty: no inpainting
    use_png_info: bool = False
    png_info_dir: str = ""  # empty: the input folder
    png_info_fields: tuple[str, ...] = DEFAULT_PNG_INFO_FIELDS


def run_folder_batch(img2img: Callable[[GenerationRequest], GenerationResult], progress: Progress,
                     base: GenerationRequest, batch: FolderBatch, max_side: int, folders_allowed: bool
                     ) -> GenerationResult:
    """Every image of the input folder through ``img2img`` with ``base``'s fields; one result holding them all."""
    if not folders_allowed:
        raise UserError("batch from a folder is off: the app was started with --hide-ui-dir-config",
                        field="img2img_batch_input_dir")
    inputs = _images_in(_folder(batch.input_dir, "img2img_batch_input_dir"))
    if not inputs:
        raise UserError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {batch.input_dir}", field="img2img_batch_input_dir")
    masks = _images_in(_folder(batch.mask_dir, "img2img_batch_inpaint_mask_dir")) if batch.mask_dir else []
    info_dir = _folder(batch.png_info_dir, "img2img_batch_png_info_dir") if batch.png_info_dir else None
    output = Path(batch.output_dir).expanduser() if batch.output_dir else None
    unknown = set(batch.png_info_fields) - set(PNG_INFO_FIELDS)
    if unknown:
        raise UserError(f"no PNG info field {sorted(unknown)[0]!r}; there are {', '.join(PNG_INFO_FIELDS)}",
                        field="img2img_batch_png_info_props")
    largest = max_side * MAX_DECODED_SIDE_FACTOR

    @functools.lru_cache(maxsize=1)  # one mask for the whole folder is read once
    def read_mask(path: Path) -> Image.Image:
        return open_image(path, "img2img_batch_inpaint_mask_dir", largest, mode=None)[0]

    made: list[GenerationResult] = []
    skipped: list[str] = []
    progress.begin_plot(len(inputs))
    try:
        for path in inputs:
            try:
                image, infotext = open_image(path, "img2img_batch_input_dir", largest, mode=None)
                mask_file = _mask_file(path, masks)
                request = dataclasses.replace(base, init_images=[image],
                                              mask=None if mask_file is None else read_mask(mask_file),
                                              save_images=False if output else base.save_images)
                if batch.use_png_info:
                    request = _with_png_info(request, _infotext(path, infotext, info_dir), batch.png_info_fields)
                result = img2img(request)
            except UserError as e:
                skipped.append(f"{path.name} skipped: {e.message}")
                progress.next_cell()
                continue
            if output:
                result.paths = _write(output, path.stem, result)
            made.append(result)
            progress.next_cell()
            if result.interrupted or progress.interrupted:
                break
    finally:
        progress.end_plot()
    if not made:
        raise UserError("no image of the folder was made: " + "; ".join(skipped), field="img2img_batch_input_dir")
    return combined(made, skipped)


def _folder(text: str, field: str) -> Path:
    folder = Path(text).expanduser()
    if not folder.is_dir():
        raise UserError(f"{text!r} is not a folder on the server", field=field)
    return folder


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def _mask_file(path: Path, masks: list[Path]) -> Path | None:
    """The mask of the same name (any image type), or the mask folder's only image; None without a mask folder."""
    if not masks:
        return None
    named = [m for m in masks if m.stem == path.stem]
    if not named and len(masks) > 1:
        raise UserError(f"no mask named {path.stem}.* in the mask folder", field="img2img_batch_inpaint_mask_dir")
    return (named or masks)[0]


def _infotext(path: Path, own: str | None, info_dir: Path | None) -> str:
    """The PNG info of the input, or of the file of its name in the PNG info folder (its text only: no pixel is
    decoded; a file that cannot be read gives none, as A1111's batch takes it)."""
    if info_dir is None:
        return own or ""
    try:
        return read_png_infotext(info_dir / path.name) or ""
    except (OSError, ValueError):
        return ""


def _with_png_info(request: GenerationRequest, infotext: str, wanted: tuple[str, ...]) -> GenerationRequest:
    """A1111's use of an input's parameters: its prompts after the form's, the other fields instead of the form's."""
    if not infotext:
        return request
    found = request_fields(infotext)
    changes = {}
    for name in wanted:
        for field in PNG_INFO_FIELDS[name]:
            if field in ("prompt", "negative_prompt"):
                if found.get(field):
                    changes[field] = " ".join(p for p in (getattr(request, field), found[field]) if p)
            elif field in found:
                changes[field] = found[field]
    return dataclasses.replace(request, **changes)


def _write(folder: Path, stem: str, result: GenerationResult) -> list[Path]:
    """The result's images as PNGs with their infotext, named after the input (-2, -3 ... where a name is taken)."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, (image, infotext) in enumerate(zip(result.images, result.infotexts)):
        name = stem if len(result.images) == 1 else f"{stem}-{index + 1}"
        path, number = folder / f"{name}.png", 1
        while path.exists():
            number += 1
            path = folder / f"{name}-{number}.png"
        path.write_bytes(png_bytes(image, infotext))
        paths.append(path)
    return paths

