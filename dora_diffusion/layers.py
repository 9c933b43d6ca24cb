"""LoRA, DoRA and magnitude-only adapters around an existing ``nn.Linear``, and their pure math.

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
(``_DoRAFunction``): ``g`` folded into GEMM operands where that is the cheaper pass, the low-rank term
accumulated by its GEMM, and the magnitude's gradient recovered from the saved OUTPUT
(``∂y/∂m = (y - bias) / m``), which the next layer keeps alive anyway, so DoRA stores no activation
that LoRA does not.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

EPS = 1e-12  # clamp for n² before sqrt; n² of a real weight row is many orders above this


# --------------------------------------------------------------------------------------------
# Pure math, written once: the layers, the merge and the exporters all call these.
# --------------------------------------------------------------------------------------------


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
    layer's output from ``z = W0·x`` (``_ScaleRows`` and its no-grad path)."""
    g = (acc(magnitude.detach()) / norm).to(z.dtype)  # [out]
    y = torch.addcmul(bias.to(z.dtype), z, g) if bias is not None else z * g
    return y, g


def _magnitude_grad_from_output(
    dy2: torch.Tensor,
    y2: torch.Tensor,
    magnitude: torch.Tensor,
    bias: torch.Tensor | None,
    sum_dy: torch.Tensor | None = None,
) -> torch.Tensor:
    """``∂L/∂m_i = Σ_t dy_ti · (y_ti − b_i) / m_i`` from 2-D ``dy2, y2: [t, out]`` (fp32 or fp64), as
    ``(Σ_t dy·y − b·Σ_t dy) / m``: no full-size ``y − b`` temporary."""
    m = acc(magnitude.detach())
    num = (dy2 * y2).sum(dim=0, dtype=m.dtype)
    if bias is not None:
        if sum_dy is None:
            sum_dy = dy2.sum(dim=0, dtype=m.dtype)
        num = torch.addcmul(num, acc(bias.detach()), sum_dy, value=-1)
    # An exactly-zero m_i loses its gradient here (y − b is 0 there); m starts at ‖W0_i‖ > 0.
    return num / torch.where(m == 0, 1.0, m)


class _ScaleRows(torch.autograd.Function):
    """``y = z ⊙ g + bias`` with ``g = m / n`` per output feature, saving its OUTPUT instead of ``z``
    (magnitude-only layers; DoRA's own layer is ``_DoRAFunction``).

    Autograd's own ``z * g`` would save ``z``: an extra ``[..., out]`` activation per layer. ``y`` is
    what the next op saves anyway (attention, GELU, the next Linear), so keeping it costs nothing:
    ``∂L/∂m_i = Σ_t dy_ti · z_ti / n_i = Σ_t dy_ti · (y_ti − b_i) / m_i``.
    ``n`` is a constant here: the detached norm of paper §4.3.
    """

    @staticmethod
    def forward(ctx, z: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None):
        y, g = scale_rows(z, magnitude, norm, bias)
        ctx.save_for_backward(y, magnitude, g, bias)
        return y

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        y, magnitude, g, bias = ctx.saved_tensors
        out = y.shape[-1]
        dz = dy * g if ctx.needs_input_grad[0] else None
        dm = db = None
        dy2 = dy.reshape(-1, out)
        sum_dy = (
            dy2.sum(dim=0, dtype=torch.float64 if dy.dtype == torch.float64 else torch.float32)
            if bias is not None
            else None
        )
        if ctx.needs_input_grad[1]:
            dm = _magnitude_grad_from_output(dy2, y.reshape(-1, out), magnitude, bias, sum_dy).to(magnitude.dtype)
        if bias is not None and ctx.needs_input_grad[3]:
            db = sum_dy.to(bias.dtype)
        return dz, dm, None, db


def _scale_rows(
    z: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return _ScaleRows.apply(z, magnitude, norm, bias)


def _add_low_rank(y: torch.Tensor, ax: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``y += ax·bᵀ`` in place (``ax: [t, r]``, ``b: [out, r]``): accumulated by the GEMM itself when the
    dtypes agree, else computed in the adapter's dtype and cast."""
    if ax.dtype == y.dtype:
        return y.addmm_(ax, b.T)
    return y.add_((ax @ b.T).to(y.dtype))


def _dora_output(
    x2: torch.Tensor,
    h2: torch.Tensor,
    w0: torch.Tensor,
    bias: torch.Tensor | None,
    lora_a: torch.Tensor,
    gbs: torch.Tensor,
    g: torch.Tensor,
    z0: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, A·h)`` with ``y = g ⊙ (W0·x + s·B·A·h) + bias`` for 2-D ``x2, h2: [t, in]``, written to
    touch the ``[t, out]`` output as few times as possible: ``g`` is folded into ``W0``'s rows (when
    that ``[out, in]`` pass is smaller than a ``[t, out]`` one) or applied in one pass together with
    the bias, and the low-rank term is accumulated into ``y`` by the GEMM itself (``addmm_``), with
    ``s·g`` folded into ``B``: ``gbs = s·g ⊙ B  [out, r]``. The low-rank product runs in the adapter's dtype.
    ``z0 = W0·x`` when the caller has it (``_dora_forward``'s shared GEMM)."""
    if z0 is None and folds(x2, w0):
        y = F.linear(x2, w0 * g.unsqueeze(1), bias)
    else:
        y = torch.mm(x2, w0.t()) if z0 is None else z0
        y = torch.addcmul(bias, y, g) if bias is not None else y.mul_(g)
    ax = torch.mm(h2 if h2.dtype == lora_a.dtype else h2.to(lora_a.dtype), lora_a.t())  # [t, r]
    return _add_low_rank(y, ax, gbs), ax


def folds(x2: torch.Tensor, w0: torch.Tensor) -> bool:
    """Whether the layer folds ``g`` into ``W0``'s rows (more tokens than input features) rather than
    scaling its output; where it does not, the norm can share the forward's GEMM (``_dora_forward``)."""
    return x2.shape[0] > w0.shape[1]


def _dora_scales(magnitude: torch.Tensor, norm: torch.Tensor, lora_b: torch.Tensor, scale: float, dtype: torch.dtype):
    """``g = m / n`` in ``dtype``, ``s·g`` and ``s·g ⊙ B`` in the adapter's dtype (all from fp32 / fp64)."""
    g32 = acc(magnitude.detach()) / norm
    gs = g32 * scale
    if gs.dtype != lora_b.dtype:
        gs = gs.to(lora_b.dtype)
    return (g32 if g32.dtype == dtype else g32.to(dtype)), gs, lora_b * gs.unsqueeze(1)


def _dora_forward(x, h, w0, bias, lora_a, lora_b, magnitude, norm, scale: float, norm_of=None):
    """``(y, A·h, g, s·g, n)`` for ``x, h: [..., in]`` (``h = None``: no dropout, ``h = x``); ``y: [..., out]``.

    ``norm = None``: the norm is not known yet (the first forward after an optimizer step) and the layer
    does not fold (``folds``): then ``W0·x`` and ``W0·Aᵀ`` come from ONE GEMM, ``[x; A]·W0ᵀ``, so the norm
    costs no read of ``W0`` of its own, and ``n = norm_of(W0·Aᵀ)`` (``row_norm_from_cross``)."""
    out_f, in_f = w0.shape
    x2 = x.reshape(-1, in_f)
    z0 = None
    if norm is None:
        t = x2.shape[0]
        za = torch.mm(torch.cat([x2, lora_a.to(x2.dtype)]), w0.t())  # [t + r, out]
        z0 = za[:t]
        norm = norm_of(za[t:].t())
    g, gs, gbs = _dora_scales(magnitude, norm, lora_b, scale, x.dtype)
    y, ax = _dora_output(x2, x2 if h is None else h.reshape(-1, in_f), w0, bias, lora_a, gbs, g, z0)
    return y.view(*x.shape[:-1], out_f), ax, g, gs, norm


class _DoRAFunction(torch.autograd.Function):
    """A whole DoRA layer with the detached norm (paper §4.3) as one autograd node:
    ``y = g ⊙ (W0·x + s·B·A·h) + bias``, ``g = m / n``, ``h = drop(x)``.

    Autograd's own graph of this layer would keep ``z = W0·x + s·B·A·h`` for the magnitude's gradient
    (an extra ``[..., out]`` activation per layer) and make several elementwise passes over
    ``[..., out]`` in each direction (the scale, the add, the rescale). Here:

    - forward: one base GEMM, ``g`` and the bias applied in at most one pass, the low-rank term added
      by its GEMM (see ``_dora_output``);
    - backward: ``dx = dy·(g ⊙ W0) + (dy·(s·g ⊙ B))·A``, ``dB = s·g ⊙ (dyᵀ·A·h)``, ``dA = (dy·s·g ⊙ B)ᵀ·h``:
      GEMMs with ``g`` folded into ``[out, ·]`` operands, no ``dy ⊙ g`` pass when folding is cheaper;
    - the magnitude's gradient ``∂L/∂m_i = Σ_t dy_ti · z_ti / n_i``: from the saved OUTPUT,
      ``z_ti / n_i = (y_ti − b_i) / m_i``, which the next op keeps alive anyway (``save_output``);
      or, for a layer whose output only feeds a residual add (``to_out.0``, ``ff.net.2``: nothing
      keeps it), by recomputing ``z`` from ``x`` and the saved ``A·h`` (one extra base GEMM).
    So DoRA keeps no activation that LoRA does not, beyond ``A·h: [t, r]``, which LoRA keeps too.
    """

    @staticmethod
    def forward(ctx, x, h, w0, bias, lora_a, lora_b, magnitude, norm, scale: float, save_output: bool, norm_of, out):
        y, ax, g, gs, norm = _dora_forward(x, h, w0, bias, lora_a, lora_b, magnitude, norm, scale, norm_of)
        out.append(norm)  # to the caller's cache (a norm computed here, by the shared GEMM)
        # g and s·g are [out]; s·g ⊙ B ([out, r]) is one multiply to redo in backward
        ctx.save_for_backward(x, h, ax, w0, bias, lora_a, lora_b, magnitude, norm, g, gs, y if save_output else None)
        ctx.scale = scale
        return y

    @staticmethod
    def backward(ctx, dy):
        x, h, ax, w0, bias, lora_a, lora_b, magnitude, norm, g, gs, y = ctx.saved_tensors
        out_f, in_f = w0.shape
        need = ctx.needs_input_grad
        dy2 = dy.reshape(-1, out_f)
        x2 = x.reshape(-1, in_f)
        dx = dh = db = da = dB = dm = None
        if need[6]:
            if y is not None:
                dm = _magnitude_grad_from_output(dy2, y.reshape(-1, out_f), magnitude, bias)
            else:
                z = _add_low_rank(torch.mm(x2, w0.t()), ax, lora_b * ctx.scale)
                dm = (dy2 * z).sum(dim=0, dtype=norm.dtype) / norm
            dm = dm.to(magnitude.dtype)
        dy_a = dy2 if dy2.dtype == lora_b.dtype else dy2.to(lora_b.dtype)
        dax = torch.mm(dy_a, lora_b * gs.unsqueeze(1))  # dy·(s·g ⊙ B)  [t, r]
        if need[0]:
            if dy2.shape[0] > in_f:
                dx = torch.mm(dy2, w0 * g.unsqueeze(1))
            else:
                dx = torch.mm(dy2 * g, w0)
            if h is None:
                _add_low_rank(dx, dax, lora_a.t())
            dx = dx.view(x.shape)
        if h is not None and need[1]:
            dh = torch.mm(dax, lora_a).to(h.dtype).view(h.shape)
        if need[3]:
            db = dy2.sum(dim=0).to(bias.dtype)
        if need[4]:
            h2 = x2 if h is None else h.reshape(-1, in_f)
            da = torch.mm(dax.t(), h2 if h2.dtype == dax.dtype else h2.to(dax.dtype))
        if need[5]:
            dB = torch.mm(dy_a.t(), ax).mul_(gs.unsqueeze(1))
        if need[2]:
            raise RuntimeError("DoRA's fused layer keeps the base weight frozen")
        return dx, dh, None, db, da, dB, dm, None, None, None, None, None


class NormCache:
    """A value computed under ``no_grad`` and kept until one of the tensors it came from changes
    (identity, in-place version counter, device, dtype) or an extra key (the scale) does: DoRA's norm
    once per optimizer step, also under gradient accumulation and checkpointing, and once at inference."""

    def __init__(self) -> None:
        self.key: tuple | None = None
        self.value: torch.Tensor | None = None

    @staticmethod
    def key_of(tensors, extra: tuple) -> tuple:
        return tuple((t.data_ptr(), t._version, t.device, t.dtype) for t in tensors) + extra

    def get(self, tensors, extra: tuple, compute) -> torch.Tensor:
        key = self.key_of(tensors, extra)
        if key != self.key:
            with torch.no_grad():
                self.value = compute()
            self.key = key
        return self.value

    def peek(self, key: tuple) -> torch.Tensor | None:
        """The value if it is still valid for ``key`` (``key_of``), else ``None``."""
        return self.value if key == self.key else None

    def put(self, key: tuple, value: torch.Tensor) -> None:
        self.key, self.value = key, value


def _check_rank(base: nn.Linear, rank: int) -> None:
    max_rank = min(base.in_features, base.out_features)
    if not 0 < rank <= max_rank:
        raise ValueError(
            f"rank must be in 1..{max_rank} for a Linear({base.in_features}, {base.out_features}), got {rank}"
        )


# Layers whose output feeds a residual add, so no later op keeps it (see _DoRAFunction).
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
        _check_rank(base, rank)
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
        # (fewer tokens than input features), W0·Aᵀ rides on the forward's own GEMM (``_dora_forward``).
        key = None if torch.compiler.is_compiling() else self._norm_key()
        n = None if key is None else self._norm_cache.peek(key)
        if n is None and (key is None or folds(x.reshape(-1, w0.shape[1]), w0)):
            n = self.weight_norm()
        h = None if isinstance(self.dropout, nn.Identity) else self.dropout(x)
        computed: list[torch.Tensor] = []
        if torch.is_grad_enabled():
            y = _DoRAFunction.apply(
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
            y, *_, norm = _dora_forward(x, h, w0, bias, lora_a, lora_b, self.magnitude, n, self.scaling, self._norm_of)
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
        _check_rank(base, rank)
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


def column_norm(w0: torch.Tensor, lora_a: torch.Tensor, lora_b: torch.Tensor, scale: float) -> torch.Tensor:
    """``‖W0 + scale·B·A‖`` per INPUT column (over the output axis), factored: ``[in]``.

    It is ``row_norm`` of the transpose: ``(W0 + sBA)ᵀ = W0ᵀ + s·Aᵀ·Bᵀ``.
    """
    return row_norm(w0.T, lora_b.T, lora_a.T, scale)


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
        return _scale_rows(z, self.magnitude, n, self.base.bias)

    def adapted_weight(self) -> torch.Tensor:
        return merged_weight(self.base.weight, None, None, 0.0, self.magnitude)

    def _original_weight(self) -> torch.Tensor:
        return acc(self.base.weight) * (self.w0_norm / acc(self.magnitude)).unsqueeze(1)


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
