"""Comparison grids: every label drawn whole."""

from PIL import Image, ImageChops, ImageDraw

from dora_diffusion.sampling import _font, image_grid

LONG = "a painting of sks toy on the beach in the snow"


def _ink_right(image: Image.Image) -> int:
    """x just past the last non-white pixel."""
    bbox = ImageChops.invert(image.convert("L")).getbbox()
    return bbox[2] if bbox else 0


def test_row_labels_get_a_column_wide_enough():
    rows = [[Image.new("RGB", (64, 48), "gray")] * 3 for _ in range(2)]
    short = image_grid(rows, col_labels=["base", "LoRA", "DoRA"], row_labels=["sks toy", "beach"])
    grid = image_grid(rows, col_labels=["base", "LoRA", "DoRA"], row_labels=["sks toy", LONG])
    left = grid.width - 3 * 64
    assert grid.width > short.width
    # the long label as drawn on an unbounded canvas: all of its ink lies left of the first image...
    alone = Image.new("RGB", (2000, 48), "white")
    ImageDraw.Draw(alone).text((4, 6), LONG, fill="black", font=_font(14))
    assert 0 < _ink_right(alone) < left
    # ...and the grid shows exactly that (no image pasted over its end)
    top = 28 + 48  # column labels, then the first row
    assert ImageChops.difference(grid.crop((0, top, left, top + 48)), alone.crop((0, 0, left, 48))).getbbox() is None
