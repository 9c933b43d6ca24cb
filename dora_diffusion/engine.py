"""What the Gradio app does, without the UI: compare, train, export, inside one workspace folder.

``Engine`` holds one base pipeline (loaded on first use, once) and swaps adapters in and out of it
in place, so base | LoRA | DoRA come from the same weights and, with ``sampling.generate``, the same
initial noise. It runs one job at a time on the device: a generation, a merged export or a training
run (in a background thread, cancellable, progress read back from the run's own files). Every path a
user types goes through ``safe_path``, which keeps it inside the workspace.

Pure Python: the app calls it, the tests drive it directly.
"""

from __future__ import annotations

import contextlib
import logging
import re
import shutil
import statistics
import threading
import time
import traceback
import warnings
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

from . import runs
from .config import ConfigError, TrainConfig
from .data import IMAGE_EXTENSIONS, DataError, ScanReport, scan_subject_folder
from .formats import AdapterFileError, resolve_adapter_file
from .inject import AdapterError
from .sampling import SampleSettings

log = logging.getLogger(__name__)

EXPORT_FORMATS = ("diffusers", "kohya", "comfyui", "merged-folder", "merged-single")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")
TRAIN_METHODS = ("lora", "dora", "both")
UPLOADS_DIR = "uploads"
EXPORTS_DIR = "exports"


class EngineError(ValueError):
    """A request the engine refuses; the message says what to change."""


class EngineBusy(EngineError):
    """The device is running another job (one generation, export or training at a time)."""


USER_ERRORS = (EngineError, ConfigError, DataError, AdapterError, FileExistsError, ValueError)


def user_message(error: BaseException) -> str:
    """The message to show for ``error``: its own for bad input, a short line (no traceback) otherwise."""
    from .models import ModelNotFoundError

    if isinstance(error, (*USER_ERRORS, ModelNotFoundError)):
        return str(error)
    return f"Unexpected error ({type(error).__name__}: {error}); the details are in the server log."


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


class Generation(NamedTuple):
    label: str
    image: Any  # PIL.Image.Image
    seconds: float


@dataclass
class TrainRequest:
    """What the Train tab asks for; turned into one ``TrainConfig`` per method by ``Engine.train_configs``."""

    data: str
    prompt: str
    name: str = ""
    """Run folder in the workspace (``<name>/lora``, ``<name>/dora``); default: from the prompt and the time."""
    method: str = "dora"
    """'lora', 'dora' or 'both' (LoRA then DoRA, same seed)."""
    rank: int = 8
    steps: int = 500
    learning_rate: float = 1e-4
    seed: int = 0
    resolution: int | None = None
    validation_steps: int | None = None
    """Validation images every N steps; default: four times per run."""
    batch_size: int = 1
    num_validation_images: int = 2
    validation_inference_steps: int = 25
    report_to: str = "tensorboard"


@dataclass
class TrainProgress:
    state: str
    """'idle', 'running', 'finished', 'cancelled' or 'failed'."""
    message: str = ""
    method: str | None = None
    step: int = 0
    max_steps: int = 0
    loss: float | None = None
    its: float | None = None
    eta_seconds: float | None = None
    losses: list[tuple[str, int, float]] = field(default_factory=list)
    """(method, step, loss) for every logged step of the job."""
    validation: list[tuple[Path, str]] = field(default_factory=list)
    """(image, caption), oldest first."""
    runs: list[Path] = field(default_factory=list)


def _slug(text: str) -> str:
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


class TrainingJob:
    """One or two training runs in a background thread; ``cancel()`` stops after the current step."""

    def __init__(self, configs: Sequence[TrainConfig], release: Any, workspace: Path | None = None) -> None:
        self.configs = list(configs)
        self.workspace = workspace
        self.results: list[Any] = []
        self.error: str | None = None
        self.started = time.time()
        self.finished: float | None = None
        self._stop = threading.Event()
        self._release = release
        self._thread = threading.Thread(target=self._run, name="dora-diffusion-train", daemon=True)

    def start(self) -> TrainingJob:
        self._thread.start()
        return self

    def _run(self) -> None:
        from .train import train

        try:
            for config in self.configs:
                if self._stop.is_set():
                    break
                result = train(config, should_stop=lambda step, loss: self._stop.is_set())
                self.results.append(result)
                if result.stopped:
                    break
        except BaseException as e:  # reported in the UI; the traceback goes to the server log
            self.error = user_message(e)
            log.error("training failed:\n%s", traceback.format_exc())
        finally:
            self.finished = time.time()
            self._release()

    @property
    def running(self) -> bool:
        return self.finished is None

    def _shown(self, path: Path) -> str:
        """``path`` relative to the workspace, as the app names runs."""
        with contextlib.suppress(ValueError, TypeError):
            return Path(path).resolve().relative_to(self.workspace).as_posix()
        return str(path)

    def cancel(self) -> None:
        self._stop.set()

    def wait(self, timeout: float | None = None) -> bool:
        self._thread.join(timeout)
        return not self._thread.is_alive()

    @property
    def state(self) -> str:
        if self.running:
            return "running"
        if self.error:
            return "failed"
        if len(self.results) == len(self.configs) and not any(r.stopped for r in self.results):
            return "finished"
        return "cancelled"

    def progress(self) -> TrainProgress:
        """Read back from the runs' own files: ``train_log.jsonl`` and ``validation/*.png``."""
        p = TrainProgress(state=self.state, runs=[Path(c.output) for c in self.configs])
        logs = []
        for config in self.configs:
            out = Path(config.output)
            rows = runs.read_log(out)
            logs.append(rows)
            p.losses += [(config.method, int(r["step"]), float(r["loss"])) for r in rows if "loss" in r]
            for image in runs.validation_images(out):
                p.validation.append((image.path, f"{config.method} · step {image.step} · seed {image.seed}"))
        # the run going on (or the one that failed), else the last one that ran
        done = len(self.results)
        index = max(0, min(done if self.running or self.error else done - 1, len(self.configs) - 1))
        config, rows = self.configs[index], logs[index]
        p.method, p.max_steps = config.method, config.max_steps
        if rows:
            last = rows[-1]
            p.step, p.loss = int(last["step"]), float(last["loss"])
            recent = [float(r["step_seconds"]) for r in rows[-10:] if r.get("step_seconds")]
            if recent:
                per_step = statistics.median(recent)
                p.its = 1.0 / per_step if per_step > 0 else None
                left = p.max_steps - p.step + sum(c.max_steps for c in self.configs[index + 1 :])
                p.eta_seconds = left * per_step
        name = {"lora": "LoRA", "dora": "DoRA"}.get(p.method, p.method)
        if p.state == "running":
            p.message = f"{name}: step {p.step}/{p.max_steps}" if rows else f"{name}: loading the model and the images…"
        elif p.state == "failed":
            p.message = f"Training failed: {self.error}"
        elif p.state == "cancelled":
            stopped = [r for r in self.results if r.stopped]
            where = f"; checkpoint kept at {self._shown(stopped[-1].adapter_file)}" if stopped else ""
            p.message = (
                f"Cancelled at {name} step {p.step}{where}. Resume it with `dora-diffusion train ... --resume latest`."
            )
        else:
            p.message = "Finished: " + ", ".join(self._shown(r.adapter_file.parent) for r in self.results)
        return p


class Engine:
    """The app's logic. ``model``: a local diffusers folder or cached hub id; ``None``: the embedded tiny SDXL."""

    def __init__(
        self,
        model: str | None = None,
        workspace: str | Path = "outputs",
        *,
        device: str | None = None,
        dtype: Any = None,
        limits: Limits = Limits(),
    ) -> None:
        self.model = str(model) if model else None
        self.workspace = Path(workspace).expanduser().resolve()
        self.workspace.mkdir(parents=True, exist_ok=True)
        self.limits = limits
        self._device_name = device
        self._dtype = dtype
        self._pipe = None
        self.pipe_loads = 0
        """How many times the base pipeline was loaded (once, however many comparisons)."""
        self._pipe_lock = threading.Lock()
        self._device = threading.Lock()  # one job on the device at a time
        self._job: TrainingJob | None = None
        self._native: int | None = None

    # ------------------------------------------------------------------------------------- model

    @property
    def device(self) -> str:
        if self._device_name is None:
            import torch

            self._device_name = "cuda" if torch.cuda.is_available() else "cpu"
        return self._device_name

    @property
    def model_label(self) -> str:
        return self.model or "tiny SDXL (embedded, random weights: for trying the workflow, not for pictures)"

    @property
    def pipe(self):
        """The base pipeline, loaded on first use and kept; adapters are swapped in and out of it."""
        with self._pipe_lock:
            if self._pipe is None:
                import torch

                from .models import load_pipeline

                dtype = self._dtype or (torch.float16 if self.device.startswith("cuda") else torch.float32)
                pipe = load_pipeline(self.model, dtype=dtype, device=self.device)
                pipe.set_progress_bar_config(disable=True)
                self._pipe = pipe
                self.pipe_loads += 1
            return self._pipe

    def native_size(self) -> int:
        """The model's native image size (1024 for SDXL, 128 for the tiny model), read from its config files."""
        if self._native is None:
            from .models import model_folder, native_resolution, resolve_model

            self._native = native_resolution(model_folder(resolve_model(self.model)))
        return self._native

    # ------------------------------------------------------------------------------------- paths

    def safe_path(self, text: str | Path | None, *, must_exist: bool = False, what: str = "path") -> Path:
        """``text`` resolved inside the workspace, or ``EngineError``.

        Relative paths are taken from the workspace (``demo/dora``), or from the working directory when
        that lands inside the workspace (``outputs/demo/dora``). Absolute paths, ``..`` and symlinks are
        resolved first, and the result must lie in the workspace.
        """
        raw = str(text or "").strip()
        if not raw:
            raise EngineError(f"{what}: empty; give a folder inside the workspace {self.workspace}")
        if "\x00" in raw:
            raise EngineError(f"{what}: contains a NUL character")
        given = Path(raw).expanduser()
        candidates = [given] if given.is_absolute() else [self.workspace / given, Path.cwd() / given]
        inside = []
        for candidate in candidates:
            resolved = candidate.resolve()
            if resolved == self.workspace or self.workspace in resolved.parents:
                inside.append(resolved)
        if not inside:
            raise EngineError(
                f"{what}: {raw!r} is outside the workspace folder {self.workspace}; only paths inside it can be used"
            )
        if must_exist:
            found = next((p for p in inside if p.exists()), None)
            if found is None:
                raise EngineError(f"{what}: {raw!r} does not exist in the workspace {self.workspace}")
            return found
        return next((p for p in inside if p.exists()), inside[0])

    def relative(self, path: Path) -> str:
        return Path(path).resolve().relative_to(self.workspace).as_posix() or "."

    def _new_folder(self, parent: str, stem: str) -> Path:
        root = self.workspace / parent
        root.mkdir(parents=True, exist_ok=True)
        base = f"{_slug(stem)}-{time.strftime('%Y%m%d-%H%M%S')}"
        for n in range(1, 1000):
            folder = root / (base if n == 1 else f"{base}-{n}")
            with contextlib.suppress(FileExistsError):
                folder.mkdir()
                return folder
        raise EngineError(f"could not make a new folder in {root}")

    def _unique(self, path: Path) -> Path:
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
        for file in sorted(self.workspace.rglob(runs.ADAPTER_NAME)):
            rel = file.parent.relative_to(self.workspace)
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
        runs = self.list_runs()
        picks = []
        for method in ("lora", "dora"):
            names = {r.name for r in runs}
            if f"demo/{method}" in names:
                picks.append(f"demo/{method}")
                continue
            mine = sorted((r for r in runs if r.method == method), key=lambda r: r.modified)
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

    # ----------------------------------------------------------------------------------- compare

    def check_settings(self, s: SampleSettings) -> SampleSettings:
        L = self.limits
        if not s.prompt or not s.prompt.strip():
            raise EngineError("prompt: empty; describe the image to generate")
        if len(s.prompt) > L.max_prompt_chars or len(s.negative_prompt or "") > L.max_prompt_chars:
            raise EngineError(f"prompt: longer than {L.max_prompt_chars} characters")
        for name in ("width", "height"):
            v = getattr(s, name)
            if v is not None and (v % L.size_multiple or not L.min_size <= v <= L.max_size):
                raise EngineError(
                    f"{name}: must be a multiple of {L.size_multiple} in {L.min_size}..{L.max_size}, got {v}"
                )
        if not 1 <= s.steps <= L.max_sample_steps:
            raise EngineError(f"steps: must be in 1..{L.max_sample_steps}, got {s.steps}")
        if not 0 <= s.guidance <= L.max_guidance:
            raise EngineError(f"guidance: must be in 0..{L.max_guidance:g}, got {s.guidance}")
        if not 0 <= s.seed < 2**32:
            raise EngineError(f"seed: must be in 0..{2**32 - 1}, got {s.seed}")
        return s

    @contextlib.contextmanager
    def _on_device(self, what: str) -> Iterator[None]:
        if self.training:
            raise EngineBusy(f"Cannot {what} while a training run uses the device; wait for it to finish or cancel it.")
        if not self._device.acquire(timeout=600):
            raise EngineBusy(f"Cannot {what}: the device stayed busy for 10 minutes.")
        try:
            yield
        finally:
            self._device.release()

    def compare(
        self,
        settings: SampleSettings,
        lora: str | None = None,
        dora: str | None = None,
        *,
        lora_scale: float = 1.0,
        dora_scale: float = 1.0,
    ) -> list[Generation]:
        """Base, then LoRA, then DoRA (those given), from the same initial noise; each with its generation time."""
        from .formats import load_adapter, unload_adapter
        from .sampling import generate

        self.check_settings(settings)
        columns: list[tuple[str, Path | None, float]] = [("base", None, 1.0)]
        for label, text, scale in (("LoRA", lora, lora_scale), ("DoRA", dora, dora_scale)):
            if text:
                if not 0 <= scale <= self.limits.max_adapter_scale:
                    raise EngineError(f"{label} scale: must be in 0..{self.limits.max_adapter_scale:g}, got {scale}")
                columns.append((label, self.adapter_path(text, what=f"{label} adapter"), float(scale)))
        out = []
        with self._on_device("generate images"):
            pipe = self.pipe
            try:
                for label, path, scale in columns:
                    if path is None:
                        unload_adapter(pipe)
                    else:
                        load_adapter(pipe, path, scale=scale)
                    started = time.perf_counter()
                    image = generate(pipe, settings)[0]
                    out.append(Generation(label, image, time.perf_counter() - started))
            finally:
                unload_adapter(pipe)
        return out

    # ------------------------------------------------------------------------------------ uploads

    def scan(self, folder: str | Path, resolution: int | None = None) -> ScanReport:
        """Check a subject folder in the workspace as training will (``DataError`` says what is wrong)."""
        path = self.safe_path(folder, must_exist=True, what="images folder")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # skipped images are listed in the report
            return scan_subject_folder(path, resolution or self.native_size())

    def save_uploads(
        self, files: Sequence[str | Path], resolution: int | None = None, *, name: str = "upload"
    ) -> tuple[Path, str]:
        """Copy uploaded files into a new folder under ``uploads/`` and check it as a training folder.

        Returns the folder and a summary. Only images and ``.txt`` captions are kept; a folder with no
        usable image is removed again and the ``DataError`` says why.
        """
        files = [Path(f) for f in files or []]
        if not files:
            raise EngineError("upload: no files; add subject images (jpg, png, webp, bmp)")
        if len(files) > self.limits.max_upload_files:
            raise EngineError(f"upload: {len(files)} files, at most {self.limits.max_upload_files}")
        folder = self._new_folder(UPLOADS_DIR, name)
        left_out = []
        try:
            for f in files:
                size = f.stat().st_size
                if size > self.limits.max_upload_mb * 2**20:
                    raise EngineError(
                        f"upload: {f.name} is {size / 2**20:.0f} MB, over the {self.limits.max_upload_mb} MB limit"
                    )
                name = _safe_file_name(f.name)
                if Path(name).suffix.lower() not in IMAGE_EXTENSIONS | {".txt"}:
                    left_out.append(f.name)
                    continue
                target = self._unique(folder / name)
                shutil.copyfile(f, target)
            report = self.scan(folder, resolution)
        except BaseException:
            shutil.rmtree(folder, ignore_errors=True)
            raise
        summary = report.summary()
        if left_out:
            summary += "\n  not saved (not an image or caption): " + ", ".join(left_out)
        return folder, summary

    def use_sample_subject(self, resolution: int | None = None) -> tuple[Path, str]:
        """Copy the repository's sample subject (``datasets/sks_toy``) into the workspace."""
        from .demo import SAMPLE_DATA

        if not SAMPLE_DATA.is_dir():
            raise EngineError(
                f"The sample subject {SAMPLE_DATA} ships with the repository; run the app from a checkout."
            )
        return self.save_uploads(sorted(SAMPLE_DATA.iterdir()), resolution, name=SAMPLE_DATA.name)

    # ----------------------------------------------------------------------------------- training

    def train_configs(self, request: TrainRequest) -> list[TrainConfig]:
        """One validated ``TrainConfig`` per method; refuses bad values and existing run folders."""
        L, r = self.limits, request
        if r.method not in TRAIN_METHODS:
            raise EngineError(f"method: one of {', '.join(TRAIN_METHODS)}, got {r.method!r}")
        if not r.prompt or not r.prompt.strip():
            raise EngineError("instance prompt: empty; name the subject with a rare token, e.g. 'a photo of sks toy'")
        if len(r.prompt) > L.max_prompt_chars:
            raise EngineError(f"instance prompt: longer than {L.max_prompt_chars} characters")
        if not 1 <= r.rank <= L.max_rank:
            raise EngineError(f"rank: must be in 1..{L.max_rank}, got {r.rank}")
        if not 1 <= r.steps <= L.max_train_steps:
            raise EngineError(f"steps: must be in 1..{L.max_train_steps}, got {r.steps}")
        if not 0 < r.learning_rate <= L.max_learning_rate:
            raise EngineError(f"learning rate: must be in (0, {L.max_learning_rate:g}], got {r.learning_rate}")
        if not 1 <= r.batch_size <= L.max_batch_size:
            raise EngineError(f"batch size: must be in 1..{L.max_batch_size}, got {r.batch_size}")
        if r.resolution is not None and (
            r.resolution % L.size_multiple or not L.min_size <= r.resolution <= L.max_size
        ):
            raise EngineError(
                f"resolution: must be a multiple of {L.size_multiple} in {L.min_size}..{L.max_size}, got {r.resolution}"
            )
        data = self.safe_path(r.data, must_exist=True, what="images folder")
        run = self.safe_path(r.name or f"{_slug(r.prompt)}-{time.strftime('%Y%m%d-%H%M%S')}", what="run name")
        if (
            run == self.workspace
            or run.is_relative_to(self.workspace / UPLOADS_DIR)
            or run.is_relative_to(self.workspace / EXPORTS_DIR)
        ):
            raise EngineError(f"run name: {r.name!r} would write into the workspace's own folders; choose a new name")
        methods = ["lora", "dora"] if r.method == "both" else [r.method]
        validation = r.validation_steps if r.validation_steps is not None else max(1, r.steps // 4)
        configs = []
        for method in methods:
            out = run / method
            if out.exists() and any(out.iterdir()):
                raise EngineError(
                    f"run name: {self.relative(out)} already exists; choose another name (nothing was overwritten)"
                )
            configs.append(
                TrainConfig(
                    data=str(data),
                    prompt=r.prompt.strip(),
                    output=str(out),
                    model=self.model,
                    method=method,
                    rank=int(r.rank),
                    max_steps=int(r.steps),
                    learning_rate=float(r.learning_rate),
                    seed=int(r.seed),
                    resolution=r.resolution,
                    batch_size=int(r.batch_size),
                    validation_steps=int(validation),
                    num_validation_images=int(r.num_validation_images),
                    validation_inference_steps=int(r.validation_inference_steps),
                    report_to=r.report_to,
                    log_every=1,
                )
            )
        return configs

    @property
    def training(self) -> bool:
        return self._job is not None and self._job.running

    @property
    def job(self) -> TrainingJob | None:
        return self._job

    def start_training(self, request: TrainRequest) -> TrainingJob:
        """Check the request and the images, then train in a background thread (one job at a time)."""
        if self.training:  # first: the run going may hold the very folder asked for (its lock file)
            raise EngineBusy("A training run is already going; wait for it to finish or cancel it.")
        configs = self.train_configs(request)
        self.scan(configs[0].data, configs[0].resolution)  # bad images fail here, not in the thread
        if not self._device.acquire(blocking=False):
            raise EngineBusy("The device is generating images; start training again in a moment.")
        try:
            self._job = TrainingJob(configs, release=self._device.release, workspace=self.workspace).start()
        except BaseException:
            self._device.release()
            raise
        return self._job

    def cancel_training(self) -> bool:
        """Ask the running job to stop after its current step (it keeps a checkpoint); False if none runs."""
        if not self.training:
            return False
        self._job.cancel()
        return True

    def training_progress(self) -> TrainProgress:
        return self._job.progress() if self._job else TrainProgress(state="idle", message="No training run yet.")

    # ------------------------------------------------------------------------------------- export

    @property
    def exports_dir(self) -> Path:
        return self.workspace / EXPORTS_DIR

    def export(self, run: str, format: str, dtype: str = "float32") -> Path:
        """Export a run with ``dora_diffusion.export.export_adapter`` into ``exports/``; a folder is zipped.

        Returns the file to download. ``model``: the engine's, else the one the run was trained on.
        """
        if format not in EXPORT_FORMATS:
            raise EngineError(f"format: one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
        if dtype not in EXPORT_DTYPES:
            raise EngineError(f"dtype: one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
        adapter = self.adapter_path(run, what="run")
        from .export import export_adapter

        self.exports_dir.mkdir(parents=True, exist_ok=True)
        stem = _slug(self.relative(adapter))
        suffix = "" if format == "merged-folder" else ".safetensors"
        out = self._unique(self.exports_dir / f"{stem}-{format}{suffix}")
        with self._on_device("export"):  # every format loads the base model to check the adapter against it
            result = Path(export_adapter(adapter, format, out, model=self.model, dtype=dtype))
        if result.is_dir():
            for path in (result, *result.rglob("*")):  # mkdtemp's 0700 (0600 files) would travel in the zip
                path.chmod(0o755 if path.is_dir() else 0o644)
            archive = self._unique(result.with_name(result.name + ".zip"))
            with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:  # safetensors do not compress
                for file in sorted(result.rglob("*")):
                    if file.is_file():
                        z.write(file, Path(result.name) / file.relative_to(result))
            archive.chmod(0o644)
            shutil.rmtree(result)  # the zip is the download; the folder beside it would be a second copy
            return archive
        return result

    # ----------------------------------------------------------------------------------- analysis

    def analyze(self, runs: Sequence[str]) -> tuple[Path, str]:
        """The DoRA paper's weight-decomposition analysis (§3.2) of ``runs`` (workspace paths): ΔD vs ΔM
        per layer and checkpoint. Writes ``analysis/<names>-<n>/decomposition.{png,csv,json}``; returns
        the plot and a text summary."""
        from .analysis import analyze

        if not runs:
            raise EngineError("Pick at least one run to analyze.")
        paths = [self.adapter_path(r, what="run") for r in runs]
        paths = [p.parent if p.is_file() else p for p in paths]
        out = self._new_folder("analysis", "-".join(_slug(p.name) for p in paths)[:60] or "runs")
        with self._on_device("analysis"):
            summary = analyze([str(p) for p in paths], out, model=self.model)
        return Path(summary["files"]["png"]), summary["text"]
