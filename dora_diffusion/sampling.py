"""Fixed-seed generation and comparison grids (validation images, the demo grid, the app).

Same prompt + same seed + same size = same initial noise, whatever adapter is loaded: the noise is
drawn once on the CPU from a seeded generator and handed to the pipeline as ``latents``, so a
side-by-side image shows only what the adapter changed. ``sample_columns`` is that side by side:
base | adapters, each column from the same noise, swapped in and out of one pipeline.
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

import torch
from PIL import Image, ImageDraw, ImageFont


@dataclass(frozen=True)
class SampleSettings:
    """What fixes a generation (besides the model and adapter)."""

    prompt: str
    negative_prompt: str | None = None
    seed: int = 0
    steps: int = 25
    guidance: float = 5.0
    width: int | None = None
    """Pixels, a multiple of 8; ``None``: the model's default size."""
    height: int | None = None


def default_size(pipe) -> int:
    return int(pipe.unet.config.sample_size) * int(pipe.vae_scale_factor)


def initial_latents(pipe, seed: int, width: int, height: int, batch: int = 1) -> torch.Tensor:
    """The starting noise for ``seed``: drawn on the CPU in fp32 so it is the same on every device."""
    if width % 8 or height % 8:
        raise ValueError(f"width and height must be multiples of 8, got {width}x{height}")
    f = int(pipe.vae_scale_factor)
    shape = (batch, int(pipe.unet.config.in_channels), height // f, width // f)
    g = torch.Generator("cpu").manual_seed(int(seed))
    return torch.randn(shape, generator=g, dtype=torch.float32)


@torch.no_grad()
def generate(pipe, settings: SampleSettings, num_images: int = 1) -> list[Image.Image]:
    """``num_images`` images for ``settings``; image ``i`` uses seed ``settings.seed + i``."""
    size = default_size(pipe)
    width, height = settings.width or size, settings.height or size
    latents = torch.cat([initial_latents(pipe, settings.seed + i, width, height) for i in range(num_images)])
    device = pipe.unet.device
    out = pipe(
        prompt=[settings.prompt] * num_images,
        negative_prompt=[settings.negative_prompt] * num_images if settings.negative_prompt else None,
        num_inference_steps=settings.steps,
        guidance_scale=settings.guidance,
        width=width,
        height=height,
        latents=latents.to(device=device, dtype=pipe.unet.dtype),
        generator=torch.Generator("cpu").manual_seed(int(settings.seed)),  # for stochastic schedulers
        output_type="pil",
    )
    return list(out.images)


@dataclass(frozen=True)
class Column:
    """One column of a side-by-side comparison: the base model (``adapter`` None) or an adapter at a scale."""

    label: str
    adapter: str | os.PathLike | None = None
    """An adapter file or its folder; ``None``: the base model."""
    scale: float = 1.0


class ColumnImages(NamedTuple):
    label: str
    images: list[list[Image.Image]]
    """``images[i]``: the ``num_images`` images of the ``i``-th settings."""
    seconds: float
    """Generation time of the column (loading its adapter not counted)."""


def sample_columns(
    pipe, columns: Sequence[Column], settings: Sequence[SampleSettings], num_images: int = 1
) -> list[ColumnImages]:
    """Every column's images for every ``settings``, from the same initial noise in each: the adapters are
    loaded into ``pipe`` in place, one at a time, and unloaded again, so the pipeline is left as the base
    model (also when a column fails)."""
    from .formats import load_adapter, unload_adapter

    out = []
    try:
        for column in columns:
            unload_adapter(pipe)
            if column.adapter is not None:
                load_adapter(pipe, column.adapter, scale=column.scale)
            started = time.perf_counter()
            images = [generate(pipe, s, num_images) for s in settings]
            out.append(ColumnImages(column.label, images, time.perf_counter() - started))
    finally:
        unload_adapter(pipe)
    return out


def _font(size: int):
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1
        return ImageFont.load_default()


def image_grid(
    rows: Sequence[Sequence[Image.Image]],
    col_labels: Sequence[str] | None = None,
    row_labels: Sequence[str] | None = None,
    label_height: int = 28,
) -> Image.Image:
    """A labelled grid: ``rows[r][c]``; all images resized to the first one's size."""
    if not rows or not rows[0]:
        raise ValueError("image_grid needs at least one image")
    w, h = rows[0][0].size
    n_cols = max(len(r) for r in rows)
    top = label_height if col_labels else 0
    font = _font(max(10, label_height // 2))
    left = 0
    if row_labels:  # wide enough for the longest label, measured in the font it is drawn with
        measure = ImageDraw.Draw(Image.new("RGB", (1, 1)))
        widest = max(measure.textbbox((4, 6), label, font=font)[2] for label in row_labels)
        left = max(120, label_height * 4, widest + 8)
    grid = Image.new("RGB", (left + n_cols * w, top + len(rows) * h), "white")
    draw = ImageDraw.Draw(grid)
    for c, label in enumerate(col_labels or []):
        draw.text((left + c * w + 4, 6), label, fill="black", font=font)
    for r, row in enumerate(rows):
        if row_labels:
            draw.text((4, top + r * h + 6), row_labels[r], fill="black", font=font)
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((w, h)), (left + c * w, top + r * h))
    return grid
