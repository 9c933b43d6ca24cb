"""The kohya / LyCORIS file (LyCORIS, sd-scripts): write it, and read every DoRA layout exactly.

Keys, one module each:

    lora_unet_<SGM name, '.' -> '_'>.lora_down.weight   [r, in]
    lora_unet_<...>.lora_up.weight                        [out, r]
    lora_unet_<...>.alpha                                 []          scale = alpha / r
    lora_unet_<...>.dora_scale                            [out, 1]    (we write the output-row axis)
    lora_te1_text_model_encoder_layers_0_self_attn_q_proj.*   /  lora_te2_*   (text encoders)

e.g. ``lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q`` for the UNet's
``down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q``.

``dora_scale`` is the DoRA magnitude. Its axis differs by producer: LyCORIS >= 3.2 (``wd_on_out``)
writes one per OUTPUT row ``[out, 1]``; LyCORIS < 3.2 and OneTrainer one per INPUT column ``[1, in]``.
These are different functions, not two spellings: the reader builds ``DoRALinear`` for the first and
``DoRAInputAxisLinear`` for the second. A 1-D ``dora_scale`` is read by its length, and a length
that fits both axes (a square layer) needs the file's metadata to say which. ComfyUI and Forge
divide an output-axis ``dora_scale`` by ‖W0‖ instead: ``comfyui.py`` writes the file for them
(same keys, other ``dora_scale``, metadata ``layout: comfyui``) and reads it back exactly on top of this reader.

Underscore-joined names are ambiguous (``to_q``, ``transformer_blocks``), so names are not parsed:
the reader computes every kohya spelling of the model's own Linear layers (SGM and diffusers names)
and looks them up, as sd-scripts does.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..layers import ADAPTER_CLASSES, AdapterLinear, adapter_modules
from .base import (
    FORMAT_VERSION,
    METADATA_KEY,
    AdapterFileError,
    LoadReport,
    canonical_name,
    components_of,
    our_entry,
    output_file,
    raise_if_problems,
    save_safetensors_atomic,
    written_factors,
)
from .sgm_names import sgm_unet_name

KOHYA_LAYOUT = "kohya"  # our metadata's ``layout`` for this file (``comfyui.py`` writes another one)
PREFIXES = {"unet": "lora_unet_", "text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}
SUFFIXES = {".lora_down.weight": "lora_A", ".lora_up.weight": "lora_B", ".alpha": "alpha", ".dora_scale": "dora_scale"}


def is_kohya(keys) -> bool:
    return any(k.startswith(("lora_unet_", "lora_te_", "lora_te1_", "lora_te2_")) for k in keys)


def _kohya_names(component: str, module: nn.Module, name: str) -> list[str]:
    """Every kohya spelling of one module: SGM names first (as sd-scripts writes SDXL), then diffusers'."""
    if component == "unet":
        spellings = [sgm_unet_name(name), name]
    else:
        canon = canonical_name(component, module, name)
        spellings = [canon, canon.removeprefix("text_model.")]
    prefix = PREFIXES[component]
    out = []
    for s in spellings:
        key = prefix + s.replace(".", "_")
        if key not in out:
            out.append(key)
    return out


def kohya_name(component: str, module: nn.Module, name: str) -> str:
    """The name we write (SGM for the UNet, ``text_model_...`` for the text encoders)."""
    return _kohya_names(component, module, name)[0]


# --------------------------------------------------------------------------------------------
# Write
# --------------------------------------------------------------------------------------------


def kohya_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors of the kohya file for the adapters of ``obj`` and a summary for the metadata."""
    tensors: dict[str, torch.Tensor] = {}
    summary: dict[str, Any] = {}
    for comp, module in components_of(obj).items():
        mods = list(adapter_modules(module))
        for name, a in mods:
            if a.merged:
                raise AdapterFileError(f"{comp}.{name}: adapter is merged; unmerge it before exporting")
            key = kohya_name(comp, module, name)
            down, up, alpha = written_factors(a)  # magnitude-only: zeros; DVoRA: the expanded A', B'
            tensors[f"{key}.lora_down.weight"] = down.float().cpu().contiguous().clone()
            tensors[f"{key}.lora_up.weight"] = up.float().cpu().contiguous().clone()
            tensors[f"{key}.alpha"] = torch.tensor(float(alpha))
            if a.method in ("dora", "magnitude", "dvora"):  # dvora: written as DoRA with A' = dA, B' = bB
                tensors[f"{key}.dora_scale"] = a.magnitude.detach().float().cpu().reshape(-1, 1).clone()  # [out, 1]
            elif a.method == "dora_in":
                tensors[f"{key}.dora_scale"] = a.magnitude.detach().float().cpu().reshape(1, -1).clone()  # [1, in]
        if mods:
            first = kohya_name(comp, module, mods[0][0])  # rank and alpha as written (magnitude-only: 1, 1)
            summary[comp] = {
                "method": mods[0][1].method,
                "rank": tensors[f"{first}.lora_down.weight"].shape[0],
                "alpha": float(tensors[f"{first}.alpha"]),
                "layers": len(mods),
            }
    if not tensors:
        raise AdapterFileError("nothing to export: no adapters found")
    return tensors, summary


def magnitude_axis_of(obj: Any) -> str | None:
    """``out``, ``in`` or ``mixed``: the axis of the DoRA magnitudes of ``obj``'s adapters (``None``: LoRA only)."""
    axes = {
        "in" if a.method == "dora_in" else "out"
        for module in components_of(obj).values()
        for _, a in adapter_modules(module)
        if a.method != "lora"
    }
    return None if not axes else axes.pop() if len(axes) == 1 else "mixed"


def kohya_header(
    summary: Mapping[str, Any],
    metadata: Mapping[str, Any] | None,
    *,
    layout: str = KOHYA_LAYOUT,
    axis: str | None = None,
) -> dict[str, str]:
    """The safetensors metadata: sd-scripts' ``ss_*`` keys (LyCORIS network args: ``dora_wd``, ``wd_on_output``
    for the file's magnitude axis) and our entry."""
    first = next(iter(summary.values()))
    args: dict[str, str] = {}
    if axis is not None:
        args = {"algo": "lora", "dora_wd": "true"}
        if axis != "mixed":  # LyCORIS has one axis per network; a mixed file has none to declare
            args["wd_on_output"] = "true" if axis == "out" else "false"
    return {
        "format": "pt",
        "ss_network_module": "lycoris.kohya" if axis else "networks.lora",
        "ss_network_dim": str(first["rank"]),
        "ss_network_alpha": str(first["alpha"]),
        "ss_network_args": json.dumps(args),
        "ss_base_model_version": "sdxl_base_v1-0",
        "modelspec.architecture": "stable-diffusion-xl-v1-base/lora",
        METADATA_KEY: json.dumps(
            {
                "format_version": FORMAT_VERSION,
                "layout": layout,
                "magnitude_axis": axis or "out",
                "components": dict(summary),
                **dict(metadata or {}),
            },
            sort_keys=True,
        ),
    }


def save_kohya(
    obj: Any, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write a kohya/LyCORIS ``.safetensors`` (atomic; an existing file is kept unless ``overwrite``)."""
    file = output_file(path, "adapter_kohya.safetensors", overwrite)
    tensors, summary = kohya_state_dict(obj)
    return save_safetensors_atomic(tensors, file, kohya_header(summary, metadata, axis=magnitude_axis_of(obj)))


# --------------------------------------------------------------------------------------------
# Read
# --------------------------------------------------------------------------------------------


def _lookup(comps: Mapping[str, nn.Module]) -> dict[str, tuple[str, str, nn.Linear]]:
    table: dict[str, tuple[str, str, nn.Linear]] = {}
    for comp, module in comps.items():
        for name, child in module.named_modules():
            if isinstance(child, AdapterLinear):
                child = child.base
            elif not isinstance(child, nn.Linear) or name.endswith(".base"):
                continue
            for key in _kohya_names(comp, module, name):
                table.setdefault(key, (comp, name, child))
            if comp == "text_encoder":  # SD 1.x-style single text encoder prefix
                for key in _kohya_names(comp, module, name):
                    table.setdefault("lora_te_" + key.removeprefix("lora_te1_"), (comp, name, child))
    return table


def _magnitude_axis(scale: torch.Tensor, out_f: int, in_f: int, declared: str | None, where: str) -> str:
    shape = tuple(scale.shape)
    if len(shape) == 2 and shape == (out_f, 1):
        return "out"
    if len(shape) == 2 and shape == (1, in_f):
        return "in"
    if len(shape) == 1 and out_f != in_f and shape[0] in (out_f, in_f):
        return "out" if shape[0] == out_f else "in"
    if len(shape) == 1 and shape[0] == out_f == in_f:
        if declared in ("out", "in"):
            return declared
        raise AdapterFileError(
            f"{where}: dora_scale {shape} fits both axes of a square layer and the file does not say which"
        )
    raise AdapterFileError(f"{where}: dora_scale shape {shape} fits neither [{out_f}, 1] nor [1, {in_f}]")


def plan_kohya(
    pipe: Any, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], source: str, *, layout: str = KOHYA_LAYOUT
) -> tuple[dict[tuple[str, str], AdapterLinear], LoadReport]:
    """Build one adapter per module of a kohya file, checked against ``pipe`` before anything changes.

    Every ``dora_scale`` is taken as the DoRA magnitude. ``layout``: the layout the caller reads; a file
    whose metadata names another one (our ComfyUI file, whose ``dora_scale`` is not the magnitude) is refused
    (``comfyui.plan_comfyui`` reads that one).
    """
    comps = components_of(pipe)
    ours = our_entry(meta, source, strict=False)
    written_for = ours.get("layout", KOHYA_LAYOUT)
    if written_for != layout:
        raise AdapterFileError(f"{source}: written as the {written_for!r} layout, read here as {layout!r}")
    declared = ours.get("magnitude_axis")
    if declared is None:  # LyCORIS records wd_on_output in its network args
        try:
            args = json.loads(meta.get("ss_network_args", "{}"))
            if isinstance(args, dict) and "wd_on_output" in args:
                declared = "out" if str(args["wd_on_output"]).lower() == "true" else "in"
        except json.JSONDecodeError:
            pass
    table = _lookup(comps)
    groups: dict[str, dict[str, torch.Tensor]] = {}
    left: list[str] = []
    for key, t in tensors.items():
        for suffix, part in SUFFIXES.items():
            if key.endswith(suffix):
                groups.setdefault(key[: -len(suffix)], {})[part] = t
                break
        else:
            left.append(key)
    planned: dict[tuple[str, str], AdapterLinear] = {}
    report = LoadReport(str(source), {}, {}, {}, {}, [], ours)
    problems: list[str] = []
    for key, parts in sorted(groups.items()):
        if key not in table:
            problems.append(f"{key}: no such Linear layer in this pipeline")
            continue
        comp, name, base = table[key]
        if "lora_A" not in parts or "lora_B" not in parts:
            problems.append(f"{key}: needs lora_down and lora_up (has {sorted(parts)})")
            continue
        down, up = parts["lora_A"], parts["lora_B"]
        out_f, in_f = base.weight.shape
        if down.dim() != 2 or up.dim() != 2:  # conv LoRA (LoCon) keys
            problems.append(
                f"{key}: only Linear LoRA is supported here (down {tuple(down.shape)}, up {tuple(up.shape)})"
            )
            continue
        r = down.shape[0]
        if tuple(down.shape) != (r, in_f) or tuple(up.shape) != (out_f, r):
            problems.append(
                f"{key}: lora_down {tuple(down.shape)} / lora_up {tuple(up.shape)} do not fit Linear({in_f}, {out_f})"
            )
            continue
        alpha = float(parts["alpha"]) if "alpha" in parts else float(r)
        if "dora_scale" in parts:
            axis = _magnitude_axis(parts["dora_scale"], out_f, in_f, declared, f"{source}: {key}")
            method = "dora" if axis == "out" else "dora_in"
        else:
            method = "lora"
        adapter = ADAPTER_CLASSES[method](base, rank=r, alpha=alpha, dtype=torch.float32)
        with torch.no_grad():
            adapter.lora_A.copy_(down)
            adapter.lora_B.copy_(up)
            if method != "lora":
                adapter.magnitude.copy_(parts["dora_scale"].reshape(-1))
        planned[(comp, name)] = adapter
        report.add(comp, method, r, alpha)
    report.keys_left_over = sorted(left)
    raise_if_problems(source, problems)
    if not planned:
        raise AdapterFileError(f"{source}: no LoRA/DoRA modules found")
    return planned, report
