"""Wrapping target modules in adapters, merging them in, taking them out; the adapter API in one place.

What to adapt and how is ``adapter_config.AdapterConfig``, which layers ``targets``, the state dicts
``adapter_state``: their names are re-exported here.
"""

from __future__ import annotations

import torch
from torch import nn

from .adapter_config import FULL, METHODS, TRAIN_METHODS, AdapterConfig, format_policy, parse_policy
from .adapter_state import (
    ADAPTER_PARAMS,
    adapter_state_dict,
    check_state_dict,
    expected_shapes,
    load_adapter_state_dict,
)
from .layers import (
    ADAPTER_CLASSES,
    RESIDUAL_TAILS,
    AdapterLinear,
    DoRALinear,
    DVoRALinear,
    LoRALinear,
    MagnitudeLinear,
    adapter_modules,
)
from .targets import (
    ALL_LINEAR_EXCLUDE,
    CLIP_ATTN,
    CLIP_FF,
    POLICY_GROUPS,
    PRESETS,
    UNET_ATTN,
    UNET_FF,
    AdapterError,
    name_matches,
    select_targets,
    target_patterns,
)


def find_targets(module: nn.Module, config: AdapterConfig) -> list[str]:
    """Names of the ``nn.Linear`` modules of ``module`` that ``config`` adapts (sorted as in the model)."""
    return select_targets(module, config.targets, require_match=False)


def set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    """Put ``new`` at the dotted ``name`` inside ``root`` (``a.b.c``: ``root.a.b.c = new``)."""
    parent_name, _, leaf = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, leaf, new)


def make_adapter(base: nn.Linear, config: AdapterConfig, name: str = "", shared: dict | None = None) -> AdapterLinear:
    """Wrap one ``nn.Linear`` as ``config`` says; errors name the module. ``shared``: DVoRA's per-shape matrices."""
    method = config.method_for(name)
    cls = ADAPTER_CLASSES[method]
    kwargs = {
        "rank": config.rank,
        "alpha": config.scale_alpha,
        "dropout": config.dropout,
        "dtype": config.torch_adapter_dtype,
    }
    if method in ("dora", "dvora"):
        kwargs["norm_grad"] = config.norm_grad
    if method == "dvora":
        kwargs.update(seed=config.vera_seed, shared=shared if shared is not None else {})
    try:
        return cls(base, **kwargs)
    except ValueError as e:
        raise AdapterError(f"{name or 'module'}: {e}") from None


def add_adapters(module: nn.Module, config: AdapterConfig, *, require_match: bool = True) -> list[str]:
    """Wrap the target ``nn.Linear`` layers of ``module`` in place; return their names.

    The layers are ``select_targets(module, config.targets)``: every explicit pattern must match at least one
    layer (a typo is an error, not a no-op). Base weights are frozen; only the adapter parameters require grad.
    """
    if config.method == FULL:
        raise AdapterError("method: 'full' trains the targeted layers themselves and has no adapter")
    if any(True for _ in adapter_modules(module)):
        raise AdapterError("this module already has adapters; remove or merge them first")
    names = select_targets(module, config.targets, require_match=require_match)
    # Check every layer before changing anything: a failure leaves the module untouched.
    for name in names:
        if config.method_for(name) != "magnitude":
            layer = module.get_submodule(name)
            if config.rank > min(layer.in_features, layer.out_features):
                raise AdapterError(
                    f"{name}: rank must be in 1..{min(layer.in_features, layer.out_features)} for a "
                    f"Linear({layer.in_features}, {layer.out_features}), got {config.rank}"
                )
    shared: dict = {}  # DVoRA: one frozen (A, B) pair per layer shape
    adapters = {name: make_adapter(module.get_submodule(name), config, name, shared) for name in names}
    for p in module.parameters():
        p.requires_grad_(False)
    for name, adapter in adapters.items():
        if (
            config.memory_saving
            and isinstance(adapter, DoRALinear)
            and any(name_matches(name, t) for t in RESIDUAL_TAILS)
        ):
            adapter.magnitude_grad = "recompute"
        set_submodule(module, name, adapter)
    for _, adapter in adapter_modules(module):
        adapter.base.requires_grad_(False)
    return names


def adapter_parameters(module: nn.Module) -> list[nn.Parameter]:
    """The trainable adapter parameters (what the optimizer gets)."""
    return [p for _, a in adapter_modules(module) for n, p in a.named_parameters() if not n.startswith("base.")]


def merge_adapters(module: nn.Module) -> list[str]:
    """Bake every adapter into its base weight and put the plain ``nn.Linear`` back (zero overhead).

    Returns the names of the merged layers. Irreversible: save the adapter first if you need it.
    """
    names = []
    for name, adapter in list(adapter_modules(module)):
        adapter.merge()
        set_submodule(module, name, adapter.base)
        names.append(name)
    return names


@torch.no_grad()
def as_dora(module: nn.Module) -> list[str]:
    """Replace every DVoRA adapter by the equal DoRA one (``A' = diag(d)·A``, ``B' = diag(b)·B``), so
    that files in the diffusers and kohya formats hold it in a layout every DoRA loader reads."""
    names = []
    for name, a in list(adapter_modules(module)):
        if isinstance(a, DVoRALinear):
            d = DoRALinear(a.base, a.rank, a.alpha, dtype=a.vera_d.dtype, norm_grad=a.norm_grad)
            d.lora_A.copy_(a.lora_A)
            d.lora_B.copy_(a.lora_B)
            d.magnitude.copy_(a.magnitude)
            d.scale, d.enabled = a.scale, a.enabled
            set_submodule(module, name, d)
            names.append(name)
    return names


def remove_adapters(module: nn.Module) -> list[str]:
    """Drop every adapter and put the original ``nn.Linear`` back (unmerging first)."""
    names = []
    for name, adapter in list(adapter_modules(module)):
        adapter.unmerge()
        set_submodule(module, name, adapter.base)
        names.append(name)
    return names


def adapter_summary(module: nn.Module) -> dict:
    """Counts for logs: layers adapted, trainable adapter parameters, and both per method."""
    mods = list(adapter_modules(module))
    per: dict[str, dict[str, int]] = {}
    for _, a in mods:
        entry = per.setdefault(a.method, {"layers": 0, "trainable_parameters": 0})
        entry["layers"] += 1
        entry["trainable_parameters"] += sum(p.numel() for n, p in a.named_parameters() if not n.startswith("base."))
    return {
        "layers": len(mods),
        "trainable_parameters": sum(p.numel() for p in adapter_parameters(module)),
        "methods": sorted(per),
        "per_method": per,
    }


__all__ = [
    "ADAPTER_PARAMS",
    "ALL_LINEAR_EXCLUDE",
    "CLIP_ATTN",
    "CLIP_FF",
    "FULL",
    "METHODS",
    "POLICY_GROUPS",
    "PRESETS",
    "TRAIN_METHODS",
    "UNET_ATTN",
    "UNET_FF",
    "AdapterConfig",
    "AdapterError",
    "add_adapters",
    "adapter_parameters",
    "adapter_state_dict",
    "adapter_summary",
    "as_dora",
    "check_state_dict",
    "expected_shapes",
    "find_targets",
    "format_policy",
    "load_adapter_state_dict",
    "make_adapter",
    "merge_adapters",
    "name_matches",
    "parse_policy",
    "remove_adapters",
    "select_targets",
    "set_submodule",
    "target_patterns",
    "DoRALinear",
    "DVoRALinear",
    "LoRALinear",
    "MagnitudeLinear",
]
