"""DoRA's layer as one autograd node (``DoRAFunction``), the magnitude-only layer's (``ScaleRows``), and the
cache that keeps DoRA's norm for as long as the weights it came from are unchanged (``NormCache``).

Written to touch the ``[tokens, out]`` tensors as few times as LoRA does; see ``DoRAFunction``."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .adapter_math import acc, scale_rows


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


class ScaleRows(torch.autograd.Function):
    """``y = z ⊙ g + bias`` with ``g = m / n`` per output feature, saving its OUTPUT instead of ``z``
    (magnitude-only layers; DoRA's own layer is ``DoRAFunction``).

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


def scale_rows_node(
    z: torch.Tensor, magnitude: torch.Tensor, norm: torch.Tensor, bias: torch.Tensor | None
) -> torch.Tensor:
    return ScaleRows.apply(z, magnitude, norm, bias)


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
    ``z0 = W0·x`` when the caller has it (``dora_forward``'s shared GEMM)."""
    if z0 is None and folds(x2, w0):
        y = F.linear(x2, w0 * g.unsqueeze(1), bias)
    else:
        y = torch.mm(x2, w0.t()) if z0 is None else z0
        y = torch.addcmul(bias, y, g) if bias is not None else y.mul_(g)
    ax = torch.mm(h2 if h2.dtype == lora_a.dtype else h2.to(lora_a.dtype), lora_a.t())  # [t, r]
    return _add_low_rank(y, ax, gbs), ax


def folds(x2: torch.Tensor, w0: torch.Tensor) -> bool:
    """Whether the layer folds ``g`` into ``W0``'s rows (more tokens than input features) rather than
    scaling its output; where it does not, the norm can share the forward's GEMM (``dora_forward``)."""
    return x2.shape[0] > w0.shape[1]


def _dora_scales(magnitude: torch.Tensor, norm: torch.Tensor, lora_b: torch.Tensor, scale: float, dtype: torch.dtype):
    """``g = m / n`` in ``dtype``, ``s·g`` and ``s·g ⊙ B`` in the adapter's dtype (all from fp32 / fp64)."""
    g32 = acc(magnitude.detach()) / norm
    gs = g32 * scale
    if gs.dtype != lora_b.dtype:
        gs = gs.to(lora_b.dtype)
    return (g32 if g32.dtype == dtype else g32.to(dtype)), gs, lora_b * gs.unsqueeze(1)


def dora_forward(x, h, w0, bias, lora_a, lora_b, magnitude, norm, scale: float, norm_of=None):
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


class DoRAFunction(torch.autograd.Function):
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
        y, ax, g, gs, norm = dora_forward(x, h, w0, bias, lora_a, lora_b, magnitude, norm, scale, norm_of)
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
