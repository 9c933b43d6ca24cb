"""The adapters' math, written once as pure functions: the layers, the merge, the exporters and the analysis
all call these. Shapes follow torch: ``W0: [out, in]``, ``A: [r, in]``, ``B: [out, r]``; DoRA's magnitude and
norm are per OUTPUT row (see ``layers``)."""

from __future__ import annotations

import math

import torch

EPS = 1e-12  # clamp for n² before sqrt; n² of a real weight row is many orders above this


def acc(t: torch.Tensor) -> torch.Tensor:
    """``t`` in an accumulation dtype: fp32 for half precision, fp64 stays fp64."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def squared_row_norm(weight: torch.Tensor) -> torch.Tensor:
    """``‖W_i‖²`` per output row, accumulated in fp32 (or fp64). ``weight: [out, in]`` -> ``[out]``."""
    w = acc(weight)
    return (w * w).sum(dim=1)


def row_norm(
    w0: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    w0_sq: torch.Tensor | None = None,
) -> torch.Tensor:
    """``‖W0 + scale·B·A‖_row`` by the factored formula, fp32, never forming ``[out, in]``.

    ``w0: [out, in]``, ``lora_a: [r, in]``, ``lora_b: [out, r]``; returns ``[out]`` (fp32, or fp64 for fp64 inputs).
    ``w0_sq`` is ``squared_row_norm(w0)`` when the caller has it cached.
    Its rounding error is on ``n²``, relative to ``‖W0_i‖² + ‖sBA_i‖²``: only a row that nearly
    cancels (``n ≪ ‖W0_i‖``, far from DoRA's regime, where ``n`` stays near ``‖W0_i‖``) loses digits.
    """
    if w0_sq is None:
        w0_sq = squared_row_norm(w0)
    return row_norm_from_cross(w0_times_at(w0, lora_a), lora_a, lora_b, scale, w0_sq)


def _reads_in_own_dtype(w0: torch.Tensor) -> bool:
    """Whether ``W0·Aᵀ`` runs in ``W0``'s half dtype: bf16 anywhere, fp16 where its GEMM is native (CUDA)."""
    return w0.dtype == torch.bfloat16 or (w0.dtype == torch.float16 and w0.device.type == "cuda")


def w0_times_at(w0: torch.Tensor, lora_a: torch.Tensor) -> torch.Tensor:
    """``W0·Aᵀ: [out, r]``, the norm's one read of ``W0``. A half-precision ``W0`` is read as it is (its GEMM
    accumulates in fp32; only ``A`` and the ``[out, r]`` result are rounded to its dtype, an error on the
    cross term alone, ~``2⁻⁸`` of a term that is itself small next to ``‖W0_i‖²``): casting ``W0`` to fp32
    first writes and reads a copy twice its size, every step, of every adapted weight (on SDXL's UNet,
    ~0.4 s of a 5 s CPU step at 256 px)."""
    if _reads_in_own_dtype(w0):
        return (lora_a.to(w0.dtype) @ w0.T).T
    a = acc(lora_a)
    return (a @ w0.to(a.dtype).T).T  # this order is the faster GEMM on CPU


def row_norm_from_cross(
    w0_at: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float, w0_sq: torch.Tensor
) -> torch.Tensor:
    """``row_norm`` given ``W0·Aᵀ: [out, r]`` (from ``w0_times_at``, or from the layer's own forward GEMM)."""
    a = acc(lora_a)
    b = acc(lora_b)
    # 2s·⟨B_i, (W0·Aᵀ)_i⟩ + s²·B_i·G·B_iᵀ = 2s·⟨B_i, (W0·Aᵀ + (s/2)·B·G)_i⟩ with G = A·Aᵀ: one addmm
    p = torch.addmm(w0_at.to(a.dtype), b, a @ a.T, alpha=scale / 2)  # [out, r]
    n_sq = torch.add(w0_sq, (b * p).sum(dim=1), alpha=2.0 * scale)  # [out]
    return n_sq.clamp_min_(EPS).sqrt_()


def dense_row_norm(w0: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """Reference: ``‖W0 + scale·B·A‖_row`` through the dense ``[out, in]`` matrix (tests, analysis)."""
    w = acc(w0) + scale * (acc(lora_b) @ acc(lora_a))  # [out, in]
    return torch.linalg.vector_norm(w, dim=1)


def lora_delta(lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``scale·B·A`` (fp32 or fp64), ``[out, in]``."""
    return scale * (acc(lora_b) @ acc(lora_a))


def merged_weight(
    w0: torch.Tensor,
    lora_a: torch.Tensor | None,
    lora_b: torch.Tensor | None,
    scale: float,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """The adapted weight ``W'`` (fp32, or fp64 for fp64 inputs), ``[out, in]``.

    LoRA: ``W0 + s·B·A``. DoRA: ``m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖_row``.
    Magnitude-only (no ``A``/``B``): ``m ⊙ W0 / ‖W0‖_row``.
    """
    w = acc(w0)
    if lora_a is not None and lora_b is not None:
        w = w + lora_delta(lora_a, lora_b, scale)
    if magnitude is not None:
        n = torch.linalg.vector_norm(w, dim=1).clamp_min(math.sqrt(EPS))
        w = w * (acc(magnitude) / n).unsqueeze(1)
    return w


def scale_rows(
    z: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, g)`` with ``g = m / n`` (in ``z``'s dtype) and ``y = z ⊙ g + bias``: the magnitude-only
    layer's output from ``z = W0·x`` (``ScaleRows`` and its no-grad path)."""
    g = (acc(magnitude.detach()) / norm).to(z.dtype)  # [out]
    y = torch.addcmul(bias.to(z.dtype), z, g) if bias is not None else z * g
    return y, g


def vera_matrices(
    seed: int, out_features: int, in_features: int, rank: int, dtype=torch.float32
) -> tuple[torch.Tensor, torch.Tensor]:
    """VeRA's frozen random ``A: [r, in]`` and ``B: [out, r]`` for one layer shape, from ``seed``.

    Kaiming-uniform like VeRA; the same (seed, shape, rank) always gives the same matrices (their
    values are defined in fp32), so all layers of one shape share them and a file only needs the seed.
    """
    g = torch.Generator("cpu").manual_seed(int(seed) * 1_000_003 + out_features * 7_919 + in_features * 31 + rank)
    a = (torch.rand(rank, in_features, generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(6.0 / in_features)
    b = (torch.rand(out_features, rank, generator=g, dtype=torch.float64) * 2 - 1) * math.sqrt(6.0 / rank)
    return a.to(dtype), b.to(dtype)


def column_norm(w0: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``‖W0 + scale·B·A‖`` per INPUT column (over the output axis), factored: ``[in]``.

    It is ``row_norm`` of the transpose: ``(W0 + sBA)ᵀ = W0ᵀ + s·Aᵀ·Bᵀ``.
    """
    return row_norm(w0.T, lora_b.T, lora_a.T, scale)
