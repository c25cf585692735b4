"""The labelled image grid of an X/Y/Z plot or a prompt matrix, drawn with Pillow alone.

Every cell box has the size of the largest image, so the axes line up even when a "Size" axis
makes images differ; smaller images are centred in their box. A cell that was never generated
(the run was interrupted) is a light grey box. Column labels go in a band above the columns, row
labels in a band to the left (three quarters of a box wide, as in A1111); a band whose labels
are all empty (an axis of "Nothing") is left out. One such grid per Z value is then put side by
side under the Z labels.

A label is text, or parts each on its own lines, drawn black where active and grey struck through where not (the
prompt matrix's labels: which optional parts a column or row has).
"""
from __future__ import annotations

from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageFont

WHITE = (255, 255, 255)
BLACK = (0, 0, 0)
INACTIVE = (153, 153, 153)
EMPTY_CELL = (224, 224, 224)
MIN_FONT_SIZE = 12

Font = ImageFont.FreeTypeFont | ImageFont.ImageFont


@dataclass(frozen=True)
class LabelPart:
    text: str
    active: bool = True


Label = str | tuple[LabelPart, ...]
Line = tuple[str, bool]  # a wrapped line, and whether it is drawn as active


def _font(size: int) -> Font:
    """Pillow's built-in font at ``size``, or its small bitmap font where Pillow lacks FreeType."""
    try:
        return ImageFont.load_default(size=size)
    except (ImportError, OSError):
        return ImageFont.load_default()


def _printable(text: str, font: Font) -> str:
    """``text`` as ``font`` can draw it: the bitmap fallback font knows Latin-1 only."""
    if isinstance(font, ImageFont.FreeTypeFont):
        return text
    return text.replace("…", "...").encode("latin-1", "replace").decode("latin-1")


def _line_height(font: Font) -> int:
    bottom = font.getbbox("Ag")[3]
    return int(bottom) + max(int(bottom) // 4, 1)


def _cut(word: str, font: Font, width: int) -> str:
    """``word`` shortened and ended with an ellipsis where it is wider than ``width``."""
    if font.getlength(word) <= width:
        return word
    ellipsis = _printable("…", font)
    while word and font.getlength(word + ellipsis) > width:
        word = word[:-1]
    return word + ellipsis


def _wrap(text: str, font: Font, width: int) -> list[str]:
    """``text`` broken into lines at most ``width`` pixels wide, between words."""
    lines: list[str] = []
    for word in _printable(text, font).split():
        word = _cut(word, font, width)
        if lines and font.getlength(f"{lines[-1]} {word}") <= width:
            lines[-1] = f"{lines[-1]} {word}"
        else:
            lines.append(word)
    return lines


def _wrap_label(label: Label, font: Font, width: int) -> list[Line]:
    """A label's lines: text wrapped, or each part wrapped on lines of its own."""
    parts = (LabelPart(label),) if isinstance(label, str) else label
    return [(line, part.active) for part in parts for line in _wrap(part.text, font, width)]


def _draw_lines(draw: ImageDraw.ImageDraw, lines: list[Line], font: Font, box: tuple[int, int, int, int]) -> None:
    """``lines`` centred in ``box`` (left, top, width, height); inactive ones grey and struck through."""
    left, top, width, height = box
    line_height = _line_height(font)
    y = top + (height - len(lines) * line_height) // 2
    for line, active in lines:
        length = int(font.getlength(line))
        x = left + (width - length) // 2
        draw.text((x, y), line, fill=BLACK if active else INACTIVE, font=font)
        if not active:
            middle = y + int(font.getbbox("x")[1] + font.getbbox("x")[3]) // 2
            draw.line((x, middle, x + length, middle), fill=INACTIVE, width=max(1, line_height // 16))
        y += line_height


def _band_height(labels: list[list[Line]], font: Font) -> int:
    """Height of a band above boxes holding these wrapped labels; 0 when they are all empty."""
    most_lines = max((len(lines) for lines in labels), default=0)
    return most_lines * _line_height(font) + _line_height(font) if most_lines else 0


def _cell_size(cells: list[list[Image.Image | None]]) -> tuple[int, int]:
    images = [image for row in cells for image in row if image is not None]
    if not images:
        raise ValueError("a grid needs at least one image")
    return max(image.width for image in images), max(image.height for image in images)


def _paste_centred(canvas: Image.Image, image: Image.Image, box: tuple[int, int, int, int]) -> None:
    left, top, width, height = box
    rgb = image if image.mode == "RGB" else image.convert("RGB")
    canvas.paste(rgb, (left + (width - image.width) // 2, top + (height - image.height) // 2))


def draw_grid(
    cells: list[list[Image.Image | None]], row_labels: list[Label], col_labels: list[Label], margin: int = 0
) -> Image.Image:
    """``cells[row][column]`` in boxes the size of the largest image, labelled; None is a grey box."""
    if not col_labels or len(cells) != len(row_labels) or any(len(row) != len(col_labels) for row in cells):
        raise ValueError(
            f"cells must be {len(row_labels)} rows (one per row label) of {len(col_labels)} cells (one per column label)"
        )
    box_w, box_h = _cell_size(cells)
    font = _font(max(MIN_FONT_SIZE, box_h // 20))
    pad = _line_height(font) // 2
    col_lines = [_wrap_label(label, font, box_w - 2 * pad) for label in col_labels]
    left_w = box_w * 3 // 4 if any(row_labels) else 0
    row_lines = [_wrap_label(label, font, left_w - 2 * pad) for label in row_labels]
    top_h = _band_height(col_lines, font)

    canvas = Image.new(
        "RGB",
        (left_w + len(col_labels) * (box_w + margin) - margin, top_h + len(row_labels) * (box_h + margin) - margin),
        WHITE,
    )
    draw = ImageDraw.Draw(canvas)
    for c, lines in enumerate(col_lines):
        _draw_lines(draw, lines, font, (left_w + c * (box_w + margin), 0, box_w, top_h))
    for r, row in enumerate(cells):
        top = top_h + r * (box_h + margin)
        _draw_lines(draw, row_lines[r], font, (0, top, left_w, box_h))
        for c, image in enumerate(row):
            box = (left_w + c * (box_w + margin), top, box_w, box_h)
            if image is None:
                draw.rectangle((box[0], top, box[0] + box_w - 1, top + box_h - 1), fill=EMPTY_CELL)
            else:
                _paste_centred(canvas, image, box)
    return canvas


def combine_grids(grids: list[Image.Image], labels: list[str]) -> Image.Image:
    """One grid per Z value, left to right, each under its label; a lone unlabelled grid as it is."""
    if len(grids) != len(labels) or not grids:
        raise ValueError(f"need one label per grid and at least one grid; got {len(grids)} grids, {len(labels)} labels")
    if len(grids) == 1 and not labels[0]:
        return grids[0]
    font_size = max(MIN_FONT_SIZE, min(min(grid.size) for grid in grids) // 25)
    font = _font(font_size)
    pad = _line_height(font) // 2
    lines = [_wrap_label(label, font, grid.width - 2 * pad) for grid, label in zip(grids, labels)]
    top_h = _band_height(lines, font)
    gap = font_size

    canvas = Image.new(
        "RGB", (sum(grid.width for grid in grids) + gap * (len(grids) - 1), top_h + max(g.height for g in grids)), WHITE
    )
    draw = ImageDraw.Draw(canvas)
    left = 0
    for grid, grid_lines in zip(grids, lines):
        _draw_lines(draw, grid_lines, font, (left, 0, grid.width, top_h))
        _paste_centred(canvas, grid, (left, top_h, grid.width, grid.height))
        left += grid.width + gap
    return canvas
