"""Loading SDXL pipelines offline, and the embedded tiny SDXL.

What it holds:

- ``resolve_model`` / ``load_pipeline``: turn what the user typed (nothing, a local diffusers folder,
  or a hub id) into a pipeline, offline only. A model that is not on disk fails with
  ``ModelNotFoundError`` saying so; nothing is downloaded at run time.
- ``embedded_model``: the embedded tiny SDXL that has learned, shipped with the package
  (``assets/toy-sdxl``, pretrained on the toy world of ``dora_diffusion.world``; its model card is
  ``assets/toy-sdxl/README.md``). It is what ``None`` means everywhere: the demo, the app, the CLI.
- ``build_tiny_sdxl`` / ``tiny_sdxl_components``: the same architecture with random weights, built
  from code with a fixed seed (every build byte-identical), for the fast tests that need no learning. Same
  component classes and block layout as SDXL base 1.0 (``shared/sdxl/*.json``), only narrow (the configs:
  ``tiny_configs``), so module names (and their SGM names such as ``input_blocks_4_1``) map exactly as they
  do on the real model.
- ``load_component`` / ``is_unet_folder``: one component of a local model folder, and whether a folder is a
  bare UNet (what full fine-tuning writes).

Module names to expect (transformers 5): ``CLIPTextModel`` (``text_encoder``) has no ``text_model.``
level (``encoder.layers.0.self_attn.q_proj``), ``CLIPTextModelWithProjection`` (``text_encoder_2``)
still has it (``text_model.encoder.layers.0.self_attn.q_proj``); files in the wild use ``text_model.``
for both.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL, EulerDiscreteScheduler, StableDiffusionXLPipeline, UNet2DConditionModel
from transformers import (
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    CLIPTokenizer,
)

from dora_diffusion import _tiny_vocab

from .tiny_configs import (
    SDXL_SCHEDULER_CONFIG,
    TINY_TEXT_ENCODER_2_CONFIG,
    TINY_TEXT_ENCODER_CONFIG,
    TINY_UNET_CONFIG,
    TINY_VAE_CONFIG,
    TOY_VAE_CONFIG,
)

__all__ = [
    "EMBEDDED_MODEL_DIR",
    "ModelNotFoundError",
    "build_tiny_sdxl",
    "default_model_dir",
    "embedded_judge",
    "embedded_model",
    "ensure_tiny_model",
    "is_unet_folder",
    "load_component",
    "load_pipeline",
    "model_folder",
    "native_resolution",
    "resolve_model",
    "sdxl_scheduler_config",
    "tiny_sdxl_components",
]

# Bump when the tiny model's architecture or weights change: cached copies are rebuilt.
TINY_MODEL_VERSION = 1
# Written next to model_index.json; marks a folder as ours (so it may be rebuilt in place).
TINY_MARKER = "dora_diffusion_tiny.json"

# The learned tiny SDXL shipped with the package (``dora-diffusion pretrain-tiny`` made it).
EMBEDDED_MODEL_DIR = Path(__file__).resolve().parent / "assets" / "toy-sdxl"

# The real file, when this runs from a checkout (repo/../shared); installed copies use the embedded one.
_SHARED_SCHEDULER_CONFIG = Path(__file__).resolve().parents[2] / "shared/sdxl/scheduler_config.json"


class ModelNotFoundError(FileNotFoundError):
    """The model is neither a usable local folder nor in the local Hugging Face cache."""


# --- building the tiny model -----------------------------------------------------------------------


def sdxl_scheduler_config(path: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """SDXL base 1.0's scheduler config: from ``path``, else ``shared/sdxl``, else the embedded copy."""
    if path is not None:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    if _SHARED_SCHEDULER_CONFIG.is_file():
        return json.loads(_SHARED_SCHEDULER_CONFIG.read_text(encoding="utf-8"))
    return dict(SDXL_SCHEDULER_CONFIG)


def _tiny_tokenizers() -> tuple[CLIPTokenizer, CLIPTokenizer]:
    """``tokenizer`` pads with ``<|endoftext|>``, ``tokenizer_2`` with ``"!"``, as SDXL's two do."""
    with tempfile.TemporaryDirectory(prefix="dora-diffusion-vocab-") as folder:
        files = _tiny_vocab.write_tokenizer_files(Path(folder))
        # Positional file paths: the one constructor form transformers 4 and 5 both read.
        vocab, merges = str(files / "vocab.json"), str(files / "merges.txt")
        tokenizer = CLIPTokenizer(vocab, merges, model_max_length=77)
        tokenizer_2 = CLIPTokenizer(vocab, merges, model_max_length=77, pad_token="!")
    return tokenizer, tokenizer_2


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU generator for the block and restore the caller's state after it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_sdxl_components(seed: int = 0, scheduler_config: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The seven SDXL components, tiny, in memory, in float32 on CPU (no disk, for fast tests).

    Keys: ``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``, ``tokenizer``, ``tokenizer_2``,
    ``scheduler`` (``StableDiffusionXLPipeline(**components)`` accepts them as they are). Weights
    depend only on ``seed``; the caller's random state is left untouched.
    """
    tokenizer, tokenizer_2 = _tiny_tokenizers()
    with _seeded(seed):  # fixed construction order: each component's weights depend on the ones before
        unet = UNet2DConditionModel(**TINY_UNET_CONFIG)
        vae = AutoencoderKL(**TINY_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**TINY_TEXT_ENCODER_CONFIG))
        text_encoder_2 = CLIPTextModelWithProjection(CLIPTextConfig(**TINY_TEXT_ENCODER_2_CONFIG))
    scheduler = EulerDiscreteScheduler.from_config(sdxl_scheduler_config(scheduler_config))
    for model in (unet, vae, text_encoder, text_encoder_2):
        model.eval()
    return {
        "unet": unet,
        "vae": vae,
        "text_encoder": text_encoder,
        "text_encoder_2": text_encoder_2,
        "tokenizer": tokenizer,
        "tokenizer_2": tokenizer_2,
        "scheduler": scheduler,
    }


def toy_sdxl_components(seed: int = 0) -> dict[str, Any]:
    """The learned embedded model's components before pretraining (random weights, ``seed``): the tiny
    UNet and text encoders with the 4x VAE of ``TOY_VAE_CONFIG`` (64 px images, 16x16 latents)."""
    components = tiny_sdxl_components(seed)
    with _seeded(seed + 1):
        components["vae"] = AutoencoderKL(**TOY_VAE_CONFIG).eval()
    return components


def _read_marker(folder: Path) -> dict[str, Any] | None:
    """The tiny-model marker of ``folder``, or None when the folder is not a tiny model we built."""
    try:
        marker = json.loads((folder / TINY_MARKER).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return marker if isinstance(marker, dict) and marker.get("builder") == __name__ else None


def build_tiny_sdxl(
    path: str | os.PathLike[str],
    seed: int = 0,
    *,
    scheduler_config: str | os.PathLike[str] | None = None,
) -> Path:
    """Write the tiny SDXL pipeline to ``path`` (a diffusers folder, safetensors) and return the path.

    ``path`` may be missing, empty, or a tiny model built before (it is replaced); any other existing
    content is refused with ``FileExistsError`` and left as it was. The folder is built next to
    ``path`` and renamed into place, so a failed build leaves nothing half-written.
    """
    target = Path(path).expanduser().absolute()
    if target.exists():
        if not target.is_dir():
            raise FileExistsError(f"Cannot build the tiny model at {target}: it is a file, not a folder.")
        if any(target.iterdir()) and _read_marker(target) is None:
            raise FileExistsError(
                f"Refusing to build the tiny model in {target}: the folder is not empty and is not a tiny "
                "model built by dora-diffusion. Choose an empty or new folder."
            )
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".building", dir=target.parent))
    staging.chmod(0o755)  # mkdtemp's 0o700 would stay on the final folder
    try:
        components = tiny_sdxl_components(seed, scheduler_config)
        pipe = StableDiffusionXLPipeline(**components, add_watermarker=False)
        pipe.save_pretrained(staging, safe_serialization=True)
        # transformers 4's CLIPTokenizer reads these two files, not tokenizer.json
        for folder in ("tokenizer", "tokenizer_2"):
            _tiny_vocab.write_tokenizer_files(staging / folder)
        marker = {"builder": __name__, "version": TINY_MODEL_VERSION, "seed": seed}
        (staging / TINY_MARKER).write_text(json.dumps(marker, indent=2) + "\n", encoding="utf-8")
        _move_into_place(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _move_into_place(staging: Path, target: Path) -> None:
    """Rename ``staging`` to ``target``; an old tiny model there is swapped out, then deleted."""
    if target.is_dir() and not any(target.iterdir()):
        target.rmdir()
    if not target.exists():
        staging.rename(target)
        return
    retired = target.with_name(f".{target.name}.{os.getpid()}.old")
    target.rename(retired)
    try:
        staging.rename(target)
    except OSError:
        retired.rename(target)
        raise
    shutil.rmtree(retired, ignore_errors=True)


def default_model_dir() -> Path:
    """Where the embedded tiny model is cached: ``$DORA_DIFFUSION_HOME/tiny-sdxl``, else
    ``~/.cache/dora-diffusion/tiny-sdxl``."""
    home = os.environ.get("DORA_DIFFUSION_HOME")
    root = Path(home).expanduser() if home else Path.home() / ".cache" / "dora-diffusion"
    return root / "tiny-sdxl"


def ensure_tiny_model() -> Path:
    """The cached tiny model's folder, built (seed 0) on first use or when it is out of date."""
    folder = default_model_dir()
    if _is_current_tiny_model(folder):
        return folder
    try:
        return build_tiny_sdxl(folder, seed=0)
    except OSError:
        if _is_current_tiny_model(folder):  # another process built it at the same time
            return folder
        raise


def embedded_model() -> Path:
    """The folder of the shipped, pretrained tiny SDXL (64 px, the toy world)."""
    if not (EMBEDDED_MODEL_DIR / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"The embedded model is missing from {EMBEDDED_MODEL_DIR} (it ships with the package): reinstall "
            "dora-diffusion, or rebuild it with `dora-diffusion pretrain-tiny`."
        )
    return EMBEDDED_MODEL_DIR


def embedded_judge():
    """The toy world's judge that ships with the embedded model (``dora_diffusion.world.judge.Judge``)."""
    from .world.judge import Judge

    embedded_model()
    return Judge.load(EMBEDDED_MODEL_DIR / "judge")


def _is_current_tiny_model(folder: Path) -> bool:
    marker = _read_marker(folder)
    return marker is not None and marker.get("version") == TINY_MODEL_VERSION and marker.get("seed") == 0


# --- resolving and loading models ------------------------------------------------------------------


def _looks_like_path(model: str) -> bool:
    """True for what can only be a filesystem path (a hub id is ``name`` or ``owner/name``)."""
    return model.startswith((".", "~", "/", "\\")) or Path(model).is_absolute() or model.count("/") > 1 or "\\" in model


def resolve_model(model: str | os.PathLike[str] | None) -> str | Path:
    """What ``from_pretrained`` should load for ``model``, checked to be on disk.

    - ``None``: the embedded tiny SDXL that ships with the package (``embedded_model``);
    - an existing folder: that folder, which must hold a diffusers pipeline (``model_index.json``);
    - otherwise a hub id, returned as given if the local Hugging Face cache holds it.

    Raises ``ModelNotFoundError`` naming the model and what is missing.
    """
    if model is None:
        return embedded_model()
    name = os.fspath(model)
    local = Path(name).expanduser()
    if local.exists():
        if not local.is_dir():
            raise ModelNotFoundError(
                f"Model {local} is a file; a diffusers pipeline folder (with model_index.json) is needed. "
                "Convert a single-file checkpoint with StableDiffusionXLPipeline.from_single_file(...)"
                ".save_pretrained(folder)."
            )
        if not (local / "model_index.json").is_file():
            raise ModelNotFoundError(
                f"Model folder {local} has no model_index.json, so it is not a diffusers pipeline folder "
                "(one written by save_pretrained, with unet/, vae/, text_encoder/, ... inside)."
            )
        return local
    if isinstance(model, os.PathLike) or _looks_like_path(name):
        raise ModelNotFoundError(f"Model folder {local} does not exist.")

    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError

    try:
        snapshot = Path(snapshot_download(name, local_files_only=True))
    except (FileNotFoundError, HFValidationError) as error:
        raise ModelNotFoundError(
            f"Model {name!r} is neither a local folder nor in the local Hugging Face cache, and with no "
            f"network it cannot be downloaded. On a connected machine run `hf download {name}` "
            f"(older huggingface_hub: `huggingface-cli download {name}`), or pass a local diffusers folder."
        ) from error
    if not (snapshot / "model_index.json").is_file():
        raise ModelNotFoundError(
            f"Model {name!r} is in the local Hugging Face cache ({snapshot}) but has no model_index.json: "
            "it is not a diffusers pipeline, or its download is incomplete."
        )
    return name


def model_folder(resolved: str | os.PathLike[str]) -> Path:
    """The local folder of a resolved model (``resolve_model``'s answer: a hub id's snapshot in the local cache)."""
    if Path(resolved).is_dir():
        return Path(resolved)
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(str(resolved), local_files_only=True))


def is_unet_folder(path: str | os.PathLike[str]) -> bool:
    """A bare UNet folder (its ``config.json`` names a ``UNet2DConditionModel``), as full fine-tuning writes."""
    try:
        return json.loads((Path(path) / "config.json").read_text()).get("_class_name") == "UNet2DConditionModel"
    except (OSError, ValueError, AttributeError):
        return False


def load_component(folder: str | os.PathLike[str], name: str) -> torch.nn.Module:
    """One component (``unet``, ``vae``, ``text_encoder``, ``text_encoder_2``) of a local pipeline folder, or
    the UNet of a bare UNet folder: offline, safetensors only, frozen, in eval mode, on the CPU."""
    classes = {
        "unet": UNet2DConditionModel,
        "vae": AutoencoderKL,
        "text_encoder": CLIPTextModel,
        "text_encoder_2": CLIPTextModelWithProjection,
    }
    if name not in classes:
        raise ValueError(f"{name}: not a model component ({', '.join(classes)})")
    kw: dict[str, Any] = {"local_files_only": True, "use_safetensors": True}
    if not is_unet_folder(folder):
        kw["subfolder"] = name
    elif name != "unet":
        raise ModelNotFoundError(f"{folder} is a UNet folder; it has no {name}")
    return classes[name].from_pretrained(folder, **kw).eval().requires_grad_(False)


def native_resolution(model_dir: str | os.PathLike[str]) -> int:
    """The model's native image size from its config files (1024 for SDXL, 64 for the embedded model),
    without loading weights."""
    unet = json.loads((Path(model_dir) / "unet" / "config.json").read_text())
    vae = json.loads((Path(model_dir) / "vae" / "config.json").read_text())
    return int(unet["sample_size"]) * 2 ** (len(vae["block_out_channels"]) - 1)


def load_pipeline(
    model: str | os.PathLike[str] | None = None,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
) -> StableDiffusionXLPipeline:
    """Load an SDXL pipeline offline (safetensors only): ``None`` gives the embedded (learned) tiny model."""
    source = resolve_model(model)
    pipe = StableDiffusionXLPipeline.from_pretrained(
        source, local_files_only=True, use_safetensors=True, **_dtype_kwarg(dtype)
    )
    return pipe.to(device)


def _dtype_kwarg(dtype: torch.dtype) -> dict[str, torch.dtype]:
    """``from_pretrained``'s dtype argument: ``dtype`` from diffusers 0.42 (``torch_dtype`` is
    deprecated there), ``torch_dtype`` before (where ``dtype`` would be ignored)."""
    import diffusers
    from packaging.version import Version

    return {"dtype" if Version(diffusers.__version__) >= Version("0.42") else "torch_dtype": dtype}
