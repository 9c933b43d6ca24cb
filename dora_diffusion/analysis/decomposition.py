"""The pure math of the weight-decomposition analysis (DoRA paper §3.2, Eq. 2–4), and the fits.

Over the OUTPUT rows ``n`` of a torch weight ``[out, in]`` (DoRA's magnitude axis, see ``layers``):

    ΔM = mean_n | ‖W'_n‖ − ‖W0_n‖ |          (DoRA: ‖W'_n‖ = m_n, so this is mean_n |m_n − ‖W0_n‖|)
    ΔD = mean_n (1 − cos(W'_n, W0_n))

``1 − cos`` is computed as ``½‖Ŵ'_n − Ŵ0_n‖²`` (unit rows; the same number), which keeps its
digits when the angle is small: ``1 − cos`` taken from the cosine itself is lost below ~1e-7 in fp32,
which is where short fine-tuning runs live.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

import numpy as np
import torch

from ..layers import AdapterLinear, DoRALinear, MagnitudeLinear, acc, merged_weight, squared_row_norm


def _common(a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Both in one accumulation dtype: fp32 for half precision, fp64 if either is fp64."""
    dtype = torch.promote_types(acc(a).dtype, acc(b).dtype)
    return a.to(dtype), b.to(dtype)


def row_magnitudes(w: torch.Tensor) -> torch.Tensor:
    """``‖W_n‖`` per output row of ``w: [out, in]``; a 1-D ``w`` already is one (a DoRA ``m: [out]``)."""
    if w.dim() == 1:
        return acc(w)
    if w.dim() != 2:
        raise ValueError(f"expected a weight [out, in] or a magnitude vector [out], got shape {tuple(w.shape)}")
    return squared_row_norm(w).sqrt()


def delta_m(w: torch.Tensor, w0: torch.Tensor) -> float:
    """ΔM = mean_n |‖W_n‖ − ‖W0_n‖| (paper Eq. 3). Either argument may be a magnitude vector ``[out]``."""
    m, m0 = _common(row_magnitudes(w), row_magnitudes(w0))
    if m.shape != m0.shape:
        raise ValueError(f"magnitudes of {tuple(w.shape)} and {tuple(w0.shape)} differ in length")
    return float((m - m0).abs().mean().detach())


def direction_change(w: torch.Tensor, w0: torch.Tensor) -> torch.Tensor:
    """``1 − cos(W_n, W0_n)`` per output row, ``[out]``, in [0, 2] (small angles keep their digits).

    A zero row has no direction: two zero rows count as unchanged (0), one zero row as orthogonal (1).
    """
    if w.shape != w0.shape or w.dim() != 2:
        raise ValueError(f"expected two weights of one shape [out, in], got {tuple(w.shape)} and {tuple(w0.shape)}")
    w, w0 = _common(w, w0)
    n, n0 = torch.linalg.vector_norm(w, dim=1), torch.linalg.vector_norm(w0, dim=1)  # [out]
    u = w / torch.where(n > 0, n, 1).unsqueeze(1)  # unit rows  [out, in]
    u0 = w0 / torch.where(n0 > 0, n0, 1).unsqueeze(1)
    d = 0.5 * (u - u0).square().sum(dim=1)  # ½‖û − û0‖² = 1 − cos
    d = torch.where((n > 0) & (n0 > 0), d, torch.where((n > 0) | (n0 > 0), 1.0, 0.0).to(d.dtype))
    return d.clamp(0.0, 2.0)


def delta_d(w: torch.Tensor, w0: torch.Tensor) -> float:
    """ΔD = mean_n (1 − cos(W_n, W0_n)) (paper Eq. 4)."""
    return float(direction_change(w, w0).mean())


class Decomposition(NamedTuple):
    delta_m: float
    delta_d: float


def layer_decomposition(
    w0: torch.Tensor,
    lora_a: torch.Tensor | None = None,
    lora_b: torch.Tensor | None = None,
    scale: float = 1.0,
    magnitude: torch.Tensor | None = None,
) -> Decomposition:
    """ΔM and ΔD of one adapted matrix against its base ``w0: [out, in]``.

    LoRA (``A``, ``B``): of ``W' = W0 + s·B·A``; ΔM from ``W'``'s row norms.
    DoRA (``A``, ``B``, ``m``): ΔM from ``m`` (``‖W'_n‖ = m_n``), ΔD from ``W'``.
    Magnitude-only (``m``): ΔD is exactly 0 (``W'_n`` is ``W0_n`` rescaled by ``m_n / ‖W0_n‖``;
    2 for a row whose ``m_n`` turned negative).
    """
    _check_shapes(w0, lora_a, lora_b, magnitude)
    if lora_a is None and lora_b is None:
        if magnitude is None:
            raise ValueError("no adapter parameters: give lora_a and lora_b, magnitude, or all three")
        m = acc(magnitude)
        directions = torch.where(row_magnitudes(w0) > 0, 1.0 - torch.sign(m), 0.0)  # [out]
        return Decomposition(delta_m(m, w0), float(directions.mean()))
    if lora_a is None or lora_b is None:
        raise ValueError("lora_a and lora_b come together")
    w = merged_weight(w0, lora_a, lora_b, scale, magnitude)  # [out, in]
    return Decomposition(delta_m(w if magnitude is None else magnitude, w0), delta_d(w, w0))


@torch.no_grad()
def adapter_decomposition(adapter: AdapterLinear) -> Decomposition:
    """ΔM and ΔD of one adapter module against the base weight it wraps (which must be unmerged).

    Output-row magnitudes (DoRA, DVoRA, magnitude-only) go through ``layer_decomposition``; any other
    adapter (LoRA, DoRA with a per-input magnitude) through its own ``adapted_weight()``.
    """
    if adapter.merged:
        raise ValueError("the adapter is merged into its base weight; unmerge it first")
    w0 = adapter.base.weight
    if isinstance(adapter, MagnitudeLinear):
        return layer_decomposition(w0, magnitude=adapter.magnitude)
    if isinstance(adapter, DoRALinear):  # DVoRA too: its lora_A, lora_B are diag(d)·A, diag(b)·B
        return layer_decomposition(w0, adapter.lora_A, adapter.lora_B, adapter.scaling, adapter.magnitude)
    w = adapter.adapted_weight()  # [out, in]
    return Decomposition(delta_m(w, w0), delta_d(w, w0))


def _check_shapes(
    w0: torch.Tensor, lora_a: torch.Tensor | None, lora_b: torch.Tensor | None, magnitude: torch.Tensor | None
) -> None:
    if w0.dim() != 2:
        raise ValueError(f"base weight: expected [out, in], got {tuple(w0.shape)}")
    out, inp = w0.shape
    rank = lora_a.shape[0] if lora_a is not None and lora_a.dim() == 2 else -1
    expected = {"lora_A": (lora_a, (rank, inp)), "lora_B": (lora_b, (out, rank)), "magnitude": (magnitude, (out,))}
    bad = [
        f"{k} {tuple(t.shape)}, expected {shape}"
        for k, (t, shape) in expected.items()
        if t is not None and tuple(t.shape) != shape
    ]
    if bad:
        raise ValueError(f"does not fit the base weight {tuple(w0.shape)}: " + "; ".join(bad))


def pearson(x: Sequence[float], y: Sequence[float]) -> float:
    """Pearson's r of two samples; NaN for fewer than 2 points or a constant sample."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return math.nan
    dx, dy = x - x.mean(), y - y.mean()
    den = math.sqrt(float(dx @ dx) * float(dy @ dy))
    return float(np.clip(float(dx @ dy) / den, -1.0, 1.0)) if den > 0 else math.nan


def linear_fit(x: Sequence[float], y: Sequence[float]) -> tuple[float, float]:
    """Least-squares line ``y = slope·x + intercept``; NaNs when ``x`` does not vary."""
    x, y = np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64)
    if x.size < 2:
        return math.nan, math.nan
    dx = x - x.mean()
    sxx = float(dx @ dx)
    if sxx == 0:
        return math.nan, math.nan
    slope = float(dx @ (y - y.mean())) / sxx
    return slope, float(y.mean() - slope * x.mean())
