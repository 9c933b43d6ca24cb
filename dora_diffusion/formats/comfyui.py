"""The file for ComfyUI and Forge: the kohya file, with a ``dora_scale`` that their DoRA formula turns into our W'.

ComfyUI (``comfy/weight_adapter/base.py: weight_decompose``, checked at ``COMFYUI_COMMIT``) and Forge (the same
function in ``backend/patcher/lora.py``) apply an output-axis ``dora_scale [out, 1]`` as

    W_full = (W0 + ΔW) · dora_scale / (‖W0‖_row + eps)       eps = finfo(float32).eps, their fp32 working copy

dividing by the row norm of W0, not of W0 + ΔW as DoRA defines it (and LyCORIS computes it). So this file stores

    dora_scale = m · (‖W0‖_row + eps) / ‖W0 + ΔW‖_row           [out, 1], computed from the base model's weights

and their W_full is our ``W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖_row`` at strength 1. The rest is the kohya file: LoRA
layers are identical, and input-axis DoRA (``dora_scale [1, in]``) too, since their input-axis branch normalises
W0 + ΔW as it should. A loader that divides by ‖W0 + ΔW‖_row (LyCORIS, sd-scripts, and ComfyUI itself if it merges
Comfy-Org/ComfyUI#15458) reads this file wrongly: the kohya export is the file for those. The metadata says so,
and ``load_adapter`` reads the file back exactly (it has the base weights from the pipeline).
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from ..layers import AdapterLinear, adapter_modules
from .base import LoadReport, components_of, output_file, save_safetensors_atomic
from .kohya import kohya_header, kohya_name, kohya_state_dict, magnitude_axis_of, plan_kohya

COMFYUI_LAYOUT = "comfyui"  # our metadata's ``layout`` for this file
COMFYUI_COMMIT = "a125cd84b054a57729b5eecab930ca9408719832"  # Comfy-Org/ComfyUI, 2025-10-12: what the tests run
COMFYUI_EPS = torch.finfo(torch.float32).eps  # weight_decompose: finfo(weight.dtype).eps of the fp32 working copy
NOTE = (
    "for ComfyUI and Forge only: their DoRA (weight_decompose) divides by ||W0||_row + eps, and this dora_scale "
    "is m * (||W0||_row + eps) / ||W0 + dW||_row so that they compute W' exactly (checked against ComfyUI "
    f"{COMFYUI_COMMIT[:8]}). LyCORIS, sd-scripts and other kohya loaders divide by ||W0 + dW||_row: use the kohya "
    "export there, and also in ComfyUI if it merges Comfy-Org/ComfyUI#15458 (then this file is the wrong one)."
)


def _norms(w0: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(‖W0‖_row + eps, ‖W0 + (alpha/r)·up·down‖_row)`` in fp64, ``[out]`` each
    (r = ``down.shape[0]``, as ComfyUI)."""
    w = w0.detach().to("cpu", torch.float64)
    v = w + (float(alpha) / down.shape[0]) * (up.to("cpu", torch.float64) @ down.to("cpu", torch.float64))  # [out, in]
    return torch.linalg.vector_norm(w, dim=1) + COMFYUI_EPS, torch.linalg.vector_norm(v, dim=1)


def comfyui_dora_scale(
    w0: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float, magnitude: torch.Tensor
) -> torch.Tensor:
    """``m · (‖W0‖_row + eps) / ‖W0 + ΔW‖_row`` as ``[out, 1]`` fp32: the output-axis ``dora_scale`` ComfyUI needs."""
    w0_norm, v_norm = _norms(w0, down, up, alpha)
    return (magnitude.detach().double().reshape(-1) * w0_norm / v_norm).float().reshape(-1, 1)


def magnitude_from_comfyui(
    w0: torch.Tensor, down: torch.Tensor, up: torch.Tensor, alpha: float, dora_scale: torch.Tensor
) -> torch.Tensor:
    """The inverse: DoRA's ``m: [out]`` (fp32) from a ``dora_scale`` written for ComfyUI's normalisation."""
    w0_norm, v_norm = _norms(w0, down, up, alpha)
    return (dora_scale.double().reshape(-1) * v_norm / w0_norm).float()


def comfyui_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """The kohya tensors of ``obj``'s adapters, every output-axis ``dora_scale`` rewritten for ComfyUI."""
    tensors, summary = kohya_state_dict(obj)
    for comp, module in components_of(obj).items():
        for name, a in adapter_modules(module):
            key = kohya_name(comp, module, name)
            scale = tensors.get(f"{key}.dora_scale")
            if scale is None or a.method == "dora_in":  # LoRA; input axis: ComfyUI normalises W0 + ΔW there
                continue
            tensors[f"{key}.dora_scale"] = comfyui_dora_scale(
                a.base.weight,
                tensors[f"{key}.lora_down.weight"],
                tensors[f"{key}.lora_up.weight"],
                float(tensors[f"{key}.alpha"]),
                scale,
            )
    return tensors, summary


def save_comfyui(
    obj: Any, path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None, overwrite: bool = False
) -> Path:
    """Write the ComfyUI/Forge ``.safetensors`` (atomic; an existing file is kept unless ``overwrite``)."""
    file = output_file(path, "adapter_comfyui.safetensors", overwrite)
    tensors, summary = comfyui_state_dict(obj)
    dtypes = sorted(
        {
            str(a.base.weight.dtype).removeprefix("torch.")
            for m in components_of(obj).values()
            for _, a in adapter_modules(m)
        }
    )
    target = {
        "loaders": "ComfyUI, Forge (weight_decompose: output-axis dora_scale divided by ||W0||_row + eps)",
        "dora_scale": "m * (||W0||_row + eps) / ||W0 + dW||_row, [out, 1]; "
        "input-axis [1, in] and LoRA layers as in the kohya file",
        "eps": COMFYUI_EPS,
        "computed_on_base_dtype": dtypes,
        "comfyui_commit": COMFYUI_COMMIT,
        "not_for": "LyCORIS / sd-scripts / kohya loaders (they divide by ||W0 + dW||_row): use the kohya export",
    }
    header = kohya_header(
        summary, {**dict(metadata or {}), "comfyui": target}, layout=COMFYUI_LAYOUT, axis=magnitude_axis_of(obj)
    )
    header["dora_diffusion_note"] = NOTE
    return save_safetensors_atomic(tensors, file, header)


def plan_comfyui(
    pipe: Any, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], source: str
) -> tuple[dict[tuple[str, str], AdapterLinear], LoadReport]:
    """Read our ComfyUI/Forge file back exactly: the kohya reader, then every output-axis DoRA magnitude
    recovered from its ``dora_scale [out, 1] = m·(‖W0‖ + eps)/‖W0 + ΔW‖`` with the pipeline's own W0."""
    planned, report = plan_kohya(pipe, tensors, meta, source, layout=COMFYUI_LAYOUT)
    with torch.no_grad():
        for adapter in planned.values():
            if adapter.method == "dora":  # LoRA and input-axis DoRA are as in the kohya file
                adapter.magnitude.copy_(
                    magnitude_from_comfyui(
                        adapter.base.weight, adapter.lora_A, adapter.lora_B, adapter.alpha, adapter.magnitude
                    )
                )
    return planned, report
