"""The diffusers/PEFT adapter file (``pytorch_lora_weights.safetensors``), which ``pipe.load_lora_weights`` reads.

Keys (torch layout, magnitude per OUTPUT row):

    unet.<module>.lora.down.weight                                 [r, in]
    unet.<module>.lora.up.weight                                   [out, r]
    unet.<module>.lora_magnitude_vector                            [out]      (DoRA)
    text_encoder[_2].text_model.<module>.lora_linear_layer.down.weight / .up.weight / .lora_magnitude_vector.weight

Text-encoder keys always carry the ``text_model.`` level (the canonical spelling that files in the wild
use), whatever the installed transformers calls its modules (transformers 5 dropped that level from
``CLIPTextModel`` but not from ``CLIPTextModelWithProjection``).

Alpha is not in the keys. It is written twice in the safetensors metadata: as diffusers'
``lora_adapter_metadata`` (the ``LoraConfig`` kwargs per component, which diffusers' loader applies,
so alpha != rank loads right there too) and in our own ``dora_diffusion`` entry (method, rank, alpha,
axis, targets, base model and anything the caller adds).

A magnitude-only adapter (paper §5.6) is written as DoRA with ``A = 0``, ``B = 0``, rank 1: then
``W' = m ⊙ W0 / ‖W0‖_row`` exactly, so diffusers loads it too; our loader reads it back as magnitude-only.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..inject import ADAPTER_PARAMS, AdapterError
from ..layers import ADAPTER_CLASSES, AdapterLinear, adapter_modules
from .base import (
    FORMAT_VERSION,
    MAGNITUDE_ONLY_ALPHA,
    MAGNITUDE_ONLY_RANK,
    METADATA_KEY,
    TEXT_ENCODERS,
    AdapterFileError,
    LoadReport,
    canonical_name,
    components_of,
    module_name,
    our_entry,
    output_file,
    raise_if_problems,
    save_safetensors_atomic,
    written_factors,
)

WEIGHT_NAME = "pytorch_lora_weights.safetensors"
DIFFUSERS_METADATA_KEY = "lora_adapter_metadata"  # diffusers.loaders.lora_base.LORA_ADAPTER_METADATA_KEY
# Text-encoder magnitudes are spelled ``...lora_magnitude_vector.weight``. With transformers 5,
# diffusers (0.42) hands text-encoder keys to transformers' own adapter loader, which expects the
# parameter's full name (``lora_magnitude_vector.<adapter>.weight``) and silently DROPS keys spelled
# ``...lora_magnitude_vector`` (the spelling PEFT and diffusers' own scripts write): the text encoders
# then run with fresh magnitudes = ‖W0‖ and give wrong outputs. PEFT's loader accepts both spellings.
TE_MAGNITUDE_SUFFIX = ".lora_magnitude_vector.weight"
INPUT_AXIS_REFUSAL = (
    "{where}: input-axis DoRA (dora_scale [1, in], as LyCORIS < 3.2 and OneTrainer write it) has no "
    "diffusers/PEFT layout: their DoRA magnitude is per output row, and no output-row DoRA equals it. "
    "Export it with --format kohya or comfyui, or merged into the model (merged-folder, merged-single)"
)


# --------------------------------------------------------------------------------------------
# Keys
# --------------------------------------------------------------------------------------------


_LAYER_KEYS = {  # file suffix -> our parameter name; first match wins
    ".lora.down.weight": "lora_A",
    ".lora.up.weight": "lora_B",
    ".lora_linear_layer.down.weight": "lora_A",
    ".lora_linear_layer.up.weight": "lora_B",
    ".lora_A.weight": "lora_A",
    ".lora_B.weight": "lora_B",
    ".lora_magnitude_vector.weight": "magnitude",
    ".lora_magnitude_vector": "magnitude",
    ".vera_lambda_d": "vera_d",
    ".vera_lambda_b": "vera_b",
}


def _file_suffixes(component: str) -> dict[str, str]:
    vera = {"vera_d": ".vera_lambda_d", "vera_b": ".vera_lambda_b"}  # DVoRA, compact: only we read these
    if component == "unet":
        return {
            "lora_A": ".lora.down.weight",
            "lora_B": ".lora.up.weight",
            "magnitude": ".lora_magnitude_vector",
            **vera,
        }
    return {
        "lora_A": ".lora_linear_layer.down.weight",
        "lora_B": ".lora_linear_layer.up.weight",
        "magnitude": TE_MAGNITUDE_SUFFIX,
        **vera,
    }


# --------------------------------------------------------------------------------------------
# Save
# --------------------------------------------------------------------------------------------


def _uniform(values: list, what: str, component: str):
    if len(set(values)) != 1:
        raise AdapterError(
            f"{component}: adapters with mixed {what} ({sorted(set(values))}) cannot be saved in one file"
        )
    return values[0]


def diffusers_state_dict(obj: Any) -> tuple[dict[str, torch.Tensor], dict[str, dict]]:
    """The file's tensors and a per-component summary (method, rank, alpha, layer names)."""
    tensors: dict[str, torch.Tensor] = {}
    summary: dict[str, dict] = {}
    for comp, module in components_of(obj).items():
        mods = list(adapter_modules(module))
        if not mods:
            continue
        for name, a in mods:
            if a.merged:
                raise AdapterError(f"{comp}.{name}: adapter is merged; unmerge it before saving")
            if a.method == "dora_in":  # PEFT's DoRA is per output row; W0·(diag(g) − I) is not low-rank
                raise AdapterError(INPUT_AXIS_REFUSAL.format(where=f"{comp}.{name}"))
        methods = {a.method for _, a in mods}
        if len(methods) > 1 and methods != {"dora", "magnitude"}:
            raise AdapterError(
                f"{comp}: methods {sorted(methods)} cannot share one diffusers file (PEFT's use_dora is "
                "per file); export to the kohya format instead"
            )
        method = "dora" if len(methods) > 1 else methods.pop()
        suffix = _file_suffixes(comp)
        layers, layer_methods = [], {}
        for name, a in mods:
            canon = canonical_name(comp, module, name)
            layers.append(canon)
            if a.method != method:
                layer_methods[canon] = a.method
            if a.method == "magnitude":  # as DoRA with A = B = 0 (see module docstring)
                down, up, _ = written_factors(a)
                tensors[f"{comp}.{canon}{suffix['lora_A']}"] = down
                tensors[f"{comp}.{canon}{suffix['lora_B']}"] = up
            for p in ADAPTER_PARAMS[a.method]:
                tensors[f"{comp}.{canon}{suffix[p]}"] = getattr(a, p).detach().to("cpu").contiguous().clone()
        directional = [a for _, a in mods if a.method != "magnitude"]
        rank = _uniform([a.rank for a in directional], "ranks", comp) if directional else MAGNITUDE_ONLY_RANK
        alpha = _uniform([a.alpha for a in directional], "alphas", comp) if directional else MAGNITUDE_ONLY_ALPHA
        extra = {"norm_grad": mods[0][1].norm_grad} if method in ("dora", "dvora") else {}
        if method == "dvora":
            extra["vera_seed"] = _uniform([a.seed for _, a in mods], "VeRA seeds", comp)
        if layer_methods:
            extra["layer_methods"] = layer_methods
        summary[comp] = {"method": method, "rank": rank, "alpha": alpha, "layers": layers, **extra}
    if not tensors:
        raise AdapterError("nothing to save: no adapters found")
    return tensors, summary


def _peft_targets(comp: str, layers: list[str]) -> list[str]:
    # PEFT matches a target on the whole name or a dotted suffix; text-encoder names without the
    # ``text_model.`` level match both transformers namings.
    if comp in TEXT_ENCODERS:
        return sorted(n.removeprefix("text_model.") for n in layers)
    return sorted(layers)


def save_adapter(
    obj: Any,
    path: str | os.PathLike,
    *,
    format: str = "diffusers",
    metadata: Mapping[str, Any] | None = None,
    overwrite: bool = False,
) -> Path:
    """Write the adapters of ``obj`` (pipeline, ``{component: module}`` or a UNet) to ``path``.

    ``path`` is a folder (``pytorch_lora_weights.safetensors`` is written in it) or a ``.safetensors`` file.
    The write is atomic (a temporary file renamed into place); an existing file is kept unless
    ``overwrite``. ``metadata`` (JSON-able) is stored with our entry, e.g. ``{"base_model": ...}``.
    """
    if format != "diffusers":
        raise AdapterError(f"format: only 'diffusers' is written here, got {format!r}")
    file = output_file(path, WEIGHT_NAME, overwrite)
    tensors, summary = diffusers_state_dict(obj)
    ours = {"format_version": FORMAT_VERSION, "magnitude_axis": "out", "components": summary, **dict(metadata or {})}
    diffusers_meta: dict[str, Any] = {}
    for comp, s in summary.items():
        if s["method"] == "dvora":  # diffusers cannot read the compact DoRA-VeRA layout; export expands it
            continue
        cfg = {
            "r": s["rank"],
            "lora_alpha": s["alpha"],
            "use_dora": s["method"] != "lora",
            "target_modules": _peft_targets(comp, s["layers"]),
            "init_lora_weights": True,
        }
        magnitude_only = _peft_targets(comp, [n for n, m in s.get("layer_methods", {}).items() if m == "magnitude"])
        if magnitude_only:  # written as rank-1 DoRA with A = B = 0: PEFT needs their rank and alpha
            cfg["rank_pattern"] = {f"^(.*\\.)?{re.escape(n)}$": MAGNITUDE_ONLY_RANK for n in magnitude_only}
            cfg["alpha_pattern"] = {f"^(.*\\.)?{re.escape(n)}$": MAGNITUDE_ONLY_ALPHA for n in magnitude_only}
        diffusers_meta.update({f"{comp}.{k}": v for k, v in cfg.items()})
    header = {
        "format": "pt",
        METADATA_KEY: json.dumps(ours, sort_keys=True),
        DIFFUSERS_METADATA_KEY: json.dumps(diffusers_meta, indent=2, sort_keys=True),
    }
    return save_safetensors_atomic(tensors, file, header)


# --------------------------------------------------------------------------------------------
# Read
# --------------------------------------------------------------------------------------------


@dataclass
class LayerSpec:
    component: str
    name: str  # the installed library's module name
    params: dict[str, torch.Tensor] = field(default_factory=dict)


def _parse_layers(
    tensors: Mapping[str, torch.Tensor], comps: Mapping[str, nn.Module]
) -> tuple[dict[tuple[str, str], LayerSpec], list[str]]:
    layers: dict[tuple[str, str], LayerSpec] = {}
    left: list[str] = []
    for key, t in tensors.items():
        if key.startswith("base_model.model."):  # a PEFT adapter_model.safetensors of a bare UNet
            key = "unet." + key.removeprefix("base_model.model.")
        comp, _, rest = key.partition(".")
        if comp not in comps:
            left.append(key)
            continue
        for suffix, param in _LAYER_KEYS.items():
            if rest.endswith(suffix):
                name = module_name(comp, comps[comp], rest[: -len(suffix)])
                layers.setdefault((comp, name), LayerSpec(comp, name)).params[param] = t
                break
        else:
            left.append(key)
    return layers, left


def _alpha_from_metadata(meta: Mapping[str, str], comp: str, ours: Mapping[str, Any]) -> float | None:
    if comp in ours.get("components", {}):
        return float(ours["components"][comp]["alpha"])
    raw = meta.get(DIFFUSERS_METADATA_KEY)
    if raw:
        try:
            d = json.loads(raw)
        except json.JSONDecodeError:
            return None
        if f"{comp}.lora_alpha" in d:
            return float(d[f"{comp}.lora_alpha"])
    return None


def plan_adapters(
    pipe: Any, tensors: Mapping[str, torch.Tensor], meta: Mapping[str, str], source: str
) -> tuple[dict[tuple[str, str], AdapterLinear], LoadReport]:
    """Build (but do not install) one adapter per layer of the file, checked against ``pipe``.

    Every name and shape is checked before anything is changed; errors name the file.
    """
    comps = components_of(pipe)
    ours = our_entry(meta, source)
    if ours.get("magnitude_axis", "out") != "out":
        raise AdapterFileError(f"{source}: magnitude axis {ours['magnitude_axis']!r} is not the output-row axis")
    layers, left = _parse_layers(tensors, comps)
    if not layers:
        which = ", ".join(sorted({k.split(".")[0] for k in tensors})[:5])
        raise AdapterFileError(
            f"{source}: no LoRA/DoRA keys for this pipeline's components {sorted(comps)} (file prefixes: {which})"
        )
    planned: dict[tuple[str, str], AdapterLinear] = {}
    report = LoadReport(str(source), {}, {}, {}, {}, sorted(left), ours)
    problems: list[str] = []
    vera_shared: dict = {}
    for (comp, name), spec in sorted(layers.items()):
        module = comps[comp]
        try:
            target = module.get_submodule(name)
        except AttributeError:
            problems.append(f"{comp}.{name}: no such module")
            continue
        if isinstance(target, AdapterLinear):
            target = target.base
        if not isinstance(target, nn.Linear):
            problems.append(f"{comp}.{name}: is {type(target).__name__}, not Linear")
            continue
        p = spec.params
        comp_meta = ours.get("components", {}).get(comp, {})
        declared = comp_meta.get("layer_methods", {}).get(canonical_name(comp, module, name), comp_meta.get("method"))
        if "vera_d" in p or "vera_b" in p:
            method = "dvora"
            if not {"vera_d", "vera_b", "magnitude"} <= set(p):
                problems.append(f"{comp}.{name}: incomplete DVoRA layer (has {sorted(p)})")
                continue
        elif declared == "magnitude" or ("magnitude" in p and "lora_A" not in p and "lora_B" not in p):
            method = "magnitude"
        elif "lora_A" in p and "lora_B" in p:
            method = "dora" if "magnitude" in p else "lora"
        else:
            problems.append(f"{comp}.{name}: incomplete (has {sorted(p)})")
            continue
        out_f, in_f = target.weight.shape
        expect = {"magnitude": (out_f,)}
        if method == "dvora":
            r = p["vera_d"].shape[0]
            expect.update({"vera_d": (r,), "vera_b": (out_f,)})
        elif method != "magnitude":
            r = p["lora_A"].shape[0]
            expect.update({"lora_A": (r, in_f), "lora_B": (out_f, r)})
        bad = [
            f"{k} {tuple(p[k].shape)} != {v}"
            for k, v in expect.items()
            if k in p and tuple(p[k].shape) != v and not (k == "magnitude" and p[k].numel() == out_f)
        ]
        if bad:
            problems.append(f"{comp}.{name}: " + "; ".join(bad))
            continue
        rank = 0 if method == "magnitude" else r
        alpha = _alpha_from_metadata(meta, comp, ours)
        alpha = float(rank) if alpha is None or method == "magnitude" else alpha
        kwargs: dict[str, Any] = {
            "rank": rank,
            "alpha": alpha,
            "dtype": p["magnitude" if method != "lora" else "lora_A"].dtype,
        }
        if method in ("dora", "dvora"):
            kwargs["norm_grad"] = comp_meta.get("norm_grad", "detach")
        if method == "dvora":
            if "vera_seed" not in comp_meta:
                problems.append(f"{comp}.{name}: DVoRA layer but the file records no VeRA seed")
                continue
            kwargs.update(seed=comp_meta["vera_seed"], shared=vera_shared)
        adapter = ADAPTER_CLASSES[method](target, **kwargs)
        with torch.no_grad():
            for param in ADAPTER_PARAMS[method]:
                getattr(adapter, param).copy_(p[param].reshape(getattr(adapter, param).shape))
        planned[(comp, name)] = adapter
        report.add(comp, method, rank, alpha)
    raise_if_problems(source, problems)
    return planned, report
