import pytest
from PIL import Image

from webui.engine import grid
from webui.engine.grid import EMPTY_CELL, WHITE, combine_grids, draw_grid

RED, GREEN, BLUE, YELLOW, PURPLE, TEAL = (200, 0, 0), (0, 160, 0), (0, 0, 200), (220, 200, 0), (120, 0, 140), (0, 130, 130)
W, H = 96, 64


def solid(colour: tuple[int, int, int], size: tuple[int, int] = (W, H)) -> Image.Image:
    return Image.new("RGB", size, colour)


def cells_2x3() -> list[list[Image.Image | None]]:
    return [[solid(RED), solid(GREEN), solid(BLUE)], [solid(YELLOW), solid(PURPLE), solid(TEAL)]]


def box_origin(image: Image.Image, row: int, col: int, rows: int, cols: int, margin: int = 0) -> tuple[int, int]:
    """Top-left of a box, from the bands the image must have: whatever its size leaves beyond boxes and margins."""
    left = image.width - cols * W - (cols - 1) * margin
    top = image.height - rows * H - (rows - 1) * margin
    return left + col * (W + margin), top + row * (H + margin)


def test_unlabelled_grid_is_exactly_boxes_and_margins():
    image = draw_grid(cells_2x3(), ["", ""], ["", "", ""], margin=5)
    assert image.size == (3 * W + 2 * 5, 2 * H + 5)
    assert image.mode == "RGB"
    assert image.getpixel((W + 2, 10)) == WHITE  # the margin between columns


def test_cell_centres_show_their_images():
    cells = cells_2x3()
    image = draw_grid(cells, ["row a", "row b"], ["x 1", "x 2", "x 3"], margin=4)
    for r, row in enumerate(cells):
        for c, cell in enumerate(row):
            left, top = box_origin(image, r, c, 2, 3, margin=4)
            assert image.getpixel((left + W // 2, top + H // 2)) == cell.getpixel((0, 0))
            assert image.getpixel((left, top)) == cell.getpixel((0, 0))
            assert image.getpixel((left + W - 1, top + H - 1)) == cell.getpixel((0, 0))


def test_label_bands_are_added_only_for_non_empty_labels():
    plain = draw_grid(cells_2x3(), ["", ""], ["", "", ""])
    columns = draw_grid(cells_2x3(), ["", ""], ["a", "", "c"])
    rows = draw_grid(cells_2x3(), ["", "b"], ["", "", ""])
    both = draw_grid(cells_2x3(), ["a", "b"], ["a", "b", "c"])

    assert columns.width == plain.width and columns.height > plain.height
    assert rows.height == plain.height and rows.width == plain.width + W * 3 // 4
    assert both.size == (rows.width, columns.height)


def test_labels_are_drawn_in_black_on_white():
    image = draw_grid(cells_2x3(), ["row", "row"], ["col", "col", "col"])
    left, top = box_origin(image, 0, 0, 2, 3)
    header = image.crop((left, 0, left + W, top))
    band = image.crop((0, top, left, top + H))
    for region in (header, band):
        colours = {colour for _, colour in region.getcolors(maxcolors=100_000)}
        assert WHITE in colours
        assert any(max(colour) < 80 for colour in colours)  # dark text pixels


def test_long_labels_wrap_into_a_taller_band():
    one_line = draw_grid([[solid(RED)]], [""], ["short"])
    wrapped = draw_grid([[solid(RED)]], [""], ["a label of many words that cannot fit on one line of this box"])
    long_word = draw_grid([[solid(RED)]], [""], ["x" * 200])
    assert wrapped.height > one_line.height
    assert long_word.height == one_line.height  # cut with an ellipsis, not wrapped


def test_smaller_images_are_centred_on_white():
    small = solid(BLUE, (W // 2, H // 2))
    image = draw_grid([[solid(RED), small]], [""], ["", ""])
    assert image.size == (2 * W, H)
    assert image.getpixel((W, 0)) == WHITE
    assert image.getpixel((2 * W - 1, H - 1)) == WHITE
    assert image.getpixel((W + W // 2, H // 2)) == BLUE
    assert image.getpixel((W + W // 4, H // 4)) == BLUE
    assert image.getpixel((W + W // 4 - 1, H // 4 - 1)) == WHITE


def test_box_size_is_the_largest_image_in_each_direction():
    image = draw_grid([[solid(RED, (40, 100)), solid(GREEN, (120, 30))]], [""], ["", ""])
    assert image.size == (2 * 120, 100)


def test_missing_cells_are_grey():
    image = draw_grid([[solid(RED), None], [None, solid(GREEN)]], ["", ""], ["", ""])
    assert image.getpixel((W + W // 2, H // 2)) == EMPTY_CELL
    assert image.getpixel((W, 0)) == EMPTY_CELL
    assert image.getpixel((W // 2, H + H // 2)) == EMPTY_CELL
    assert image.getpixel((W // 2, H // 2)) == RED


def test_other_image_modes_are_pasted_as_rgb():
    image = draw_grid([[solid(RED).convert("RGBA"), Image.new("L", (W, H), 100)]], [""], ["", ""])
    assert image.getpixel((W // 2, H // 2)) == RED
    assert image.getpixel((W + W // 2, H // 2)) == (100, 100, 100)


@pytest.mark.parametrize(
    ("cells", "rows", "cols"),
    [
        ([[solid(RED), solid(GREEN)]], ["a", "b"], ["", ""]),
        ([[solid(RED), solid(GREEN)]], [""], [""]),
        ([[solid(RED)], [solid(GREEN), solid(BLUE)]], ["", ""], [""]),
        ([[None]], [""], [""]),
        ([], [], []),
    ],
)
def test_mismatched_or_empty_input_is_a_value_error(cells, rows, cols):
    with pytest.raises(ValueError):
        draw_grid(cells, rows, cols)


def test_without_freetype_the_bitmap_font_draws_any_label(monkeypatch):
    def load_default(size=None):
        if size is not None:
            raise ImportError("The _imagingft C module is not installed")
        return grid.ImageFont.load_default_imagefont()

    monkeypatch.setattr(grid.ImageFont, "load_default", load_default)
    image = draw_grid([[solid(RED)]], ["日本…"], ["a" * 100 + " ok"])
    assert image.width > W and image.height > H


def test_combine_grids_side_by_side_under_labels():
    grids = [draw_grid([[solid(colour)]], [""], [""]) for colour in (RED, GREEN, BLUE)]
    unlabelled = combine_grids(grids, ["", "", ""])
    labelled = combine_grids(grids, ["z 1", "", "z 3"])

    gap = (unlabelled.width - 3 * W) // 2
    assert gap >= 0 and unlabelled.width == 3 * W + 2 * gap
    assert unlabelled.height == H
    assert labelled.width == unlabelled.width and labelled.height > H
    top = labelled.height - H
    for i, colour in enumerate((RED, GREEN, BLUE)):
        assert labelled.getpixel((i * (W + gap) + W // 2, top + H // 2)) == colour
        assert unlabelled.getpixel((i * (W + gap) + W // 2, H // 2)) == colour


def test_combine_grids_of_different_heights_top_aligns_them():
    grids = [solid(RED, (50, 80)), solid(GREEN, (70, 40))]
    image = combine_grids(grids, ["", ""])
    gap = image.width - 120
    assert image.height == 80
    assert image.getpixel((50 + gap, 0)) == GREEN
    assert image.getpixel((50 + gap, 79)) == WHITE


def test_a_single_unlabelled_grid_is_returned_as_is():
    only = solid(RED)
    assert combine_grids([only], [""]) is only
    assert combine_grids([only], ["z"]).height > H


@pytest.mark.parametrize(("grids", "labels"), [([solid(RED)], ["a", "b"]), ([], [])])
def test_combine_grids_mismatch_is_a_value_error(grids, labels):
    with pytest.raises(ValueError):
        combine_grids(grids, labels)
