"""Reading an adapter file of any format, and the one dispatch to its reader.

``read_adapter_file`` opens a safetensors file (pickles refused); ``plan_file`` hands its tensors to the
reader of their layout (kohya keys: ``kohya``, or ``comfyui`` when our metadata says the file was written
for ComfyUI; every other file: ``diffusers``, which also reads PEFT's keys); ``load_adapter`` installs what
was planned, after every check passed.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..inject import remove_adapters, set_submodule
from ..layers import AdapterLinear, set_adapter_scale
from .base import AdapterFileError, LoadReport, components_of, our_entry
from .comfyui import COMFYUI_LAYOUT, plan_comfyui
from .diffusers import WEIGHT_NAME, plan_adapters
from .kohya import is_kohya, plan_kohya

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl", ".pickle")


def resolve_adapter_file(path: str | os.PathLike) -> Path:
    """The ``.safetensors`` file behind ``path`` (a file, or a folder holding one); pickles refused."""
    p = Path(path)
    if p.is_dir():
        candidates = [p / WEIGHT_NAME] + sorted(p.glob("*.safetensors"))
        found = next((c for c in candidates if c.is_file()), None)
        if found is None:
            pickles = [c.name for c in p.iterdir() if c.suffix.lower() in PICKLE_SUFFIXES]
            hint = f" (found {', '.join(pickles)}: pickle files are not loaded)" if pickles else ""
            raise AdapterFileError(f"{p}: no .safetensors adapter file in this folder{hint}")
        return found
    if not p.exists():
        raise AdapterFileError(f"{p}: no such file or folder")
    if p.suffix.lower() in PICKLE_SUFFIXES:
        raise AdapterFileError(
            f"{p}: is a pickle file ({p.suffix}); only .safetensors files are loaded, because unpickling "
            "can run arbitrary code. Convert it once in a trusted environment."
        )
    if p.suffix.lower() != ".safetensors":
        raise AdapterFileError(f"{p}: not a .safetensors file")
    return p


def read_adapter_file(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str], Path]:
    """Tensors and header metadata of a safetensors adapter file; malformed files are clear errors."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    file = resolve_adapter_file(path)
    try:
        with safe_open(str(file), framework="pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(file))
    except Exception as e:  # safetensors raises SafetensorError / OSError subclasses with terse messages
        raise AdapterFileError(f"{file}: not a readable safetensors file ({type(e).__name__}: {e})") from None
    return tensors, meta, file


def warn_if_not_finite(tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Warn, naming ``source`` and the first key, when tensors hold NaN or inf: a run that diverged saves
    them with the right shapes, so they load, and every image made with them is black or noise."""
    bad = [k for k, t in tensors.items() if t.is_floating_point() and not bool(torch.isfinite(t).all())]
    if bad:
        warnings.warn(
            f"{source}: {bad[0]} holds NaN or inf values ({len(bad)} tensors of {len(tensors)} do); "
            "the run that wrote it probably diverged",
            UserWarning,
            stacklevel=3,
        )


def plan_file(
    pipe: Any, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], source: str
) -> tuple[dict[tuple[str, str], AdapterLinear], LoadReport]:
    """The adapters of a file's tensors, built by the reader of its layout and checked against ``pipe``
    (nothing installed)."""
    if not is_kohya(tensors):
        return plan_adapters(pipe, tensors, meta, source)
    if our_entry(meta, source, strict=False).get("layout") == COMFYUI_LAYOUT:
        return plan_comfyui(pipe, tensors, meta, source)
    return plan_kohya(pipe, tensors, meta, source)


def load_adapter(pipe: Any, path: str | os.PathLike, scale: float = 1.0) -> LoadReport:
    """Load an adapter file into ``pipe`` (replacing adapters it has), at run-time ``scale``.

    Reads our files, diffusers'/PEFT's (also those of diffusers' DreamBooth scripts) and kohya/LyCORIS
    files (SGM or diffusers names; ``dora_scale`` per output row or per input column). Exact for every
    component (UNet and both text encoders, LoRA, DoRA, magnitude-only). The file
    is read and checked completely before the pipeline is touched: on any error it is unchanged.
    """
    tensors, meta, file = read_adapter_file(path)
    warn_if_not_finite(tensors, str(file))
    planned, report = plan_file(pipe, tensors, meta, str(file))
    comps = components_of(pipe)
    for module in comps.values():
        remove_adapters(module)
    for (comp, name), adapter in planned.items():  # built on their base layer's device
        set_submodule(comps[comp], name, adapter)
    for comp in report.layers:
        set_adapter_scale(comps[comp], scale)
    return report


def unload_adapter(pipe: Any) -> None:
    """Remove every adapter from ``pipe``, restoring the base weights."""
    for module in components_of(pipe).values():
        remove_adapters(module)
