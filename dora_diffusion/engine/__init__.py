"""What the Gradio app does, without the UI: compare, train, export, analyse, inside one workspace folder.

``Engine`` is a thin facade over two things:

- ``workspace.Workspace``: the folder (every path a user types stays inside it), uploads, the runs in it;
- ``jobs.Device``: one job on the device at a time, a generation, a merged export, an analysis or training
  runs (in a background thread, cancellable, their progress told by the trainer's own callback).

It holds one base pipeline (loaded on first use, once) and swaps adapters in and out of it in place, so
base | LoRA | DoRA come from the same weights and, with ``sampling.sample_columns``, the same initial noise.

Pure Python: the app calls it, the tests drive it directly.
"""

from __future__ import annotations

import shutil
import threading
import time
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from ..config import TrainConfig
from ..sampling import SampleSettings
from ..subject_folder import ScanReport
from .errors import USER_ERRORS, EngineBusy, EngineError, is_user_error, user_message
from .jobs import Device, TrainingJob, TrainProgress
from .workspace import ANALYSIS_DIR, DEFAULT_LIMITS, EXPORTS_DIR, UPLOADS_DIR, Limits, Run, Workspace, slug

EXPORT_FORMATS = ("diffusers", "kohya", "comfyui", "merged-folder", "merged-single")
EXPORT_DTYPES = ("float32", "float16", "bfloat16")
TRAIN_METHODS = ("lora", "dora", "both")

_TRAIN_DEFAULTS = TrainConfig().to_flat()


class Generation(NamedTuple):
    label: str
    image: Any  # PIL.Image.Image
    seconds: float


@dataclass
class TrainRequest:
    """What the Train tab asks for; turned into one ``TrainConfig`` per method by ``Engine.train_configs``.
    The defaults are ``TrainConfig``'s."""

    data: str
    prompt: str
    name: str = ""
    """Run folder in the workspace (``<name>/lora``, ``<name>/dora``); default: from the prompt and the time."""
    method: str = _TRAIN_DEFAULTS["method"]
    """'lora', 'dora' or 'both' (LoRA then DoRA, same seed)."""
    rank: int = _TRAIN_DEFAULTS["rank"]
    steps: int = _TRAIN_DEFAULTS["max_steps"]
    learning_rate: float = _TRAIN_DEFAULTS["learning_rate"]
    seed: int = _TRAIN_DEFAULTS["seed"]
    resolution: int | None = _TRAIN_DEFAULTS["resolution"]
    validation_steps: int | None = None
    """Validation images every N steps; default: four times per run."""
    batch_size: int = _TRAIN_DEFAULTS["batch_size"]
    num_validation_images: int = _TRAIN_DEFAULTS["num_validation_images"]
    validation_inference_steps: int = _TRAIN_DEFAULTS["validation_inference_steps"]
    report_to: str = _TRAIN_DEFAULTS["report_to"]


class Engine:
    """The app's logic. ``model``: a local diffusers folder or cached hub id; ``None``: the embedded tiny SDXL."""

    def __init__(
        self,
        model: str | None = None,
        workspace: str | Path = "outputs",
        *,
        device: str | None = None,
        dtype: Any = None,
        limits: Limits = DEFAULT_LIMITS,
    ) -> None:
        self.model = str(model) if model else None
        self.space = Workspace(workspace, limits)
        self.workspace = self.space.root
        self.limits = limits
        self.jobs = Device()
        self._device_name = device
        self._dtype = dtype
        self._pipe = None
        self.pipe_loads = 0
        """How many times the base pipeline was loaded (once, however many comparisons)."""
        self._pipe_lock = threading.Lock()
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
        return self.model or "tiny SDXL (embedded, pretrained on the toy world: for trying the workflow)"

    @property
    def pipe(self):
        """The base pipeline, loaded on first use and kept; adapters are swapped in and out of it."""
        with self._pipe_lock:
            if self._pipe is None:
                import torch

                from ..models import load_pipeline

                dtype = self._dtype or (torch.float16 if self.device.startswith("cuda") else torch.float32)
                pipe = load_pipeline(self.model, dtype=dtype, device=self.device)
                pipe.set_progress_bar_config(disable=True)
                self._pipe = pipe
                self.pipe_loads += 1
            return self._pipe

    def native_size(self) -> int:
        """The model's native image size (1024 for SDXL, 64 for the embedded model), read from its config files."""
        if self._native is None:
            from ..models import model_folder, native_resolution, resolve_model

            self._native = native_resolution(model_folder(resolve_model(self.model)))
        return self._native

    # ------------------------------------------------------------------------- the workspace

    def safe_path(self, text: str | Path | None, *, must_exist: bool = False, what: str = "path") -> Path:
        return self.space.safe_path(text, must_exist=must_exist, what=what)

    def relative(self, path: Path) -> str:
        return self.space.relative(path)

    def list_runs(self) -> list[Run]:
        return self.space.list_runs()

    def default_runs(self) -> tuple[str | None, str | None]:
        return self.space.default_runs()

    def adapter_path(self, text: str, what: str = "adapter") -> Path:
        return self.space.adapter_path(text, what)

    def scan(self, folder: str | Path, resolution: int | None = None) -> ScanReport:
        return self.space.scan(folder, resolution or self.native_size())

    def save_uploads(
        self, files: Sequence[str | Path], resolution: int | None = None, *, name: str = "upload"
    ) -> tuple[Path, str]:
        return self.space.save_uploads(files, resolution or self.native_size(), name=name)

    def use_sample_subject(self, resolution: int | None = None) -> tuple[Path, str]:
        return self.space.use_sample_subject(resolution or self.native_size())

    @property
    def exports_dir(self) -> Path:
        return self.workspace / EXPORTS_DIR

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
        from ..sampling import Column, sample_columns

        self.check_settings(settings)
        columns = [Column("base")]
        for label, text, scale in (("LoRA", lora, lora_scale), ("DoRA", dora, dora_scale)):
            if text:
                if not 0 <= scale <= self.limits.max_adapter_scale:
                    raise EngineError(f"{label} scale: must be in 0..{self.limits.max_adapter_scale:g}, got {scale}")
                columns.append(Column(label, self.adapter_path(text, what=f"{label} adapter"), float(scale)))
        with self.jobs.use("generate images"):
            sampled = sample_columns(self.pipe, columns, [settings])
        return [Generation(c.label, c.images[0][0], c.seconds) for c in sampled]

    def score(
        self,
        settings: SampleSettings,
        lora: str | None = None,
        dora: str | None = None,
        *,
        class_prompt: str = "a photo of a toy",
        eval_seeds: int = 8,
    ) -> str:
        """Base, LoRA and DoRA scored on ``eval_seeds`` seeds of ``settings.prompt`` (subject fidelity, subject
        drawn) and of ``class_prompt`` (drift): the Markdown table and verdict lines shown under the images."""
        from ..models import model_folder, resolve_model
        from .scoring import score_columns

        self.check_settings(settings)
        if not 2 <= eval_seeds <= 64:
            raise EngineError(f"seeds to measure: must be in 2..64, got {eval_seeds}")
        adapters = {
            label: self.adapter_path(text, what=f"{label} adapter")
            for label, text in (("LoRA", lora), ("DoRA", dora))
            if text
        }
        with self.jobs.use("measure adapters"):
            _, text = score_columns(
                self.pipe,
                model_folder(resolve_model(self.model)),
                adapters,
                settings.prompt,
                class_prompt,
                eval_seeds,
                settings.steps,
                settings.guidance,
            )
        return text

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
        run = self.safe_path(r.name or f"{slug(r.prompt)}-{time.strftime('%Y%m%d-%H%M%S')}", what="run name")
        if self.space.is_own_folder(run):
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
                )
            )
        return configs

    @property
    def training(self) -> bool:
        return self.jobs.training

    @property
    def job(self) -> TrainingJob | None:
        return self.jobs.job

    def start_training(self, request: TrainRequest) -> TrainingJob:
        """Check the request and the images, then train in a background thread (one job at a time)."""
        self.jobs.refuse_if_training()  # first: the run going may hold the very folder asked for (its lock file)
        configs = self.train_configs(request)
        self.scan(configs[0].data, configs[0].resolution)  # bad images fail here, not in the thread
        return self.jobs.start_training(configs, shown=self.space.shown)

    def cancel_training(self) -> bool:
        """Ask the running job to stop after its current step (it keeps a checkpoint); False if none runs."""
        return self.jobs.cancel_training()

    def training_progress(self) -> TrainProgress:
        return self.jobs.training_progress()

    # ------------------------------------------------------------------------------------- export

    def export(self, run: str, format: str, dtype: str = "float32") -> Path:
        """Export a run with ``dora_diffusion.export.export_adapter`` into ``exports/``; a folder is zipped.

        Returns the file to download. ``model``: the engine's, else the one the run was trained on.
        """
        if format not in EXPORT_FORMATS:
            raise EngineError(f"format: one of {', '.join(EXPORT_FORMATS)}, got {format!r}")
        if dtype not in EXPORT_DTYPES:
            raise EngineError(f"dtype: one of {', '.join(EXPORT_DTYPES)}, got {dtype!r}")
        adapter = self.adapter_path(run, what="run")
        from ..export import export_adapter

        self.exports_dir.mkdir(parents=True, exist_ok=True)
        suffix = "" if format == "merged-folder" else ".safetensors"
        out = self.space.unique(self.exports_dir / f"{slug(self.relative(adapter))}-{format}{suffix}")
        with self.jobs.use("export"):  # every format loads the base model to check the adapter against it
            result = Path(export_adapter(adapter, format, out, model=self.model, dtype=dtype))
        return _zipped(result, self.space.unique) if result.is_dir() else result

    # ----------------------------------------------------------------------------------- analysis

    def analyze(self, runs: Sequence[str]) -> tuple[Path, str]:
        """The DoRA paper's weight-decomposition analysis (§3.2) of ``runs`` (workspace paths): ΔD vs ΔM
        per layer and checkpoint. Writes ``analysis/<names>-<n>/decomposition.{png,csv,json}``; returns
        the plot and a text summary."""
        from ..analysis import analyze

        if not runs:
            raise EngineError("Pick at least one run to analyze.")
        paths = [self.adapter_path(r, what="run") for r in runs]
        paths = [p.parent if p.is_file() else p for p in paths]
        out = self.space.new_folder(ANALYSIS_DIR, "-".join(slug(p.name) for p in paths)[:60] or "runs")
        with self.jobs.use("analysis"):
            summary = analyze([str(p) for p in paths], out, model=self.model)
        return Path(summary["files"]["png"]), summary["text"]


def _zipped(folder: Path, unique) -> Path:
    """``folder`` as one uncompressed zip beside it (rw-r--r-- entries), the folder removed."""
    for path in (folder, *folder.rglob("*")):  # mkdtemp's 0700 (0600 files) would travel in the zip
        path.chmod(0o755 if path.is_dir() else 0o644)
    archive = unique(folder.with_name(folder.name + ".zip"))
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as z:  # safetensors do not compress
        for file in sorted(folder.rglob("*")):
            if file.is_file():
                z.write(file, Path(folder.name) / file.relative_to(folder))
    archive.chmod(0o644)
    shutil.rmtree(folder)  # the zip is the download; the folder beside it would be a second copy
    return archive


__all__ = [
    "EXPORTS_DIR",
    "EXPORT_DTYPES",
    "EXPORT_FORMATS",
    "TRAIN_METHODS",
    "UPLOADS_DIR",
    "USER_ERRORS",
    "Engine",
    "EngineBusy",
    "EngineError",
    "Generation",
    "Limits",
    "Run",
    "TrainProgress",
    "TrainRequest",
    "TrainingJob",
    "is_user_error",
    "user_message",
]
