"""Turning a subject folder's images into SDXL training examples: :class:`SubjectDataset` gives tensors
plus SDXL's micro-conditioning, :func:`collate_examples` batches them. The folder's check is
``subject_folder``'s, the image decoding and transforms ``images``'; their names are re-exported here.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image

from .images import (
    IMAGE_EXTENSIONS,
    center_crop_box,
    load_rgb,
    random_crop_box,
    resize_shorter_side,
    to_rgb,
    to_tensor,
)
from .subject_folder import DataError, ImageRecord, ScanReport, read_caption, scan_subject_folder

__all__ = [
    "IMAGE_EXTENSIONS",
    "DataError",
    "ImageRecord",
    "ScanReport",
    "SubjectDataset",
    "center_crop_box",
    "collate_examples",
    "load_rgb",
    "random_crop_box",
    "read_caption",
    "resize_shorter_side",
    "scan_subject_folder",
    "to_rgb",
    "to_tensor",
]


# ---------------------------------------------------------------------------------------- dataset
class SubjectDataset(torch.utils.data.Dataset):
    """Training examples from a subject folder: resize, crop, optional flip, SDXL micro-conditioning.

    Randomness (crop position, flip) comes from a generator seeded with ``(seed, epoch, index)``, so an
    example depends on nothing but those three numbers: two runs with the same seed see the same
    pixels, and a resumed run can ``set_epoch`` and continue exactly. With DataLoader workers, call
    ``set_epoch`` before each epoch's iterator is created (i.e. do not use ``persistent_workers``).

    Each example is a dict:
        ``pixel_values``: float32 ``[3, resolution, resolution]`` in ``[-1, 1]``;
        ``prompt``: the caption sidecar's text, else the instance prompt;
        ``original_size``: ``(h, w)`` of the image before resizing (after EXIF orientation);
        ``crop_top_left``: ``(top, left)`` of the crop in the resized image; when flipped, ``left`` is
            measured in the flipped image (``resized_width - left - resolution``), as diffusers'
            ``train_dreambooth_lora_sdxl.py`` does by flipping before it crops;
        ``target_size``: ``(resolution, resolution)``;
        ``path``: the image file, as a string.
    """

    def __init__(
        self,
        source: ScanReport | str | Path,
        instance_prompt: str,
        resolution: int,
        *,
        center_crop: bool = False,
        flip_p: float = 0.0,
        seed: int = 0,
        preload: bool = True,
    ) -> None:
        """
        Args:
            source: a :class:`ScanReport`, or a folder to scan at ``resolution``.
            instance_prompt: prompt for images without a caption sidecar, e.g. ``"a photo of sks toy"``.
            resolution: side of the square training crop, px.
            center_crop: centre crop; otherwise a random crop per example.
            flip_p: probability of a horizontal flip (0.5 is usual; 0 for subjects with text or logos).
            seed: base seed for crop and flip.
            preload: decode and resize every image once now (subject datasets are small).
        """
        if not instance_prompt.strip():
            raise DataError("instance_prompt is empty")
        if resolution <= 0:
            raise DataError(f"resolution must be positive, got {resolution}")
        if not 0.0 <= flip_p <= 1.0:
            raise DataError(f"flip_p must be in [0, 1], got {flip_p}")
        self.report = source if isinstance(source, ScanReport) else scan_subject_folder(source, resolution)
        self.records: list[ImageRecord] = list(self.report.used)
        self.instance_prompt = instance_prompt
        self.resolution = resolution
        self.center_crop = center_crop
        self.flip_p = flip_p
        self.seed = seed
        self.epoch = 0
        self._resized: list[Image.Image] | None = (
            [self._load_resized(i) for i in range(len(self.records))] if preload else None
        )

    def __len__(self) -> int:
        return len(self.records)

    def set_epoch(self, epoch: int) -> None:
        """Select the epoch whose crops and flips ``__getitem__`` returns."""
        self.epoch = epoch

    def __getitem__(self, index: int) -> dict[str, Any]:
        return self.example(index, self.epoch)

    def _load_resized(self, index: int) -> Image.Image:
        return resize_shorter_side(load_rgb(self.records[index].path), self.resolution)

    def example(self, index: int, epoch: int) -> dict[str, Any]:
        """The example for ``index`` in ``epoch``; a pure function of (seed, epoch, index)."""
        record = self.records[index]
        image = self._resized[index] if self._resized is not None else self._load_resized(index)
        size = self.resolution
        rng = np.random.default_rng([self.seed, epoch, index])
        flip = bool(rng.random() < self.flip_p)  # drawn first, always: crop draws stay aligned
        if self.center_crop:
            top, left = center_crop_box(image.height, image.width, size)
        else:
            top, left = random_crop_box(image.height, image.width, size, rng)
        crop = image.crop((left, top, left + size, top + size))
        if flip:
            crop = crop.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            left = image.width - left - size  # the same crop, seen in the flipped image
        return {
            "pixel_values": to_tensor(crop),
            "prompt": record.caption if record.caption is not None else self.instance_prompt,
            "original_size": record.original_size,
            "crop_top_left": (top, left),
            "target_size": (size, size),
            "path": str(record.path),
        }


def collate_examples(examples: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Batch examples: ``pixel_values [B, 3, H, W]``, ``prompts``, ``paths``, and ``add_time_ids``.

    ``add_time_ids`` is a LongTensor ``[B, 6]``: ``original_size + crop_top_left + target_size`` per
    example, the order SDXL's UNet expects (cast it to the model dtype at use).
    """
    if not examples:
        raise ValueError("collate_examples needs at least one example")
    time_ids = [tuple(e["original_size"]) + tuple(e["crop_top_left"]) + tuple(e["target_size"]) for e in examples]
    return {
        "pixel_values": torch.stack([e["pixel_values"] for e in examples]).contiguous(),
        "prompts": [e["prompt"] for e in examples],
        "add_time_ids": torch.tensor(time_ids, dtype=torch.long),
        "paths": [e["path"] for e in examples],
    }
