"""Subject folders: checking one up front, reading its caption sidecars.

A subject folder holds a handful of photos of one subject (DreamBooth style). Each image may have a
caption sidecar with the same stem (``dog_03.jpg`` + ``dog_03.txt``); images without one train on the
instance prompt. :func:`scan_subject_folder` checks the folder once, up front, and returns a
:class:`ScanReport` whose ``summary()`` the trainer prints.

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
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image

from .images import IMAGE_EXTENSIONS, check_pixels, load_rgb

CAPTION_SUFFIX = ".txt"


class DataError(ValueError):
    """A subject folder or image that cannot be trained on; the message names the path."""


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
                check_pixels(probe, max_pixels)
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
