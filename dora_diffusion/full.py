"""Full fine-tuning of the targeted layers (``--method full``): the DoRA paper's FT baseline.

The layers LoRA and DoRA would wrap (``inject.select_targets``: the same names, the same checks) are
trained themselves, weight and bias; every other weight stays frozen. Which layers a module tunes is
read from the module: its plain ``nn.Linear`` layers whose weight requires grad (``tuned_layers``), so a
checkpoint, a resume and the final save agree on them without a list kept aside.

A run writes its tuned components as diffusers folders (``<run>/unet``, and ``<run>/text_encoder``,
``<run>/text_encoder_2`` with ``--train-text-encoder``): the base component with the tuned layers' weights
written in, every other tensor exactly the base model's. Its checkpoints hold the tuned layers' weights only
(``weights.safetensors``, keys ``<component>.<layer>.<weight|bias>``). There is no adapter file: ``export``
writes a full run as a merged pipeline only (``merged-folder``, ``merged-single``).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .adapter_config import FULL as FULL  # the method name, owned with the other methods
from .inject import AdapterError, select_targets

MERGED_FORMATS = ("merged-folder", "merged-single")
TUNED_PARAMS = ("weight", "bias")


class FullTuningError(AdapterError):
    """A full fine-tuning run, checkpoint or state dict that does not fit; the message names it."""


# --------------------------------------------------------------------------------------------
# Which layers, their parameters and state
# --------------------------------------------------------------------------------------------


@torch.no_grad()
def tune_layers(
    module: nn.Module,
    targets: str | Sequence[str],
    *,
    device: str | torch.device | None = None,
    dtype: torch.dtype = torch.float32,
    require_match: bool = True,
) -> list[str]:
    """Make the targeted ``nn.Linear`` layers of ``module`` trainable (weight and bias) and freeze the rest;
    returns their names. The frozen part goes to ``dtype`` (the compute dtype of mixed precision), the tuned
    layers stay fp32 with their fp32 values (kept through the cast, not rounded by it)."""
    names = select_targets(module, targets, require_match=require_match)
    layers = {n: module.get_submodule(n) for n in names}
    cast = dtype != torch.float32
    kept = (
        {n: {k: v.detach().clone() for k, v in layer.state_dict().items()} for n, layer in layers.items()}
        if cast
        else {}
    )
    module.requires_grad_(False)
    if cast:
        module.to(device=device, dtype=dtype)
    elif device is not None:
        module.to(device)
    for n, layer in layers.items():
        if cast:
            layer.to(dtype=torch.float32)
            layer.load_state_dict(kept[n])
        layer.requires_grad_(True)
    return names


def tuned_layers(module: nn.Module) -> list[str]:
    """Names of the plain ``nn.Linear`` layers of ``module`` whose weight trains, in the model's order."""
    return [n for n, m in module.named_modules() if isinstance(m, nn.Linear) and m.weight.requires_grad]


def _tuned_items(module: nn.Module) -> list[tuple[str, nn.Parameter]]:
    out = []
    for name in tuned_layers(module):
        layer = module.get_submodule(name)
        out += [(f"{name}.{p}", getattr(layer, p)) for p in TUNED_PARAMS if getattr(layer, p, None) is not None]
    return out


def tuned_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The tuned layers' weights and biases (what the optimizer gets)."""
    return [p for _, p in _tuned_items(module)]


def tuned_parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in tuned_parameters(module))


def tuned_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """The tuned layers' parameters, keyed ``<layer>.weight`` / ``<layer>.bias`` (detached copies)."""
    return {k: p.detach().clone() for k, p in _tuned_items(module)}


@torch.no_grad()
def load_tuned_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict"
) -> None:
    """Copy ``state_dict`` into ``module``'s tuned layers; strict on keys and shapes, checked before any write."""
    items = dict(_tuned_items(module))
    missing = sorted(set(items) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(items))
    wrong = sorted(
        f"{k}: {tuple(state_dict[k].shape)} vs {tuple(items[k].shape)}"
        for k in set(items) & set(state_dict)
        if tuple(state_dict[k].shape) != tuple(items[k].shape)
    )
    problems = [
        f"{len(v)} {what} (e.g. {', '.join(v[:3])})"
        for what, v in (("missing", missing), ("unexpected", unexpected), ("with the wrong shape", wrong))
        if v
    ]
    if problems:
        raise FullTuningError(
            f"{source} does not fit the tuned layers of {type(module).__name__}: " + "; ".join(problems)
        )
    for k, p in items.items():
        p.copy_(state_dict[k])


def tuned_summary(module: nn.Module) -> dict[str, int]:
    """Counts for logs: tuned layers and their parameters."""
    return {"layers": len(tuned_layers(module)), "trainable_parameters": tuned_parameter_count(module)}


# --------------------------------------------------------------------------------------------
# The tuned components on disk
# --------------------------------------------------------------------------------------------


def _from_pretrained(cls: type, folder: str | os.PathLike, **kw: Any) -> nn.Module:
    return cls.from_pretrained(folder, local_files_only=True, use_safetensors=True, **kw)


@torch.no_grad()
def _write_in(module: nn.Module, tensors: Mapping[str, torch.Tensor], source: str) -> None:
    """Copy ``{parameter name: tensor}`` into ``module`` (any parameter; strict on names and shapes)."""
    params = dict(module.named_parameters())
    bad = sorted(k for k in tensors if k not in params or tuple(params[k].shape) != tuple(tensors[k].shape))
    if bad:
        k = bad[0]
        why = "no such parameter" if k not in params else f"{tuple(tensors[k].shape)} vs {tuple(params[k].shape)}"
        raise FullTuningError(
            f"{source}: {len(bad)} tensor(s) do not fit {type(module).__name__} (e.g. {k}: {why}); "
            "is it for another model?"
        )
    for k, v in tensors.items():
        params[k].copy_(v.to(params[k].dtype))


def save_tuned_components(modules: Mapping[str, nn.Module], model_dir: str | os.PathLike, output: Path) -> list[Path]:
    """``<output>/<component>``: each of ``modules`` as a diffusers folder (config + safetensors), built from
    the base model's own component in ``model_dir`` with the tuned layers' weights written in, so every other
    tensor is the base's exactly (whatever dtype training computed in). Each folder is written beside its
    place and renamed into it."""
    written = []
    for comp, module in modules.items():
        fresh = _from_pretrained(type(module), model_dir, subfolder=comp)
        _write_in(fresh, tuned_state_dict(module), f"{comp} of {output}")
        final = Path(output) / comp
        tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{comp}-", dir=output))
        tmp.chmod(0o755)  # mkdtemp's 0o700 would stay on the folder
        try:
            fresh.save_pretrained(tmp, safe_serialization=True)
            if final.exists():
                shutil.rmtree(final)
            os.replace(tmp, final)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        written.append(final)
    return written


def load_full_run(pipe: Any, path: str | os.PathLike) -> dict[str, int]:
    """Put what a full fine-tuning run learned into ``pipe`` (its base model's pipeline), in place: from a
    run folder its tuned component folders (``<run>/unet``...), from one of its checkpoints the tuned layers'
    weights written into the base components. Returns ``{component: tuned layers}``."""
    from . import runs
    from .formats.base import COMPONENTS

    path = Path(path)
    if runs.is_checkpoint(path):
        config = runs.read_checkpoint_state(path).get("config", {})
        file = path / runs.CHECKPOINT_WEIGHTS_NAME
        if not file.is_file():
            raise FullTuningError(f"{path}: a full fine-tuning checkpoint without {runs.CHECKPOINT_WEIGHTS_NAME}")
        by_comp = runs.read_checkpoint_tensors(file)
        for comp, sub in by_comp.items():
            if comp not in COMPONENTS or getattr(pipe, comp, None) is None:
                raise FullTuningError(f"{file}: unexpected component {comp!r} (components: {', '.join(COMPONENTS)})")
            _write_in(getattr(pipe, comp), sub, str(file))
        comps = list(by_comp)
    else:
        config = runs.read_run_config(path) or {}
        comps = [c for c in COMPONENTS if runs.tuned_component_dir(path, c).is_dir()]
        if not comps:
            found = runs.latest_checkpoint(path)
            hint = f"; export one of its checkpoints, e.g. {found}" if found else ""
            raise FullTuningError(f"{path}: no tuned component folder (unet/) in this run: did it finish?{hint}")
        for comp in comps:
            module = _from_pretrained(type(getattr(pipe, comp)), runs.tuned_component_dir(path, comp))
            pipe.register_modules(**{comp: module.to(getattr(pipe, comp).device)})
    targets = config.get("targets", "attn")
    return {c: len(select_targets(getattr(pipe, c), targets, require_match=False)) for c in comps}
