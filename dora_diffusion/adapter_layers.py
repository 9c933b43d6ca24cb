"""The adapter layers: the base class around an ``nn.Linear`` (merge, unmerge, scale), LoRA and DoRA. The
math they compute is in ``adapter_math``, DoRA's autograd node in ``fused``; ``layers`` is the public face."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .adapter_math import (
    acc,
    lora_delta,
    merged_weight,
    row_norm,
    row_norm_from_cross,
    squared_row_norm,
)
from .fused import DoRAFunction, NormCache, dora_forward, folds


def check_rank(base: nn.Linear, rank: int) -> None:
    max_rank = min(base.in_features, base.out_features)
    if not 0 < rank <= max_rank:
        raise ValueError(
            f"rank must be in 1..{max_rank} for a Linear({base.in_features}, {base.out_features}), got {rank}"
        )


# Layers whose output feeds a residual add, so no later op keeps it (see DoRAFunction).
RESIDUAL_TAILS = ("to_out.0", "ff.net.2", "out_proj", "fc2", "proj_out")


# --------------------------------------------------------------------------------------------
# Modules
# --------------------------------------------------------------------------------------------


class AdapterLinear(nn.Module):
    """Base of every adapter: keeps the frozen original ``nn.Linear`` inside as ``base``."""

    method: str = "none"

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"adapters wrap nn.Linear, got {type(base).__name__}")
        self.base = base
        base.weight.requires_grad_(False)
        if base.bias is not None:
            base.bias.requires_grad_(False)
        self.rank = int(rank)
        self.alpha = float(alpha)
        self.scale = 1.0  # run-time multiplier (set_adapter_scale); 1.0 = as trained
        self.enabled = True
        self.merged = False
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> torch.Tensor:  # some callers (diffusers attention processors) read .weight
        return self.base.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return self.base.bias

    @property
    def scaling(self) -> float:
        """``s = alpha / r · scale``."""
        return self.alpha / self.rank * self.scale if self.rank > 0 else self.scale

    def adapted_weight(self) -> torch.Tensor:
        """``W'`` in fp32 from the current parameters (the base weight must be unmerged)."""
        raise NotImplementedError

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.merged or not self.enabled:
            if self.merged and not self.enabled:
                raise RuntimeError("adapter is merged; use disable_adapters(model), which unmerges first")
            return self.base(x)
        return self.delta_forward(x)

    # Lifecycle: idempotent merge / unmerge (litgpt-style).
    @torch.no_grad()
    def merge(self) -> None:
        if self.merged:
            return
        self._saved_for_unmerge = self._unmerge_state()
        self.base.weight.copy_(self.adapted_weight().to(self.base.weight.dtype))
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        if not self.merged:
            return
        self.base.weight.copy_(self._original_weight().to(self.base.weight.dtype))
        self.merged = False
        self._saved_for_unmerge = None

    def _unmerge_state(self):
        return None

    def _original_weight(self) -> torch.Tensor:
        raise NotImplementedError

    def extra_repr(self) -> str:
        return f"method={self.method}, rank={self.rank}, alpha={self.alpha}, scale={self.scale}, merged={self.merged}"


class LoRALinear(AdapterLinear):
    """``y = base(x) + s·B(A(drop(x)))``; ``A: [r, in]`` Kaiming-uniform, ``B: [out, r]`` zeros."""

    method = "lora"

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__(base, rank, rank if alpha is None else alpha, dropout)
        check_rank(base, rank)
        kw = {"device": base.weight.device, "dtype": dtype or base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, **kw))  # [r, in]
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, **kw))  # [out, r]
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))  # as nn.Linear / PEFT

    def lora_forward(self, x: torch.Tensor) -> torch.Tensor:
        """``s·B(A(drop(x)))`` in the adapter's dtype, cast back to ``x``'s."""
        h = self.dropout(x).to(self.lora_A.dtype)
        return (F.linear(F.linear(h, self.lora_A), self.lora_B) * self.scaling).to(x.dtype)

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        # PEFT's own op order, so that our LoRA is PEFT's bit for bit (the baseline DoRA is compared
        # with). Accumulating s·B·A·x into base(x) by the GEMM (as DoRA does) saves two [..., out]
        # passes, but its fp32 rounding then differs from PEFT's.
        return self.base(x) + self.lora_forward(x)

    def adapted_weight(self) -> torch.Tensor:
        return merged_weight(self.base.weight, self.lora_A, self.lora_B, self.scaling)

    def _original_weight(self) -> torch.Tensor:
        return acc(self.base.weight) - lora_delta(self.lora_A, self.lora_B, self.scaling)


class DoRALinear(LoRALinear):
    """``y = g ⊙ (W0·x + s·B(A(drop(x)))) + bias``, ``g = m / ‖W0 + s·B·A‖_row``, ``m: [out]``.

    ``norm_grad``: ``"detach"`` (paper §4.3, default) or ``"exact"`` (paper Eq. 6).
    """

    method = "dora"

    def __init__(
        self,
        base: nn.Linear,
        rank: int,
        alpha: float | None = None,
        dropout: float = 0.0,
        dtype: torch.dtype | None = None,
        norm_grad: str = "detach",
    ) -> None:
        super().__init__(base, rank, alpha, dropout, dtype)
        self._init_magnitude(base, dtype, norm_grad)

    def _init_magnitude(self, base: nn.Linear, dtype: torch.dtype | None, norm_grad: str) -> None:
        """``m = ‖W0‖_row`` and the norm's state (shared with DVoRA)."""
        if norm_grad not in ("detach", "exact"):
            raise ValueError(f"norm_grad must be 'detach' or 'exact', got {norm_grad!r}")
        self.norm_grad = norm_grad
        # Where the magnitude's gradient comes from: the saved output (``output``: free when the next op
        # keeps it) or recomputing z in backward (``recompute``: for residual tails). ``add_adapters`` sets it.
        self.magnitude_grad = "output"
        # ‖W0‖² per row: fixed while W0 is; refreshed if W0 is changed in place or moved.
        w0_sq = squared_row_norm(base.weight)
        self.register_buffer("w0_sq", w0_sq, persistent=False)  # [out], fp32
        self._w0_cache = NormCache()
        self._w0_cache.get((base.weight,), (), lambda: w0_sq)
        self._norm_cache = NormCache()
        self.magnitude = nn.Parameter(self.w0_sq.sqrt().to(dtype or base.weight.dtype))  # m: [out], per OUTPUT row

    def _direction_tensors(self) -> tuple[torch.Tensor, ...]:
        """The trainable tensors the direction comes from (what the norm cache is keyed on)."""
        return (self.lora_A, self.lora_B)

    def _w0_sq(self) -> torch.Tensor:
        self.w0_sq = self._w0_cache.get((self.base.weight,), (), lambda: squared_row_norm(self.base.weight))
        return self.w0_sq

    def _norm_key(self) -> tuple:
        return NormCache.key_of((self.base.weight, *self._direction_tensors()), (self.scaling,))

    def _norm_of(self, w0_at: torch.Tensor) -> torch.Tensor:
        """The norm from ``W0·Aᵀ`` (computed by the caller), under ``no_grad``."""
        with torch.no_grad():
            return row_norm_from_cross(w0_at, self.lora_A, self.lora_B, self.scaling, self._w0_sq())

    def weight_norm(self) -> torch.Tensor:
        """``n = ‖W0 + s·B·A‖_row`` ([out], fp32). Detached mode: cached on the version counters."""
        if torch.compiler.is_compiling():
            # Data pointers and version counters are opaque to the compiler: no cache keys in a
            # compiled graph. The factored norm is cheap ([out, in]·[in, r]); W0 is frozen there.
            with torch.set_grad_enabled(torch.is_grad_enabled() and self.norm_grad == "exact"):
                return row_norm(self.base.weight, self.lora_A, self.lora_B, self.scaling, self.w0_sq)
        if self.norm_grad == "exact":
            return row_norm(self.base.weight, self.lora_A, self.lora_B, self.scaling, self._w0_sq())
        return self._norm_cache.get(
            (self.base.weight, *self._direction_tensors()),
            (self.scaling,),
            lambda: row_norm(self.base.weight, self.lora_A, self.lora_B, self.scaling, self._w0_sq()),
        )

    def delta_forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.norm_grad == "exact":  # gradient through m / n by autograd (paper Eq. 6)
            n = self.weight_norm()
            z = F.linear(x, self.base.weight) + self.lora_forward(x)  # W0·x + s·B·A·x, one base matmul
            g = (acc(self.magnitude) / n).to(z.dtype)
            return z * g + self.base.bias.to(z.dtype) if self.base.bias is not None else z * g
        w0, bias, lora_a, lora_b = self.base.weight, self.base.bias, self.lora_A, self.lora_B
        if torch.is_autocast_enabled(x.device.type):
            # what autocast would run the matmuls in; the fused layer casts nothing itself
            cd = torch.get_autocast_dtype(x.device.type)
            x, lora_a, lora_b = x.to(cd), lora_a.to(cd), lora_b.to(cd)
        if w0.dtype != x.dtype:
            w0 = w0.to(x.dtype)
        if bias is not None and bias.dtype != x.dtype:
            bias = bias.to(x.dtype)
        # The first forward after a step computes the norm; where the layer does not fold g into W0
        # (fewer tokens than input features), W0·Aᵀ rides on the forward's own GEMM (``dora_forward``).
        key = None if torch.compiler.is_compiling() else self._norm_key()
        n = None if key is None else self._norm_cache.peek(key)
        if n is None and (key is None or folds(x.reshape(-1, w0.shape[1]), w0)):
            n = self.weight_norm()
        h = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
        computed: list[torch.Tensor] = []
        if torch.is_grad_enabled():
            y = DoRAFunction.apply(
                x,
                h,
                w0,
                bias,
                lora_a,
                lora_b,
                self.magnitude,
                n,
                self.scaling,
                self.magnitude_grad != "recompute",
                self._norm_of,
                computed,
            )
        else:
            y, *_, norm = dora_forward(x, h, w0, bias, lora_a, lora_b, self.magnitude, n, self.scaling, self._norm_of)
            computed.append(norm)
        if n is None:
            self._norm_cache.put(key, computed[0])
        return y

    def adapted_weight(self) -> torch.Tensor:
        return merged_weight(self.base.weight, self.lora_A, self.lora_B, self.scaling, self.magnitude)

    def _unmerge_state(self):
        with torch.no_grad():
            return row_norm(self.base.weight, self.lora_A, self.lora_B, self.scaling)

    def _original_weight(self) -> torch.Tensor:
        # W' = (m/n) ⊙ (W0 + sBA)  =>  W0 = W' ⊙ n/m − sBA  (exact in fp32; half precision rounds)
        n = self._saved_for_unmerge
        w = acc(self.base.weight) * (n / acc(self.magnitude)).unsqueeze(1)
        return w - lora_delta(self.lora_A, self.lora_B, self.scaling)
