"""Comparison grids: every label drawn whole; base | adapter columns from the same noise."""

import numpy as np
import pytest
from PIL import Image, ImageChops, ImageDraw

from dora_diffusion.formats import AdapterFileError, load_adapter, unload_adapter
from dora_diffusion.layers import adapter_modules
from dora_diffusion.sampling import Column, SampleSettings, _font, generate, image_grid, sample_columns
from helpers import write_adapter

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


def test_sample_columns_share_the_noise_and_leave_the_base(tiny_pipe, tiny_components, tmp_path):
    """base | adapter from the same noise: the base column is what the bare pipeline draws, an adapter's is what
    the pipeline draws with it loaded, scale 0 is the base again; nothing stays loaded, also after a failure."""

    def pixels(image):
        return np.asarray(image.convert("RGB"))

    tiny_pipe.set_progress_bar_config(disable=True)
    lora = write_adapter(tiny_components, tmp_path / "lora", "lora", seed=1)
    settings = [SampleSettings("a photo of sks toy", seed=s, steps=2, width=64, height=64) for s in (0, 1)]
    base, with_lora, off = sample_columns(
        tiny_pipe, [Column("base"), Column("LoRA", lora), Column("off", lora, scale=0.0)], settings, num_images=2
    )
    assert [c.label for c in (base, with_lora, off)] == ["base", "LoRA", "off"] and base.seconds > 0
    assert [len(row) for row in base.images] == [2, 2]
    assert not list(adapter_modules(tiny_pipe.unet))
    for row, s in zip(base.images, settings, strict=True):
        assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(row, generate(tiny_pipe, s, 2), strict=True))
    load_adapter(tiny_pipe, lora)
    expected = generate(tiny_pipe, settings[1], 2)
    unload_adapter(tiny_pipe)
    assert all(np.array_equal(pixels(a), pixels(b)) for a, b in zip(with_lora.images[1], expected, strict=True))
    assert not np.array_equal(pixels(with_lora.images[0][0]), pixels(base.images[0][0]))
    assert np.array_equal(pixels(off.images[0][0]), pixels(base.images[0][0]))

    with pytest.raises(AdapterFileError):
        sample_columns(tiny_pipe, [Column("LoRA", lora), Column("missing", tmp_path / "nothing")], settings[:1])
    assert not list(adapter_modules(tiny_pipe.unet))
