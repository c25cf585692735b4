"""A1111's Extras request bodies (``/sdapi/v1/extra-single-image``, ``/extra-batch-images``) read as A1111 reads
them: its fields honoured, the ones that change nothing here ignored and named, an impossible value or face
restoration asked for a UserError naming the field. Images are checked for size before a pixel is decoded."""
from __future__ import annotations

import base64
import binascii
import io
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from webui.engine.infotext import read_png_infotext
from webui.engine.upscale.extras import MAX_FACTOR, RESIZE_BY, RESIZE_TO, ExtrasRequest
from webui.errors import UserError

# Field → (JSON type, default) of what A1111's ExtrasBaseRequest takes and this app honours.
HONOURED: dict[str, tuple[type, Any]] = {
    "resize_mode": (int, RESIZE_BY), "upscaling_resize": (float, 2.0), "upscaling_resize_w": (int, 512),
    "upscaling_resize_h": (int, 512), "upscaling_crop": (bool, True), "upscaler_1": (str, "None"),
    "upscaler_2": (str, "None"), "extras_upscaler_2_visibility": (float, 0.0),
}
FACE_FIELDS = ("gfpgan_visibility", "codeformer_visibility")  # face restoration: refused unless 0
# What A1111 takes that changes nothing here: whether its UI shows results, the order of face restoration and
# upscaling, CodeFormer's weight (face restoration is off).
IGNORED = {"show_extras_results": bool, "upscale_first": bool, "codeformer_weight": float}


@dataclass
class ExtrasCall:
    """A body read: the request, each image's generation parameters (kept in its PNG), the fields ignored."""

    request: ExtrasRequest
    parameters: list[str | None]
    ignored: list[str]


def open_image(source: str | Path | BinaryIO, field: str, max_side: int, mode: str | None = "RGB"
               ) -> tuple[Image.Image, str | None]:
    """An image (a file, or its bytes) in ``mode`` (None: as stored), and its generation parameters; its size is read
    from the header and checked against ``max_side`` before any pixel is decoded (a small file can hold a
    decompression bomb)."""
    try:
        image = Image.open(source)
        if max(image.size) > max_side:
            raise UserError(f"is {image.width}x{image.height}; sides up to {max_side} pixels are taken "
                            "(max_image_side in Settings)", field=field)
        image.load()
        return image.convert(mode) if mode else image, read_png_infotext(image)
    except UserError:
        raise
    except (ValueError, OSError, Image.DecompressionBombError, SyntaxError) as e:
        raise UserError(f"is not an image (PNG, JPEG, WebP ...): {e}", field=field) from None


def decode_image(data: Any, field: str, max_side: int) -> tuple[Image.Image, str | None]:
    """A base64 image (a data: URL too), as ``open_image``."""
    if not isinstance(data, str) or not data:
        raise UserError("send the image as base64 text (a data: URL works too)", field=field)
    try:
        raw = base64.b64decode(data.split(",", 1)[-1], validate=True)
    except (binascii.Error, ValueError) as e:
        raise UserError(f"is not a base64-encoded image ({e})", field=field) from None
    return open_image(io.BytesIO(raw), field, max_side)


def read_extras(body: Any, batch: bool, max_side: int, max_images: int) -> ExtrasCall:
    """A1111's single-image body (``image``) or batch body (``imageList`` of ``{"data", "name"}``)."""
    if not isinstance(body, dict):
        raise UserError("the request body must be a JSON object", field="body")
    for name in FACE_FIELDS:
        value = body.get(name)
        if value is not None and (not _is_number(value) or value != 0):
            raise UserError(f"face restoration is not supported, so it must be 0, got {value!r}", field=name)
    values = {name: _typed(body, name, kind, default) for name, (kind, default) in HONOURED.items()}
    for name, kind in IGNORED.items():
        _typed(body, name, kind, None)
    images, parameters = zip(*_images(body, batch, max_side, max_images))
    request = ExtrasRequest(list(images), **values)
    known = {*HONOURED, *FACE_FIELDS, "imageList" if batch else "image"}
    ignored = [name for name in body if name not in known or name in _unused(request)]
    return ExtrasCall(request, list(parameters), ignored)


def _images(body: dict, batch: bool, max_side: int, max_images: int) -> list[tuple[Image.Image, str | None]]:
    if not batch:
        return [decode_image(body.get("image"), "image", max_side)]
    listed = body.get("imageList")
    if not isinstance(listed, list) or not listed:
        raise UserError('send a list of {"data": base64 image, "name": file name}', field="imageList")
    if len(listed) > max_images:
        raise UserError(f"has {len(listed)} images; at most {max_images} are taken at once (max_batch_count in "
                        "Settings)", field="imageList")
    for number, item in enumerate(listed):
        if not isinstance(item, dict) or not isinstance(item.get("name", ""), (str, type(None))):
            raise UserError('each item must be {"data": base64 image, "name": file name}', field=f"imageList[{number}]")
    return [decode_image(item.get("data"), f"imageList[{number}].data", max_side) for number, item in enumerate(listed)]


def _unused(request: ExtrasRequest) -> set[str]:
    """The honoured fields that this request's other fields make change nothing (as in A1111)."""
    unused = set(IGNORED)
    unused |= {"upscaling_resize_w", "upscaling_resize_h", "upscaling_crop"} if request.resize_mode == RESIZE_BY \
        else {"upscaling_resize"}
    if not request.blends:
        unused |= {"upscaler_2", "extras_upscaler_2_visibility"}
    if request.upscaler_1 == "None":
        unused |= set(HONOURED) - {"upscaler_1"}
    return unused


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _typed(body: dict, name: str, kind: type, default: Any) -> Any:
    """The field's value as ``kind`` (null: the default); a value of another type is a UserError naming it."""
    value = body.get(name)
    if value is None:
        return default
    if kind is bool and isinstance(value, bool):
        return value
    if kind is str and isinstance(value, str):
        return value
    if kind is int and _is_number(value) and int(value) == value:
        return int(value)
    if kind is float and _is_number(value):
        return float(value)
    raise UserError(f"must be {KIND_NAMES[kind]}, got {value!r}", field=name)


KIND_NAMES = {bool: "true or false", str: "text", int: "a whole number", float: "a number"}


JSON_TYPES = {bool: "boolean", str: "string", int: "integer", float: "number"}
FIELD_BOUNDS = {"resize_mode": {"enum": [RESIZE_BY, RESIZE_TO, None]},
                "upscaling_resize": {"exclusiveMinimum": 0, "maximum": MAX_FACTOR},
                "upscaling_resize_w": {"minimum": 1}, "upscaling_resize_h": {"minimum": 1},
                "extras_upscaler_2_visibility": {"minimum": 0, "maximum": 1}}


def extras_body_schema(batch: bool) -> dict[str, Any]:
    """The body ``read_extras`` takes, for /docs and clients: A1111's fields with their types and bounds (null: the
    default); others are allowed and ignored (named in ``info``)."""
    properties: dict[str, Any] = {
        name: {"type": [JSON_TYPES[kind], "null"], "default": default, **FIELD_BOUNDS.get(name, {})}
        for name, (kind, default) in HONOURED.items()}
    properties |= {name: {"type": ["number", "null"], "description": "face restoration is not supported: 0 only"}
                   for name in FACE_FIELDS}
    properties |= {name: {"type": [JSON_TYPES[kind], "null"], "description": "changes nothing here: ignored"}
                   for name, kind in IGNORED.items()}
    if batch:
        item = {"type": "object", "required": ["data"], "properties": {
            "data": {"type": "string", "description": "an image in base64"}, "name": {"type": ["string", "null"]}}}
        properties["imageList"] = {"type": "array", "minItems": 1, "items": item}
    else:
        properties["image"] = {"type": "string", "description": "an image in base64 (a data: URL too)"}
    return {"type": "object", "required": ["imageList" if batch else "image"], "properties": properties,
            "additionalProperties": True}
