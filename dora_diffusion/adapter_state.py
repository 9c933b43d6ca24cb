"""Adapter state dicts: ``{f"{module_name}.{param}": tensor}``, read from and written into a module's adapters."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from .layers import adapter_modules
from .targets import AdapterError

# State dict: {f"{module_name}.{param}": tensor}, param in lora_A [r, in], lora_B [out, r], magnitude [out].
ADAPTER_PARAMS = {
    "lora": ("lora_A", "lora_B"),
    "dora": ("lora_A", "lora_B", "magnitude"),
    "magnitude": ("magnitude",),
    "dora_in": ("lora_A", "lora_B", "magnitude"),  # dora_in: magnitude [in] (files from other tools)
    "dvora": ("vera_d", "vera_b", "magnitude"),
}


def adapter_state_dict(module: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter parameters of ``module``, keyed ``<module name>.<lora_A|lora_B|magnitude>`` (detached copies)."""
    sd = {}
    for name, adapter in adapter_modules(module):
        for p in ADAPTER_PARAMS[adapter.method]:
            sd[f"{name}.{p}"] = getattr(adapter, p).detach().clone()
    return sd


def expected_shapes(module: nn.Module) -> dict[str, tuple[int, ...]]:
    return {
        f"{name}.{p}": tuple(getattr(adapter, p).shape)
        for name, adapter in adapter_modules(module)
        for p in ADAPTER_PARAMS[adapter.method]
    }


def check_state_dict(module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict") -> None:
    """Raise ``AdapterError`` listing missing, unexpected and mis-shaped keys (nothing is changed)."""
    expected = expected_shapes(module)
    missing = sorted(set(expected) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(expected))
    wrong = sorted(
        f"{k}: file {tuple(state_dict[k].shape)} vs model {expected[k]}"
        for k in set(expected) & set(state_dict)
        if tuple(state_dict[k].shape) != expected[k]
    )
    problems = []
    if missing:
        problems.append(f"{len(missing)} missing (e.g. {', '.join(missing[:3])})")
    if unexpected:
        problems.append(f"{len(unexpected)} unexpected (e.g. {', '.join(unexpected[:3])})")
    if wrong:
        problems.append(f"{len(wrong)} with the wrong shape (e.g. {'; '.join(wrong[:3])})")
    if problems:
        raise AdapterError(f"{source} does not fit {type(module).__name__}: " + "; ".join(problems))


@torch.no_grad()
def load_adapter_state_dict(
    module: nn.Module, state_dict: Mapping[str, torch.Tensor], *, source: str = "state dict"
) -> None:
    """Copy ``state_dict`` into ``module``'s adapters; strict on keys and shapes, checked before any write."""
    check_state_dict(module, state_dict, source=source)
    for name, adapter in adapter_modules(module):
        if adapter.merged:
            raise AdapterError(f"{name}: adapter is merged; unmerge before loading weights")
        for p in ADAPTER_PARAMS[adapter.method]:
            getattr(adapter, p).copy_(state_dict[f"{name}.{p}"])
