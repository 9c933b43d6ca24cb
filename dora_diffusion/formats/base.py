"""What every adapter file format shares: errors, our metadata entry, component and module names, the
atomic writer, the low-rank factors writers store, and the load report.

The formats (``diffusers``, ``kohya``, ``comfyui``, ``original``) build on this module; ``load`` picks the
reader for a file. Nothing here knows a format's keys.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inject import AdapterError
from ..layers import AdapterLinear

METADATA_KEY = "dora_diffusion"  # our entry in a safetensors header: JSON, what the file holds
FORMAT_VERSION = 1
COMPONENTS = ("unet", "text_encoder", "text_encoder_2")
TEXT_ENCODERS = ("text_encoder", "text_encoder_2")
# A magnitude-only adapter (paper §5.6) is written as DoRA with A = 0, B = 0 at this rank and alpha:
# then W' = m ⊙ W0 / ‖W0‖_row exactly, in every DoRA loader (see ``written_factors``).
MAGNITUDE_ONLY_RANK = 1
MAGNITUDE_ONLY_ALPHA = 1.0


class AdapterFileError(AdapterError):
    """An adapter file that cannot be read or does not fit the model; the message names the file."""


# --------------------------------------------------------------------------------------------
# Names: ours (module names of the installed libraries) <-> the file's canonical ones
# --------------------------------------------------------------------------------------------


def _has_text_model_level(module: nn.Module) -> bool:
    return hasattr(module, "text_model")


def canonical_name(component: str, module: nn.Module, name: str) -> str:
    """The file's spelling of a module name: text encoders always with ``text_model.``."""
    if component in TEXT_ENCODERS and not _has_text_model_level(module):
        return f"text_model.{name}"
    return name


def module_name(component: str, module: nn.Module, canonical: str) -> str:
    """The installed library's spelling of a canonical (file) module name."""
    if component in TEXT_ENCODERS:
        has = _has_text_model_level(module)
        if has and not canonical.startswith("text_model."):
            return f"text_model.{canonical}"
        if not has and canonical.startswith("text_model."):
            return canonical.removeprefix("text_model.")
    return canonical


# --------------------------------------------------------------------------------------------
# Components of a pipeline
# --------------------------------------------------------------------------------------------


def components_of(obj: Any, names: tuple[str, ...] = COMPONENTS) -> dict[str, nn.Module]:
    """``{component name: module}`` of a pipeline, a dict of modules, or a bare UNet.

    ``names``: the components looked for (default: those that carry adapters); a dict holding a module
    under any other name is an error.
    """
    if isinstance(obj, Mapping):
        comps = {k: v for k, v in obj.items() if isinstance(v, nn.Module)}
    elif isinstance(obj, nn.Module):
        comps = {"unet": obj}
    else:
        comps = {c: getattr(obj, c) for c in names if isinstance(getattr(obj, c, None), nn.Module)}
    unknown = set(comps) - set(names)
    if unknown:
        raise AdapterError(f"unknown component(s) {sorted(unknown)}; expected some of {list(names)}")
    return comps


# --------------------------------------------------------------------------------------------
# Write
# --------------------------------------------------------------------------------------------


def output_file(path: str | os.PathLike, default_name: str, overwrite: bool) -> Path:
    """The file a writer writes: ``path`` if it ends in ``.safetensors``, else ``path / default_name``.
    An existing file is an error unless ``overwrite`` (checked before anything is computed)."""
    file = Path(path)
    if file.suffix != ".safetensors":
        file = file / default_name
    if file.exists() and not overwrite:
        raise FileExistsError(f"{file} exists; pass overwrite=True to replace it")
    return file


def save_safetensors_atomic(tensors: Mapping[str, torch.Tensor], file: Path, metadata: Mapping[str, str]) -> Path:
    """Write a ``.safetensors`` file through a temporary sibling renamed into place: a failure or a
    kill mid-write leaves what was at ``file`` intact."""
    from safetensors.torch import save_file

    file.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".tmp-", suffix=".safetensors", dir=file.parent)
    os.close(fd)
    try:
        save_file(dict(tensors), tmp, metadata=dict(metadata) or None)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; an adapter file is meant to be shared
        os.replace(tmp, file)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return file


def written_factors(adapter: AdapterLinear) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(down A [r, in], up B [out, r], alpha)`` that a DoRA (or LoRA) file stores for ``adapter``, detached.

    Magnitude-only: zeros at rank ``MAGNITUDE_ONLY_RANK``, alpha ``MAGNITUDE_ONLY_ALPHA`` (in the
    magnitude's dtype), so that DoRA gives ``W' = m ⊙ W0 / ‖W0‖_row`` exactly. DVoRA: the expanded DoRA
    factors ``A' = diag(d)·A``, ``B' = diag(b)·B``. Other adapters: their own ``A``, ``B`` and alpha.
    """
    if adapter.method == "magnitude":
        out_f, in_f = adapter.base.weight.shape
        dtype = adapter.magnitude.dtype
        r = MAGNITUDE_ONLY_RANK
        return torch.zeros(r, in_f, dtype=dtype), torch.zeros(out_f, r, dtype=dtype), MAGNITUDE_ONLY_ALPHA
    return adapter.lora_A.detach(), adapter.lora_B.detach(), float(adapter.alpha)


# --------------------------------------------------------------------------------------------
# Read
# --------------------------------------------------------------------------------------------


def our_entry(meta: Mapping[str, str], source: str, *, strict: bool = True) -> dict[str, Any]:
    """Our metadata entry (``METADATA_KEY``) of a file's header, ``{}`` if it has none.

    Not valid JSON: an ``AdapterFileError`` naming ``source``, or ``{}`` if not ``strict``
    (files of other tools are read without it).
    """
    try:
        return json.loads(meta.get(METADATA_KEY, "{}"))
    except json.JSONDecodeError:
        if strict:
            raise AdapterFileError(f"{source}: metadata entry {METADATA_KEY!r} is not valid JSON") from None
        return {}


@dataclass
class LoadReport:
    """What ``load_adapter`` loaded: printed by the CLI, returned to callers."""

    file: str
    method: dict[str, str]
    rank: dict[str, int]
    alpha: dict[str, float]
    layers: dict[str, int]
    keys_left_over: list[str]
    metadata: dict[str, Any]

    def add(self, component: str, method: str, rank: int, alpha: float) -> None:
        """Count one planned layer."""
        if self.method.setdefault(component, method) != method:
            self.method[component] = "mixed"
        self.rank[component] = max(self.rank.get(component, 0), rank)
        self.alpha[component] = alpha
        self.layers[component] = self.layers.get(component, 0) + 1

    def __str__(self) -> str:
        parts = [
            f"{c}: {self.method[c]} r={self.rank[c]} alpha={self.alpha[c]:g}, {self.layers[c]} layers"
            for c in self.layers
        ]
        extra = f"; {len(self.keys_left_over)} keys left over" if self.keys_left_over else ""
        return f"{self.file}: " + "; ".join(parts) + extra


def raise_if_problems(source: str, problems: list[str]) -> None:
    """One error naming the file and the first problems; raised before the pipeline is touched."""
    if problems:
        raise AdapterFileError(
            f"{source}: does not fit this pipeline ({len(problems)} problem(s); is it for another model?): "
            + "; ".join(problems[:5])
        )
