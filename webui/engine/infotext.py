"""A1111's "parameters" infotext: the text stored in every image that says how it was made.

Format (A1111 1.10)::

    <prompt, may span lines>
    Negative prompt: <negative prompt, may span lines>      (left out when empty)
    Steps: 20, Sampler: Euler a, CFG scale: 7, Seed: 1, Size: 512x512, ...

A value holding a comma, colon, newline, double quote or edge whitespace is written as a JSON
string, so the parameter line splits back unambiguously. A1111 does not quote for the last two,
but its parser reads our quoted values the same.

Known ambiguity shared with A1111: a prompt line that starts with "Negative prompt:", and the
whitespace at the ends of each prompt line, do not survive a round trip.
"""
from __future__ import annotations

import io
import json
import re
import struct
import zlib
from contextlib import nullcontext
from pathlib import Path
from typing import Any, BinaryIO

from PIL import Image

from webui.engine.inpaint import FILLS, INPAINT_AREAS, MASK_MODES
from webui.engine.soft_inpaint import ENABLED_LABEL as SOFT_ENABLED
from webui.engine.soft_inpaint import INFOTEXT_KEYS as SOFT_KEYS
from webui.engine.soft_inpaint import SoftInpainting

# A1111's pattern: a key, then a JSON-quoted value or anything up to the next comma.
_PARAM = re.compile(r'\s*(\w[\w \-/]+):\s*("(?:\\.|[^\\"])+"|[^,]*)(?:,|$)')
_KEY = re.compile(r"\w[\w \-/]+")
_SIZE = re.compile(r"^(\d+)x(\d+)$")
_NEGATIVE = "Negative prompt:"

_EXIF_IFD = 0x8769
_USER_COMMENT = 0x9286


def format_value(value: Any) -> str:
    """A1111-style text for one value: whole floats lose their ".0" (CFG scale 7.0 → "7")."""
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    text = str(value)
    if any(c in text for c in ',:"\n') or text != text.strip():
        return json.dumps(text, ensure_ascii=False)
    return text


def build_infotext(prompt: str, negative_prompt: str, params: dict[str, Any]) -> str:
    """The infotext for one image; ``params`` maps A1111 keys to values in order, None skipped."""
    for key in params:
        if not _KEY.fullmatch(key):
            raise ValueError(f"infotext key {key!r} would not parse back")
    line = ", ".join(f"{key}: {format_value(value)}" for key, value in params.items() if value is not None)
    negative = f"\n{_NEGATIVE} {negative_prompt}" if negative_prompt else ""
    return f"{prompt}{negative}\n{line}".strip()


def _unquote(value: str) -> str:
    if len(value) >= 2 and value[0] == value[-1] == '"':
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value


def parse_infotext(text: str) -> dict[str, str]:
    """A1111-compatible parse: {"Prompt", "Negative prompt", then every key as text}.

    A "WxH" value also gives "<key>-1" and "<key>-2" (Size-1, Size-2) as A1111's does; unlike
    A1111 the original key is kept too. No defaults are filled in.
    """
    *lines, last = text.strip().split("\n")
    if len(_PARAM.findall(last)) < 3:  # A1111's test for "this is not a parameter line"
        lines.append(last)
        last = ""

    prompt: list[str] = []
    negative: list[str] = []
    for line in lines:
        line = line.strip()
        if not negative and line.startswith(_NEGATIVE):
            negative.append(line[len(_NEGATIVE) :].strip())
        else:
            (negative if negative else prompt).append(line)

    result = {"Prompt": "\n".join(prompt), "Negative prompt": "\n".join(negative)}
    for key, value in _PARAM.findall(last):
        value = _unquote(value)
        result[key] = value
        size = _SIZE.match(value)
        if size:
            result[f"{key}-1"], result[f"{key}-2"] = size.groups()
    return result


# Infotext keys a request takes back ("Send to txt2img", paste), with the type each is read as (names: the index of
# the name written).
INFOTEXT_FIELDS: dict[str, tuple[str, type | tuple[str, ...]]] = {
    "Steps": ("steps", int), "Sampler": ("sampler_name", str), "Schedule type": ("scheduler", str),
    "CFG scale": ("cfg_scale", float), "Distilled CFG Scale": ("distilled_cfg_scale", float), "Seed": ("seed", int),
    "Size-1": ("width", int), "Size-2": ("height", int), "Clip skip": ("clip_skip", int),
    "Eta": ("eta", float), "Eta DDIM": ("eta", float), "Variation seed": ("subseed", int), "Variation seed strength": ("subseed_strength", float),
    "Seed resize from-1": ("seed_resize_from_w", int), "Seed resize from-2": ("seed_resize_from_h", int),
    "Denoising strength": ("denoising_strength", float), "Noise multiplier": ("initial_noise_multiplier", float),
    "Mask blur": ("mask_blur", int),
    "Mask mode": ("inpainting_mask_invert", MASK_MODES), "Masked content": ("inpainting_fill", FILLS),
    "Inpaint area": ("inpaint_full_res", INPAINT_AREAS), "Masked area padding": ("inpaint_full_res_padding", int),
    "Hires upscale": ("hr_scale", float), "Hires resize-1": ("hr_resize_x", int), "Hires resize-2": ("hr_resize_y", int),
    "Hires steps": ("hr_second_pass_steps", int), "Hires upscaler": ("hr_upscaler", str),
    "Hires checkpoint": ("hr_checkpoint_name", str),
    "Hires sampler": ("hr_sampler_name", str), "Hires schedule type": ("hr_scheduler", str),
    "Hires prompt": ("hr_prompt", str), "Hires negative prompt": ("hr_negative_prompt", str),
    "Hires CFG Scale": ("hr_cfg", float), "Hires Distilled CFG Scale": ("hr_distilled_cfg", float),
}
HIRES_KEYS = ("Hires upscale", "Hires resize")  # an infotext with either was made with hires. fix (A1111's paste)


def request_fields(text: str) -> dict[str, Any]:
    """The request fields an infotext gives: prompts, steps, sampler, schedule type, CFG, seed, size, clip skip.
    A value that does not read as its type is left out, as A1111's paste leaves it."""
    params = parse_infotext(text)
    fields: dict[str, Any] = {"prompt": params["Prompt"], "negative_prompt": params["Negative prompt"]}
    for key, (field, kind) in INFOTEXT_FIELDS.items():
        if key in params:
            try:
                fields[field] = (kind.index(params[key]) if isinstance(kind, tuple)
                                 else int(float(params[key])) if kind is int else kind(params[key]))
            except ValueError:
                continue
    if any(key in params for key in HIRES_KEYS):
        fields["enable_hr"] = True
    if params.get(SOFT_ENABLED) == "True":  # A1111's script args; each setting left out or unreadable: its default
        fields["soft_inpainting"] = [True, *(_number(params.get(key), default) for key, default in zip(
            SOFT_KEYS, SoftInpainting().values()))]
    return fields


def _number(text: str | None, default: float) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        return default


def _decode_user_comment(data: bytes | str) -> str:
    """EXIF UserComment: an 8-byte charset tag, then the text (A1111 writes "UNICODE", UTF-16)."""
    if isinstance(data, str):
        return data
    charset, body = data[:8], data[8:]
    if charset == b"UNICODE\0":
        if body[:2] in (b"\xfe\xff", b"\xff\xfe"):
            return body.decode("utf-16")
        # No BOM: piexif (used by A1111) writes big-endian; ASCII text then has zeros first.
        big_endian = body[0::2].count(0) >= body[1::2].count(0)
        return body.decode("utf-16-be" if big_endian else "utf-16-le", errors="replace")
    return body.decode("utf-8", errors="ignore").rstrip("\0")


def read_png_infotext(path_or_image: str | Path | BinaryIO | Image.Image) -> str | None:
    """The infotext of a PNG ("parameters" text chunk) or JPEG/WebP (EXIF UserComment), if any. No pixel is
    decoded: a PNG's text is read chunk by chunk (png_text), other formats' EXIF from their headers."""
    if isinstance(path_or_image, Image.Image):
        return _read_infotext(path_or_image)
    with open(path_or_image, "rb") if isinstance(path_or_image, (str, Path)) else nullcontext(path_or_image) as f:
        if f.read(len(PNG_SIGNATURE)) == PNG_SIGNATURE:
            return png_text(f).get("parameters") or None
        f.seek(0)
        with Image.open(f) as image:
            return _read_infotext(image)


PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_TEXT_BYTES = 1 << 20  # a text chunk's size, inflated too: an infotext is a few kB


def png_text(stream: BinaryIO) -> dict[str, str]:
    """A PNG's text chunks (tEXt, zTXt, iTXt, before or after the pixels) from ``stream``, positioned after the
    signature. Chunks are walked, never decoded: pixels can be a decompression bomb (a 400 kB file of 12000x12000),
    text is bounded to MAX_TEXT_BYTES. ValueError for a file that is not a whole PNG."""
    texts: dict[str, str] = {}
    while True:
        header = stream.read(8)
        if len(header) < 8:
            raise ValueError("the PNG file ends before its last chunk: it is cut short")
        length, kind = struct.unpack(">I4s", header)
        if kind == b"IEND":
            return texts
        if kind not in (b"tEXt", b"zTXt", b"iTXt") or length > MAX_TEXT_BYTES:
            stream.seek(length + 4, io.SEEK_CUR)  # the chunk and its CRC, unread
            continue
        data = stream.read(length)
        stream.seek(4, io.SEEK_CUR)
        key, _, rest = data.partition(b"\0")
        if kind == b"tEXt":
            texts[key.decode("latin-1")] = rest.decode("latin-1")
        elif kind == b"zTXt":
            texts[key.decode("latin-1")] = _inflate(rest[1:]).decode("latin-1")
        else:
            compressed, body = rest[:1] == b"\1", rest[2:]
            _language, _, body = body.partition(b"\0")
            _translated, _, body = body.partition(b"\0")
            texts[key.decode("latin-1")] = (_inflate(body) if compressed else body).decode("utf-8", errors="replace")


def _inflate(data: bytes) -> bytes:
    inflater = zlib.decompressobj()
    try:
        out = inflater.decompress(data, MAX_TEXT_BYTES)
    except zlib.error as e:
        raise ValueError(f"a compressed PNG text chunk is broken ({e})") from e
    if inflater.unconsumed_tail:
        raise ValueError(f"a compressed PNG text chunk inflates beyond {MAX_TEXT_BYTES} bytes")
    return out


def _read_infotext(image: Image.Image) -> str | None:
    text = image.info.get("parameters")
    comment = image.getexif().get_ifd(_EXIF_IFD).get(_USER_COMMENT)
    if comment:
        text = _decode_user_comment(comment) or text
    return text or None
