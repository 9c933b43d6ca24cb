"""The workspace: the one folder the app reads and writes. Every path a user types goes through
``Workspace.safe_path``, which keeps it inside; uploads are copied into new folders under ``uploads/``,
checked as training folders; the runs in it are listed from their adapter files' metadata."""

from __future__ import annotations

import contextlib
import re
import shutil
import time
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from .. import runs
from ..formats import AdapterFileError, resolve_adapter_file
from ..images import IMAGE_EXTENSIONS
from ..subject_folder import ScanReport, scan_subject_folder
from .errors import EngineError

UPLOADS_DIR = "uploads"
EXPORTS_DIR = "exports"
ANALYSIS_DIR = "analysis"


@dataclass(frozen=True)
class Limits:
    """Bounds on every request, checked by the engine and used for the app's sliders."""

    min_size: int = 64
    max_size: int = 1536
    size_multiple: int = 8
    max_sample_steps: int = 150
    max_guidance: float = 30.0
    max_adapter_scale: float = 2.0
    max_prompt_chars: int = 1000
    max_rank: int = 128
    max_train_steps: int = 20_000
    max_batch_size: int = 8
    max_learning_rate: float = 1.0
    max_upload_files: int = 200
    max_upload_mb: int = 50


DEFAULT_LIMITS = Limits()


@dataclass(frozen=True)
class Run:
    """An adapter in the workspace: a folder holding ``pytorch_lora_weights.safetensors``."""

    name: str
    """Path relative to the workspace, with ``/`` (what the pickers show and send back)."""
    path: Path
    method: str
    rank: int | None
    steps: int | None
    base_model: str | None
    """The base model recorded with it; ``None``: the embedded model (or nothing recorded)."""
    modified: float

    @property
    def label(self) -> str:
        parts = [self.name, {"lora": "LoRA", "dora": "DoRA"}.get(self.method, self.method)]
        if self.rank:
            parts.append(f"r{self.rank}")
        if self.steps:
            parts.append(f"{self.steps} steps")
        return " · ".join(parts)


def slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "-", text).strip("-").lower()[:40] or "run"


def _safe_file_name(name: str) -> str:
    """A file name with no directory part, no leading dot (hidden files are not scanned), plain characters."""
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", Path(name).name).lstrip(".")
    return stem or "file"


def _adapter_metadata(file: Path) -> dict:
    try:
        return runs.adapter_metadata(file)
    except AdapterFileError:  # an unreadable file is listed with what we know; loading it later says why
        return {}


class Workspace:
    """The folder ``root`` (created if missing) and what is in it."""

    def __init__(self, root: str | Path, limits: Limits = DEFAULT_LIMITS) -> None:
        self.root = Path(root).expanduser().resolve()
        self.root.mkdir(parents=True, exist_ok=True)
        self.limits = limits

    # ------------------------------------------------------------------------------------- paths

    def safe_path(self, text: str | Path | None, *, must_exist: bool = False, what: str = "path") -> Path:
        """``text`` resolved inside the workspace, or ``EngineError``.

        Relative paths are taken from the workspace (``demo/dora``), or from the working directory when
        that lands inside the workspace (``outputs/demo/dora``). Absolute paths, ``..`` and symlinks are
        resolved first, and the result must lie in the workspace.
        """
        raw = str(text or "").strip()
        if not raw:
            raise EngineError(f"{what}: empty; give a folder inside the workspace {self.root}")
        if "\x00" in raw:
            raise EngineError(f"{what}: contains a NUL character")
        given = Path(raw).expanduser()
        candidates = [given] if given.is_absolute() else [self.root / given, Path.cwd() / given]
        inside = []
        for candidate in candidates:
            resolved = candidate.resolve()
            if resolved == self.root or self.root in resolved.parents:
                inside.append(resolved)
        if not inside:
            raise EngineError(
                f"{what}: {raw!r} is outside the workspace folder {self.root}; only paths inside it can be used"
            )
        if must_exist:
            found = next((p for p in inside if p.exists()), None)
            if found is None:
                raise EngineError(f"{what}: {raw!r} does not exist in the workspace {self.root}")
            return found
        return next((p for p in inside if p.exists()), inside[0])

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.root).as_posix() or "."

    def shown(self, path: Path) -> str:
        """``path`` relative to the workspace when it lies inside, else as it is."""
        with contextlib.suppress(ValueError, TypeError):
            return self.relative(path)
        return str(path)

    def is_own_folder(self, path: Path) -> bool:
        """The workspace itself, or inside the folders the engine writes (uploads, exports)."""
        return (
            path == self.root
            or path.is_relative_to(self.root / UPLOADS_DIR)
            or path.is_relative_to(self.root / EXPORTS_DIR)
        )

    def new_folder(self, parent: str, stem: str) -> Path:
        """A new, empty folder ``<parent>/<stem>-<time>`` (numbered when that exists)."""
        root = self.root / parent
        root.mkdir(parents=True, exist_ok=True)
        base = f"{slug(stem)}-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in range(1, 1000):
            folder = root / (base if n == 1 else f"{base}-{n}")
            with contextlib.suppress(FileExistsError):
                folder.mkdir()
                return folder
        raise EngineError(f"could not make a new folder in {root}")

    @staticmethod
    def unique(path: Path) -> Path:
        """``path``, or ``path`` with ``-2``, ``-3``, ... : nothing already there is overwritten."""
        n, candidate = 1, path
        while candidate.exists() or candidate.with_suffix(".zip").exists():
            n += 1
            candidate = path.with_name(f"{path.stem}-{n}{path.suffix}")
        return candidate

    # -------------------------------------------------------------------------------------- runs

    def list_runs(self) -> list[Run]:
        """Every adapter folder in the workspace (recursively), by name."""
        found = []
        for file in sorted(self.root.rglob(runs.ADAPTER_NAME)):
            rel = file.parent.relative_to(self.root)
            if any(part.startswith(".") or part == runs.CHECKPOINT_DIR for part in rel.parts):
                continue
            meta = _adapter_metadata(file)
            unet = meta.get("components", {}).get("unet") or next(iter(meta.get("components", {}).values()), {})
            found.append(
                Run(
                    rel.as_posix() or ".",
                    file.parent,
                    unet.get("method", "?"),
                    unet.get("rank"),
                    meta.get("trained_steps"),
                    runs.model_from_record(meta.get("base_model")),
                    file.stat().st_mtime,
                )
            )
        return found

    def default_runs(self) -> tuple[str | None, str | None]:
        """The (LoRA, DoRA) runs to preselect: the demo's when present, else the newest of each method."""
        found = self.list_runs()
        picks = []
        for method in ("lora", "dora"):
            names = {r.name for r in found}
            if f"demo/{method}" in names:
                picks.append(f"demo/{method}")
                continue
            mine = sorted((r for r in found if r.method == method), key=lambda r: r.modified)
            picks.append(mine[-1].name if mine else None)
        return picks[0], picks[1]

    def adapter_path(self, text: str, what: str = "adapter") -> Path:
        """A user-given adapter (run name or path in the workspace), checked to hold a safetensors file."""
        path = self.safe_path(text, must_exist=True, what=what)
        try:
            resolve_adapter_file(path)
        except AdapterFileError as e:
            raise EngineError(f"{what}: {e}") from None
        return path

    # ------------------------------------------------------------------------------------ uploads

    def scan(self, folder: str | Path, resolution: int) -> ScanReport:
        """Check a subject folder in the workspace as training will (``DataError`` says what is wrong)."""
        path = self.safe_path(folder, must_exist=True, what="images folder")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # skipped images are listed in the report
            return scan_subject_folder(path, resolution)

    def save_uploads(self, files: Sequence[str | Path], resolution: int, *, name: str = "upload") -> tuple[Path, str]:
        """Copy uploaded files into a new folder under ``uploads/`` and check it as a training folder.

        Returns the folder and a summary. Only images and ``.txt`` captions are kept; a folder with no
        usable image is removed again and the ``DataError`` says why.
        """
        files = [Path(f) for f in files or []]
        if not files:
            raise EngineError("upload: no files; add subject images (jpg, png, webp, bmp)")
        if len(files) > self.limits.max_upload_files:
            raise EngineError(f"upload: {len(files)} files, at most {self.limits.max_upload_files}")
        folder = self.new_folder(UPLOADS_DIR, name)
        left_out = []
        try:
            for f in files:
                size = f.stat().st_size
                if size > self.limits.max_upload_mb * 2**20:
                    raise EngineError(
                        f"upload: {f.name} is {size / 2**20:.0f} MB, over the {self.limits.max_upload_mb} MB limit"
                    )
                kept = _safe_file_name(f.name)
                if Path(kept).suffix.lower() not in IMAGE_EXTENSIONS | {".txt"}:
                    left_out.append(f.name)
                    continue
                shutil.copyfile(f, self.unique(folder / kept))
            report = self.scan(folder, resolution)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        summary = report.summary()
        if left_out:
            summary += "\n  not saved (not an image or caption): " + ", ".join(left_out)
        return folder, summary

    def use_sample_subject(self, resolution: int) -> tuple[Path, str]:
        """Copy the repository's sample subject (``datasets/sks_toy``) into the workspace."""
        from ..demo import SAMPLE_DATA

        if not SAMPLE_DATA.is_dir():
            raise EngineError(
                f"The sample subject {SAMPLE_DATA} ships with the repository; run the app from a checkout."
            )
        return self.save_uploads(sorted(SAMPLE_DATA.iterdir()), resolution, name=SAMPLE_DATA.name)
