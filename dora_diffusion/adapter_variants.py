"""The other adapters, built on LoRA's and DoRA's layers: DVoRA (VeRA's direction under a DoRA magnitude),
DoRA with its magnitude per input column, and the magnitude alone."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_layers import AdapterLinear, DoRALinear, LoRALinear, check_rank
from .adapter_math import (
    EPS,
    acc,
    column_norm,
    lora_delta,
    merged_weight,
    scale_rows,
    squared_row_norm,
    vera_matrices,
)
from .fused import NormCache, scale_rows_node


class DVoRALinear(DoRALinear):
    """DVoRA (paper §5.4): VeRA's direction under a DoRA magnitude.

    ``ΔV = diag(b)·B·diag(d)·A`` with VeRA's frozen random ``A: [r, in]``, ``B: [out, r]`` (shared by all
    layers of one shape, regenerated from a seed) and trainable ``d: [r]``, ``b: [out]``;
    ``W' = m ⊙ (W0 + ΔV) / ‖W0 + ΔV‖_row``. It is DoRA with ``A' = diag(d)·A`` and ``B' = diag(b)·B``
    (so the factored norm, the cache and the merge are the DoRA ones), and it exports as such.
    """

    method = "dvora"

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        norm_grad: str = "detach",
        seed: int = 0,
        shared: dict | None = None,
    ) -> None:
        AdapterLinear.__init__(self, base, rank, float(rank) if alpha is None else alpha, dropout)
        check_rank(base, rank)
        self.seed = int(seed)
        kw = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        key = (self.seed, base.out_features, base.in_features, rank)
        pair = shared.get(key) if shared is not None else None
        if pair is None:
            pair = tuple(t.to(**kw) for t in vera_matrices(self.seed, base.out_features, base.in_features, rank))
            if shared is not None:
                shared[key] = pair
        self.register_buffer("vera_A", pair[0], persistent=False)  # [r, in], frozen, shared per shape
        self.register_buffer("vera_B", pair[1], persistent=False)  # [out, r]
        self.vera_d = nn.Parameter(torch.full((rank,), 0.1, **kw))  # [r], VeRA's init
        self.vera_b = nn.Parameter(torch.zeros(base.out_features, **kw))  # [out]: ΔV = 0 at init
        self._init_magnitude(base, dtype, norm_grad)

    def _direction_tensors(self) -> tuple[torch.Tensor, ...]:
        return (self.vera_d, self.vera_b)

    @property
    def lora_A(self) -> torch.Tensor:  # A' = diag(d)·A  [r, in]
        return self.vera_d.unsqueeze(1) * self.vera_A

    @property
    def lora_B(self) -> torch.Tensor:  # B' = diag(b)·B  [out, r]
        return self.vera_b.unsqueeze(1) * self.vera_B

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.dropout(x).to(self.vera_d.dtype)
        h = F.linear(h, self.vera_A) * self.vera_d  # d ⊙ (A·x)
        return (F.linear(h, self.vera_B) * self.vera_b * self.scaling).to(x.dtype)  # b ⊙ (B·…)


class DoRAInputAxisLinear(LoRALinear):
    """DoRA with one magnitude per INPUT column, as LyCORIS < 3.2 and OneTrainer write it
    (``dora_scale: [1, in]``): ``W' = (W0 + s·B·A) · diag(m / ‖W0 + s·B·A‖_col)``.

    A different function from the paper's output-row DoRA (``DoRALinear``), loaded exactly rather
    than converted: ``y = W0·(g ⊙ x) + s·B·A·(g ⊙ x) + bias`` with ``g = m / n_col``. Inference and
    export only (the trainer trains the paper's axis).
    """

    method = "dora_in"

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(base, rank, alpha, dropout, dtype)
        w = acc(base.weight)
        self.magnitude = nn.Parameter(torch.linalg.vector_norm(w, dim=0).to(dtype or base.weight.dtype))  # [in]
        self._norm_cache = NormCache()

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        # detached and cached, as in the row case (paper §4.3)
        n = self._norm_cache.get(
            (self.base.weight, self.lora_A, self.lora_B),
            (self.scaling,),
            lambda: column_norm(self.base.weight, self.lora_A, self.lora_B, self.scaling).clamp_min(math.sqrt(EPS)),
        )
        xs = x * (acc(self.magnitude) / n).to(x.dtype)  # g ⊙ x
        return self.base(xs) + self.lora_forward(xs)

    def adapted_weight(self) -> torch.Tensor:
        w = merged_weight(self.base.weight, self.lora_A, self.lora_B, self.scaling)
        return w * (acc(self.magnitude) / torch.linalg.vector_norm(w, dim=0).clamp_min(math.sqrt(EPS))).unsqueeze(0)

    def _unmerge_state(self):
        with torch.no_grad():
            return column_norm(self.base.weight, self.lora_A, self.lora_B, self.scaling)

    def _original_weight(self) -> torch.Tensor:
        w = acc(self.base.weight) * (self._saved_for_unmerge / acc(self.magnitude)).unsqueeze(0)
        return w - lora_delta(self.lora_A, self.lora_B, self.scaling)


class MagnitudeLinear(AdapterLinear):
    """Magnitude-only (paper §5.6): ``W' = m ⊙ W0 / ‖W0‖_row``; trainable ``m: [out]`` only."""

    method = "magnitude"

    def __init__(
        self,
        base: nn.Linear,
        rank: int = 0,
        alpha: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(base, 0, 0.0, 0.0)
        self.register_buffer("w0_norm", squared_row_norm(base.weight).sqrt(), persistent=False)  # [out]
        self.magnitude = nn.Parameter(self.w0_norm.clone().to(dtype or base.weight.dtype))

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        z = F.linear(x, self.base.weight)
        n = self.w0_norm.clamp_min(math.sqrt(EPS))
        if not torch.is_grad_enabled():
            return scale_rows(z, self.magnitude, n, self.base.bias)[0]
        return scale_rows_node(z, self.magnitude, n, self.base.bias)

    def adapted_weight(self) -> torch.Tensor:
        return merged_weight(self.base.weight, None, None, 0.0, self.magnitude)

    def _original_weight(self) -> torch.Tensor:
        return acc(self.base.weight) * (self.w0_norm / acc(self.magnitude)).unsqueeze(1)
