"""Subject folders: checking them, reading captions, and turning images into SDXL training examples.

A subject folder holds a handful of photos of one subject (DreamBooth style). Each image may have a
caption sidecar with the same stem (``dog_03.jpg`` + ``dog_03.txt``); images without one train on the
instance prompt. :func:`scan_subject_folder` checks the folder once, up front, and returns a
:class:`ScanReport` whose ``summary()`` the trainer prints; :class:`SubjectDataset` turns the images it
kept into tensors plus SDXL's micro-conditioning, and :func:`collate_examples` batches them.

What is skipped (with a warning, recorded in the report): files Pillow cannot decode (corrupt,
truncated, not really an image), images over the decompression-bomb pixel limit, and images whose
shorter side is far below the training resolution. Files of other types are ignored and counted.
Hidden files (``.DS_Store``, ``._IMG_0001.jpg``) and sub-folders are not looked at.

Symlinks are followed. One to a file outside the folder is used too (a folder of links into a photo
library is a common way to pick a subject's images), with a warning naming the link and its target, so
nothing from elsewhere trains unannounced; a dangling one is reported by name as broken.
"""

from __future__ import annotations

import collections
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageOps

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

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".bmp"})
"""Accepted image file suffixes (compared lower-cased)."""

CAPTION_SUFFIX = ".txt"


class DataError(ValueError):
    """A subject folder or image that cannot be trained on; the message names the path."""


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


def _check_pixels(image: Image.Image, max_pixels: int | None) -> None:
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
            _check_pixels(probe, max_pixels)
            probe.verify()  # structural check (PNG chunk CRCs, ...); the object is unusable afterwards
        with Image.open(path) as image:
            image.load()  # full decode: catches truncated data that verify() does not
            return to_rgb(ImageOps.exif_transpose(image))


# ---------------------------------------------------------------------------------------- scanning
@dataclass(frozen=True)
class ImageRecord:
    """One usable image of a subject folder."""

    path: Path
    """The image file."""
    width: int
    """Width as displayed, i.e. after EXIF orientation."""
    height: int
    """Height as displayed, i.e. after EXIF orientation."""
    caption: str | None = None
    """Text of the caption sidecar (``<stem>.txt``), or None to use the instance prompt."""

    @property
    def original_size(self) -> tuple[int, int]:
        """``(height, width)``, SDXL's ``original_size`` order."""
        return (self.height, self.width)


@dataclass
class ScanReport:
    """What :func:`scan_subject_folder` found: the images to train on and what it left out, and why."""

    folder: Path
    """The subject folder."""
    resolution: int
    """Training resolution the images were checked against."""
    used: list[ImageRecord] = field(default_factory=list)
    """Images to train on, sorted by file name."""
    skipped: list[tuple[Path, str]] = field(default_factory=list)
    """Image files left out, with the reason (corrupt, too small, too many pixels)."""
    ignored: list[Path] = field(default_factory=list)
    """Other entries: files of unsupported types, captions without an image, sub-folders."""
    linked_outside: list[tuple[Path, Path]] = field(default_factory=list)
    """Used images and captions that are symlinks to files outside the folder: (link, resolved target)."""
    broken_links: list[tuple[Path, Path]] = field(default_factory=list)
    """Symlinks whose target does not exist: (link, target as written in the link)."""

    def summary(self) -> str:
        """A few lines for the log: counts, sizes, captions, and everything that was left out."""
        lines = [
            f"Subject folder {self.folder} (resolution {self.resolution}): "
            f"{len(self.used)} image(s) used, {len(self.skipped)} skipped, {len(self.ignored)} ignored"
        ]
        if self.used:
            sizes = collections.Counter(f"{r.width}x{r.height}" for r in self.used)
            shorter = [min(r.width, r.height) for r in self.used]
            lines.append("  sizes: " + ", ".join(f"{s} ({n})" if n > 1 else s for s, n in sorted(sizes.items())))
            upscaled = sum(side < self.resolution for side in shorter)
            lines.append(
                f"  shorter side {min(shorter)}-{max(shorter)} px"
                + (f"; {upscaled} image(s) below {self.resolution} will be upscaled" if upscaled else "")
            )
            captioned = [r for r in self.used if r.caption is not None]
            lines.append(
                f"  captions: {len(captioned)} from .txt sidecars, "
                f"{len(self.used) - len(captioned)} use the instance prompt"
            )
            lines.extend(f"    {r.path.name}: {r.caption!r}" for r in captioned)
        for path, reason in self.skipped:
            lines.append(f"  skipped {path.name}: {reason}")
        for link, target in self.linked_outside:
            lines.append(f"  outside the folder (symlink, used): {link.name} -> {target}")
        for link, target in self.broken_links:
            lines.append(f"  broken symlink {link.name} -> {target}: its target does not exist")
        if self.ignored:
            kinds = collections.Counter(_kind(p) for p in self.ignored)
            lines.append("  ignored: " + ", ".join(f"{k} ({n})" for k, n in sorted(kinds.items())))
        return "\n".join(lines)


def _kind(path: Path) -> str:
    """How an ignored entry is described: its suffix, 'folder' or 'no suffix'."""
    if path.is_dir():
        return "folder"
    return path.suffix.lower() or "no suffix"


def read_caption(image_path: Path) -> str | None:
    """The stripped text of ``<stem>.txt`` beside the image; None if there is none or it is empty."""
    caption_path = image_path.with_suffix(CAPTION_SUFFIX)
    if not caption_path.is_file():
        return None
    try:
        text = caption_path.read_text(encoding="utf-8-sig").strip()  # -sig: tolerate a BOM
    except UnicodeDecodeError as exc:
        raise DataError(f"Caption file {caption_path} is not valid UTF-8: {exc}") from exc
    return text or None


class _Skip(Exception):
    """Internal: an image that is left out; the message is the reason."""


def _check_image(path: Path, resolution: int, min_side_ratio: float, max_pixels: int | None) -> tuple[int, int]:
    """``(width, height)`` as displayed; raises :class:`_Skip` naming why the image cannot be used."""
    min_side = min_side_ratio * resolution
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as probe:
                _check_pixels(probe, max_pixels)
                if min(probe.size) < min_side:  # rotation does not change the shorter side
                    raise _Skip(
                        f"too small: {probe.width}x{probe.height}, shorter side {min(probe.size)} px "
                        f"< {min_side:g} ({min_side_ratio:g} x resolution {resolution})"
                    )
        image = load_rgb(path, max_pixels=max_pixels)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
        raise _Skip(f"refused as a possible decompression bomb: {exc}") from exc
    except _Skip:
        raise
    except Exception as exc:  # Pillow's decoders raise many types (OSError, SyntaxError, struct.error...)
        raise _Skip(f"cannot be decoded, corrupt or truncated ({type(exc).__name__}: {exc})") from exc
    return image.size


def scan_subject_folder(
    folder: str | Path,
    resolution: int,
    *,
    min_side_ratio: float = 0.5,
    max_pixels: int | None = None,
) -> ScanReport:
    """Check a subject folder and list the images to train on.

    Every accepted image is fully decoded once here, so a broken file is found before training starts,
    not at step 500. Skipped images raise a ``UserWarning`` naming the file and are listed in
    ``report.skipped``.

    Args:
        folder: the subject folder (not searched recursively).
        resolution: training resolution (square side, px).
        min_side_ratio: skip images whose shorter side is below ``min_side_ratio * resolution``.
        max_pixels: skip images with more pixels than this (default: Pillow's decompression-bomb limit).

    Raises:
        DataError: the folder is missing, not a folder, empty, holds no image files, or every image
            was skipped; also for a caption file that is not UTF-8.
    """
    if resolution <= 0:
        raise DataError(f"resolution must be positive, got {resolution}")
    folder = Path(folder)
    if not folder.exists():
        raise DataError(f"Subject folder not found: {folder}")
    if not folder.is_dir():
        raise DataError(f"Subject folder is not a folder: {folder}")

    entries = sorted(p for p in folder.iterdir() if not p.name.startswith("."))
    if not entries:
        raise DataError(f"Subject folder is empty: {folder}")
    report = ScanReport(folder=folder, resolution=resolution)
    report.broken_links = [(p, Path(os.readlink(p))) for p in entries if p.is_symlink() and not p.exists()]
    for link, target in report.broken_links:
        warnings.warn(f"Skipping {link}: broken symlink to {target}, which does not exist", UserWarning, stacklevel=2)
    entries = [p for p in entries if p.exists()]
    images = [p for p in entries if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS]
    image_set, image_stems = set(images), {p.stem for p in images}
    captions = [p for p in entries if p.suffix == CAPTION_SUFFIX and p.stem in image_stems and p.is_file()]
    report.ignored = [p for p in entries if p not in image_set and p not in captions]
    if not images:
        found = ", ".join(f"{k} ({n})" for k, n in sorted(collections.Counter(map(_kind, entries)).items()))
        broken = (
            "; broken symlinks: " + ", ".join(p.name for p, _ in report.broken_links) if report.broken_links else ""
        )
        raise DataError(
            f"No images in {folder}: found {found or 'nothing usable'}{broken}; "
            f"accepted types are {', '.join(sorted(IMAGE_EXTENSIONS))}"
        )

    for path in images:
        try:
            width, height = _check_image(path, resolution, min_side_ratio, max_pixels)
        except _Skip as skip:
            reason = str(skip)
            warnings.warn(f"Skipping {path}: {reason}", UserWarning, stacklevel=2)
            report.skipped.append((path, reason))
            continue
        report.used.append(ImageRecord(path, width, height, read_caption(path)))

    if not report.used:
        reasons = "; ".join(f"{p.name}: {r}" for p, r in report.skipped)
        raise DataError(f"No usable images in {folder}: all {len(report.skipped)} were skipped ({reasons})")
    inside = folder.resolve()
    used = [r.path for r in report.used] + [c for c in captions if c.stem in {r.path.stem for r in report.used}]
    for link in sorted(p for p in used if p.is_symlink()):
        target = link.resolve()
        if inside not in target.parents:
            warnings.warn(f"{link} is a symlink to {target}, outside {folder}; it is used", UserWarning, stacklevel=2)
            report.linked_outside.append((link, target))
    return report


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
