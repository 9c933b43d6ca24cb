"""LoRA, DoRA and magnitude-only adapters around an existing ``nn.Linear``, and their pure math.

This module is their public face: the registry of methods (``ADAPTER_CLASSES``), the model-wide helpers, and
re-exports of the parts: ``adapter_math`` (the pure functions: norms, merged weights), ``fused`` (DoRA's
autograd node and the norm cache), ``adapter_layers`` (the base class, LoRA, DoRA) and ``adapter_variants``
(DVoRA, DoRA per input column, magnitude-only).

Axis convention (the one bug most DoRA code has had): a torch ``nn.Linear`` weight ``W0`` is
``[out, in]``. DoRA keeps ONE magnitude per OUTPUT row: ``m: [out]``, initialised to ``‖W0‖_row``
(the L2 norm over ``in`` of each row). The paper writes ``W`` as ``[in, out]`` and calls this the
column norm; it is the same axis. PEFT, torchtune and the authors' code use it too.

DoRA (Liu et al. 2024, arXiv 2402.09353):

    W' = m ⊙ (W0 + s·B·A) / n,   n = ‖W0 + s·B·A‖_row,   s = alpha / r · runtime scale

The row norm is computed factored (``row_norm``) without ever building the ``[out, in]`` matrix:

    n_i² = ‖W0_i‖² + 2s·⟨B_i, (W0·Aᵀ)_i⟩ + s²·B_i·(A·Aᵀ)·B_iᵀ

By default ``n`` is treated as a constant in backprop (paper §4.3), so it is computed under
``no_grad`` and cached, keyed on the parameters' version counters: once per optimizer step (also under
gradient accumulation and checkpointing) and once at inference. ``norm_grad="exact"`` keeps the
gradient through the norm (paper Eq. 6), still factored.

Forward: ``y = g ⊙ (W0·x + s·B·(A·x)) + bias`` with ``g = m / n``: one base matmul, no second
``F.linear`` with a dense merged weight. Training runs the layer as one autograd node
(``DoRAFunction``): ``g`` folded into GEMM operands where that is the cheaper pass, the low-rank term
accumulated by its GEMM, and the magnitude's gradient recovered from the saved OUTPUT
(``∂y/∂m = (y - bias) / m``), which the next layer keeps alive anyway, so DoRA stores no activation
that LoRA does not.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

from .adapter_layers import RESIDUAL_TAILS, AdapterLinear, DoRALinear, LoRALinear
from .adapter_math import (
    EPS,
    acc,
    column_norm,
    dense_row_norm,
    lora_delta,
    merged_weight,
    row_norm,
    row_norm_from_cross,
    scale_rows,
    squared_row_norm,
    vera_matrices,
    w0_times_at,
)
from .adapter_variants import DoRAInputAxisLinear, DVoRALinear, MagnitudeLinear
from .fused import NormCache

__all__ = [  # the math is re-exported: ``layers`` is where callers find the adapters and what they compute
    "EPS",
    "acc",
    "column_norm",
    "dense_row_norm",
    "lora_delta",
    "merged_weight",
    "row_norm",
    "row_norm_from_cross",
    "scale_rows",
    "squared_row_norm",
    "vera_matrices",
    "w0_times_at",
    "NormCache",
    "RESIDUAL_TAILS",
    "ADAPTER_CLASSES",
    "AdapterLinear",
    "LoRALinear",
    "DoRALinear",
    "DVoRALinear",
    "DoRAInputAxisLinear",
    "MagnitudeLinear",
    "adapter_modules",
    "set_adapter_scale",
    "disable_adapters",
]


ADAPTER_CLASSES: dict[str, type[AdapterLinear]] = {
    "lora": LoRALinear,
    "dora": DoRALinear,
    "magnitude": MagnitudeLinear,
    "dora_in": DoRAInputAxisLinear,
    "dvora": DVoRALinear,
}


# --------------------------------------------------------------------------------------------
# Model-wide helpers
# --------------------------------------------------------------------------------------------


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterLinear]]:
    """``(name, module)`` of every adapter in ``model``."""
    for name, module in model.named_modules():
        if isinstance(module, AdapterLinear):
            yield name, module


def set_adapter_scale(model: nn.Module, scale: float) -> None:
    """Run-time strength of every adapter: ``s = alpha / r · scale`` (PEFT's ``set_scale``).

    For DoRA the scale moves the direction only; the learned magnitude stays (as in PEFT and
    diffusers' ``set_adapters``), so scale 0 is the magnitude-only model, not the base model. Use
    ``disable_adapters`` for the base model.
    """
    for _, module in adapter_modules(model):
        if module.merged:
            raise RuntimeError("cannot rescale a merged adapter; unmerge it first")
        module.scale = float(scale)


@contextlib.contextmanager
def disable_adapters(model: nn.Module) -> Iterator[nn.Module]:
    """Within the block, ``model`` computes with its base weights (merged adapters unmerged)."""
    touched = []
    for _, module in adapter_modules(model):
        was_merged = module.merged
        module.unmerge()
        touched.append((module, module.enabled, was_merged))
        module.enabled = False
    try:
        yield model
    finally:
        for module, enabled, was_merged in touched:
            module.enabled = enabled
            if was_merged:
                module.merge()
