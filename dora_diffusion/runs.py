"""A training run's folder: the one module that knows its layout.

``train`` writes a run folder, and ``engine``, ``analysis``, ``export`` and ``card`` read it; all of them
go through the names and functions here, so a file name or a marker is spelled once::

    <run>/
      pytorch_lora_weights.safetensors   the adapter (diffusers format), with our metadata entry
      comfyui/<run>.safetensors          the same adapter for ComfyUI and Forge
      training_config.json               the resolved options, the resolution, the trainable parameters
      train_log.jsonl                    one JSON row per logged step: step, loss, lr, step_seconds
      README.md                          the model card
      validation/step000100_seed0.png    validation images: step (6 digits) and seed
      checkpoints/checkpoint-<step>/     state.json (step, options), adapter.safetensors (our keys),
                                         optimizer.pt, scheduler.pt, rng-<rank>.pt
      unet/, text_encoder/, text_encoder_2/   full fine-tuning (``--method full``), instead of the adapter
                                         files: the tuned components as diffusers folders; its checkpoints
                                         hold weights.safetensors (the tuned layers) for adapter.safetensors
      logs/                              tensorboard
      ranks.json                         several processes: every rank's adapter checksum
      .train.lock                        held while a run writes here
    <run>/../class_images/<class prompt>/  prior-preservation images, kept for later runs

The base model a run used is recorded as the model the user gave (``training_config.json``,
``state.json``) and in the adapter file's metadata (``base_model``); the default model (``None``
everywhere) is recorded there as ``EMBEDDED_MODEL``, which ``base_model`` reads back as ``None``.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NamedTuple

from .formats import WEIGHT_NAME, AdapterFileError, resolve_adapter_file
from .formats.base import our_entry

ADAPTER_NAME = WEIGHT_NAME  # the run's adapter: the file diffusers' load_lora_weights looks for
CONFIG_NAME = "training_config.json"
LOG_NAME = "train_log.jsonl"
CARD_NAME = "README.md"
LOCK_NAME = ".train.lock"
RANKS_NAME = "ranks.json"
LOGS_DIR = "logs"
COMFYUI_DIR = "comfyui"
VALIDATION_DIR = "validation"
CHECKPOINT_DIR = "checkpoints"
CLASS_IMAGES_DIR = "class_images"

# inside checkpoints/checkpoint-<step>/
CHECKPOINT_PREFIX = "checkpoint-"
STATE_NAME = "state.json"
CHECKPOINT_ADAPTER_NAME = "adapter.safetensors"  # keys ``<component>.<module>.<param>``, no metadata
CHECKPOINT_WEIGHTS_NAME = "weights.safetensors"  # full fine-tuning: ``<component>.<layer>.<weight|bias>``
OPTIMIZER_NAME = "optimizer.pt"
SCHEDULER_NAME = "scheduler.pt"

EMBEDDED_MODEL = "embedded-tiny-sdxl"
"""What a run on the default model (``model=None``: ``models.embedded_model()``) records as its base model."""

_CHECKPOINT_RE = re.compile(re.escape(CHECKPOINT_PREFIX) + r"(\d+)")
_VALIDATION_RE = re.compile(r"step(\d+)_seed(\d+)\.png")


# --------------------------------------------------------------------------------------------
# The base model
# --------------------------------------------------------------------------------------------


def model_record(model: str | os.PathLike | None) -> str:
    """How ``model`` is recorded in an adapter file's metadata (``base_model``)."""
    return os.fspath(model) if model else EMBEDDED_MODEL


def model_from_record(recorded: Any) -> str | None:
    """The model a recorded ``base_model`` names; ``None`` (the default model) for the marker or nothing."""
    if recorded in (None, "", EMBEDDED_MODEL) or not isinstance(recorded, str):
        return None
    return recorded


def base_model(path: str | os.PathLike) -> str | None:
    """The base model a run, one of its checkpoints or an adapter file (or its folder) was trained on, as
    given to training (``None``: the default, embedded model). Read from the checkpoint's ``state.json``,
    the run's ``training_config.json`` next to it, else the adapter file's metadata."""
    p = Path(path)
    if is_checkpoint(p):
        return read_checkpoint_state(p).get("config", {}).get("model")
    config = read_run_config(p if p.is_dir() else p.parent)
    if config is not None:
        return config.get("model")
    return model_from_record(adapter_metadata(p).get("base_model"))


def base_model_folder(path: str | os.PathLike) -> Path:
    """The local folder of ``base_model(path)``: the shipped model for the default one."""
    from .models import model_folder, resolve_model

    return model_folder(resolve_model(base_model(path)))


def run_metadata(config: Any, resolution: int) -> dict[str, Any]:
    """What a run records in its adapter files' metadata (``config``: its ``TrainConfig``)."""
    return {
        "base_model": model_record(config.model),
        "instance_prompt": config.prompt,
        "trained_steps": config.max_steps,
        "resolution": resolution,
        "seed": config.seed,
    }


# --------------------------------------------------------------------------------------------
# Adapter files
# --------------------------------------------------------------------------------------------


def adapter_file(run: str | os.PathLike) -> Path:
    return Path(run) / ADAPTER_NAME


def comfyui_file(run: str | os.PathLike) -> Path:
    run = Path(run)
    return run / COMFYUI_DIR / f"{run.name}.safetensors"


def adapter_metadata(path: str | os.PathLike) -> dict[str, Any]:
    """Our metadata entry of an adapter file (or the adapter file of a folder), from its header only (no
    tensors are read): ``base_model``, ``trained_steps``, ``components`` (method, rank, alpha per
    component), an export's ``probe``... ``{}`` when it has none or the entry is not a JSON object.
    A path that is not a readable safetensors file: ``AdapterFileError`` naming it."""
    from safetensors import safe_open

    file = resolve_adapter_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = f.metadata() or {}
    except Exception as e:  # safetensors' own error types
        raise AdapterFileError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    info = our_entry(meta, str(file), strict=False)
    return info if isinstance(info, dict) else {}


def tuned_component_dir(run: str | os.PathLike, component: str) -> Path:
    """Where a full fine-tuning run writes a tuned component (``unet``, ``text_encoder``...): a diffusers folder."""
    return Path(run) / component


def recorded_method(path: str | os.PathLike) -> str | None:
    """The method a run folder or one of its checkpoints was trained with (``None`` for anything else, an
    adapter file among them)."""
    p = Path(path)
    with contextlib.suppress(OSError, ValueError, AttributeError):
        if is_checkpoint(p):
            return read_checkpoint_state(p).get("config", {}).get("method")
        if p.is_dir() and (config := read_run_config(p)) is not None:
            return config.get("method")
    return None


# --------------------------------------------------------------------------------------------
# The resolved config and the training log
# --------------------------------------------------------------------------------------------


def config_file(run: str | os.PathLike) -> Path:
    return Path(run) / CONFIG_NAME


def write_run_config(run: str | os.PathLike, values: dict[str, Any]) -> Path:
    path = config_file(run)
    path.write_text(json.dumps(values, indent=2), encoding="utf-8")
    return path


def read_run_config(run: str | os.PathLike) -> dict[str, Any] | None:
    """A run folder's ``training_config.json``; ``None`` when the folder has none."""
    path = config_file(run)
    if not path.is_file():
        return None
    return json.loads(path.read_text(encoding="utf-8"))


def log_file(run: str | os.PathLike) -> Path:
    return Path(run) / LOG_NAME


def append_log(run: str | os.PathLike, row: dict[str, Any]) -> None:
    """One row of ``train_log.jsonl`` (``step`` and what was measured at it)."""
    with log_file(run).open("a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


def read_log(run: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a run's ``train_log.jsonl`` (``[]`` without one); a half-written last line is skipped."""
    rows = []
    try:
        lines = log_file(run).read_text(encoding="utf-8").splitlines()
    except OSError:
        return rows
    for line in lines:
        with contextlib.suppress(ValueError):
            rows.append(json.loads(line))
    return rows


def truncate_log(run: str | os.PathLike, step: int) -> None:
    """Drop the log rows after ``step``: a resumed run repeats the steps its killed predecessor logged past
    the checkpoint. Rewritten through a temporary file renamed into place; a half-written line goes too."""
    path = log_file(run)
    if not path.is_file():
        return
    kept = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(ValueError, KeyError, TypeError):
            if int(json.loads(line)["step"]) <= step:
                kept.append(line + "\n")
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("".join(kept), encoding="utf-8")
    os.replace(tmp, path)


# --------------------------------------------------------------------------------------------
# Checkpoints
# --------------------------------------------------------------------------------------------


def checkpoint_dir(run: str | os.PathLike, step: int) -> Path:
    return Path(run) / CHECKPOINT_DIR / f"{CHECKPOINT_PREFIX}{step}"


def checkpoint_staging_dir(run: str | os.PathLike, step: int) -> Path:
    """Where a checkpoint is written before it is renamed into place (hidden: never listed)."""
    return Path(run) / CHECKPOINT_DIR / f".tmp-{CHECKPOINT_PREFIX}{step}"


def run_of_checkpoint(checkpoint: str | os.PathLike) -> Path:
    """The run folder a ``checkpoints/checkpoint-<step>`` folder belongs to."""
    return Path(checkpoint).parent.parent


def rng_file(checkpoint: str | os.PathLike, rank: int) -> Path:
    return Path(checkpoint) / f"rng-{rank}.pt"


def step_in_path(path: str | os.PathLike) -> int | None:
    """The step of the innermost ``checkpoint-<step>`` folder on ``path`` (``None`` if none is)."""
    for part in reversed(Path(path).parts):
        found = _CHECKPOINT_RE.fullmatch(part)
        if found:
            return int(found.group(1))
    return None


def checkpoints(run: str | os.PathLike) -> list[Path]:
    """The run's ``checkpoint-<step>`` folders, oldest step first (complete or not)."""
    root = Path(run) / CHECKPOINT_DIR
    found = [
        (int(m.group(1)), p) for p in root.glob(f"{CHECKPOINT_PREFIX}*") if (m := _CHECKPOINT_RE.fullmatch(p.name))
    ]
    return [p for _, p in sorted(found)]


def is_checkpoint(path: str | os.PathLike) -> bool:
    """A complete checkpoint folder (its ``state.json`` is written last)."""
    return (Path(path) / STATE_NAME).is_file()


def latest_checkpoint(run: str | os.PathLike) -> Path | None:
    """The run's newest complete checkpoint, ``None`` when it has none."""
    done = [p for p in checkpoints(run) if is_checkpoint(p)]
    return done[-1] if done else None


def read_checkpoint_state(checkpoint: str | os.PathLike) -> dict[str, Any]:
    """A checkpoint's ``state.json``: ``step`` and ``config`` (the options it was trained with)."""
    return json.loads((Path(checkpoint) / STATE_NAME).read_text(encoding="utf-8"))


def write_checkpoint_state(checkpoint: str | os.PathLike, step: int, config: dict[str, Any]) -> None:
    (Path(checkpoint) / STATE_NAME).write_text(json.dumps({"step": step, "config": config}, indent=2), encoding="utf-8")


def checkpoint_step(checkpoint: str | os.PathLike) -> int:
    return int(read_checkpoint_state(checkpoint)["step"])


def write_checkpoint_tensors(file: str | os.PathLike, by_component: Mapping[str, Mapping[str, Any]]) -> Path:
    """A checkpoint's trained weights (``adapter.safetensors``; ``weights.safetensors`` for full fine-tuning):
    every component's state dict in one safetensors file, keyed ``<component>.<key>``."""
    from safetensors.torch import save_file

    tensors = {f"{c}.{k}": v.contiguous() for c, state in by_component.items() for k, v in state.items()}
    save_file(tensors, str(file))
    return Path(file)


def read_checkpoint_tensors(file: str | os.PathLike) -> dict[str, dict[str, Any]]:
    """What ``write_checkpoint_tensors`` wrote, per component: ``{component: {key: tensor}}`` (the keys of
    ``inject.adapter_state_dict``, ``<module>.<param>``, in an adapter checkpoint). A missing or malformed
    file: ``AdapterFileError`` naming it."""
    from .formats import read_adapter_file

    tensors, _, _ = read_adapter_file(file)
    found: dict[str, dict[str, Any]] = {}
    for key, tensor in tensors.items():
        component, _, rest = key.partition(".")
        found.setdefault(component, {})[rest] = tensor
    return found


# --------------------------------------------------------------------------------------------
# Validation images
# --------------------------------------------------------------------------------------------


class ValidationImage(NamedTuple):
    path: Path
    step: int
    seed: int


def validation_image_path(run: str | os.PathLike, step: int, seed: int) -> Path:
    return Path(run) / VALIDATION_DIR / f"step{step:06d}_seed{seed}.png"


def parse_validation_name(name: str) -> tuple[int, int] | None:
    """``(step, seed)`` of a validation image's file name, ``None`` for any other name."""
    found = _VALIDATION_RE.fullmatch(name)
    return (int(found.group(1)), int(found.group(2))) if found else None


def validation_images(run: str | os.PathLike) -> list[ValidationImage]:
    """A run's validation images, by step, then seed (``[]`` without any)."""
    found = []
    for path in (Path(run) / VALIDATION_DIR).glob("step*.png"):
        parsed = parse_validation_name(path.name)
        if parsed:
            found.append(ValidationImage(path, *parsed))
    return sorted(found, key=lambda v: (v.step, v.seed))


# --------------------------------------------------------------------------------------------
# Around the run
# --------------------------------------------------------------------------------------------


def _slug(text: str) -> str:
    return re.sub(r"[^a-zA-Z0-9]+", "_", text).strip("_").lower()[:60] or "class"


def class_images_dir(run: str | os.PathLike, class_prompt: str) -> Path:
    """The default folder of a run's class images: beside the run, shared by runs with that class prompt."""
    return Path(run).parent / CLASS_IMAGES_DIR / _slug(class_prompt)
