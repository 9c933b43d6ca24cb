"""One image file: decoded to 8-bit RGB (EXIF orientation, transparency, 16-bit greyscale, the pixel
limit), and the transforms that turn it into a training tensor (resize, crop boxes, ``[-1, 1]``)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
"""Accepted image file suffixes (compared lower-cased)."""


# ---------------------------------------------------------------------------------------- loading
def to_rgb(image: Image.Image) -> Image.Image:
    """Convert any Pillow mode to 8-bit RGB; transparent pixels are composited on white.

    16-bit greyscale ("I;16*", and "I" as Pillow opens 16-bit PNGs) is scaled from 0..65535 to
    0..255; Pillow's own ``convert`` would clip it to 255 instead.
    """
    if image.mode.startswith("I;16") or image.mode == "I":
        values = np.asarray(image, dtype=np.float64)
        grey = np.clip(np.rint(values / 257.0), 0, 255).astype(np.uint8)  # 65535 / 257 = 255
        return Image.fromarray(grey, "L").convert("RGB")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")  # also applies palette / colour-key transparency
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")  # L, 1, P, CMYK, YCbCr, LAB, HSV, RGB


def check_pixels(image: Image.Image, max_pixels: int | None) -> None:
    """Refuse an opened (header-only) image with more than ``max_pixels`` pixels."""
    limit = Image.MAX_IMAGE_PIXELS if max_pixels is None else max_pixels
    width, height = image.size
    if limit is not None and width * height > limit:
        raise Image.DecompressionBombError(f"{width}x{height} = {width * height:,} pixels, over the limit of {limit:,}")


def load_rgb(path: str | Path, *, max_pixels: int | None = None) -> Image.Image:
    """Open, fully decode and return an image as 8-bit RGB, EXIF orientation applied.

    ``max_pixels`` caps width*height (default: Pillow's ``Image.MAX_IMAGE_PIXELS``); an image over it
    raises ``Image.DecompressionBombError``, as does Pillow's own bomb warning, which is turned into an
    error here only (no global Pillow setting is changed), so ``max_pixels`` can lower Pillow's limit,
    not raise it. Decoding errors propagate (``OSError``, ``SyntaxError``, ...); truncated files are
    never accepted.
    """
    path = Path(path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", Image.DecompressionBombWarning)
        with Image.open(path) as probe:  # reads the header only
            check_pixels(probe, max_pixels)
            probe.verify()  # structural check (PNG chunk CRCs, ...); the object is unusable afterwards
        with Image.open(path) as image:
            image.load()  # full decode: catches truncated data that verify() does not
            return to_rgb(ImageOps.exif_transpose(image))


# ---------------------------------------------------------------------------------------- transforms
def resize_shorter_side(image: Image.Image, size: int) -> Image.Image:
    """Scale so the shorter side is ``size`` (torchvision's ``Resize(size)`` rounding), Lanczos."""
    width, height = image.size
    if width <= height:
        new_w, new_h = size, int(size * height / width)
    else:
        new_w, new_h = int(size * width / height), size
    if (new_w, new_h) == (width, height):
        return image
    return image.resize((new_w, new_h), Image.Resampling.LANCZOS)


def center_crop_box(height: int, width: int, size: int) -> tuple[int, int]:
    """``(top, left)`` of a centred ``size`` square, rounded as torchvision's CenterCrop does."""
    return int(round((height - size) / 2.0)), int(round((width - size) / 2.0))


def random_crop_box(height: int, width: int, size: int, rng: np.random.Generator) -> tuple[int, int]:
    """``(top, left)`` of a uniformly placed ``size`` square."""
    return int(rng.integers(0, height - size + 1)), int(rng.integers(0, width - size + 1))


def to_tensor(image: Image.Image) -> torch.Tensor:
    """8-bit RGB image -> float32 ``[3, H, W]`` in ``[-1, 1]``."""
    array = torch.from_numpy(np.array(image, dtype=np.uint8, copy=True))  # [H, W, 3]
    return array.permute(2, 0, 1).float().div_(127.5).sub_(1.0).contiguous()
