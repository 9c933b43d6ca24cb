"""The adapter math: PEFT as the oracle, plus the invariants DoRA must keep."""

import copy

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from peft import LoraConfig, get_peft_model
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from dora_diffusion import adapter_layers, adapter_math, layers
from dora_diffusion.inject import AdapterConfig, add_adapters
from dora_diffusion.layers import (
    DoRALinear,
    LoRALinear,
    MagnitudeLinear,
    dense_row_norm,
    disable_adapters,
    merged_weight,
    row_norm,
    set_adapter_scale,
)

TOL = {torch.float64: 1e-10, torch.float32: 1e-5}


def _pair(method, dtype, bias, in_f=24, out_f=40, rank=4, alpha=8.0, seed=0):
    """Our adapter and PEFT's on copies of one Linear, with identical random A, B, m."""
    torch.manual_seed(seed)
    base = nn.Sequential(nn.Linear(in_f, out_f, bias=bias, dtype=dtype))
    ours, theirs = copy.deepcopy(base), copy.deepcopy(base)
    add_adapters(
        ours,
        AdapterConfig(method=method, rank=rank, alpha=alpha, targets=["0"], adapter_dtype=str(dtype).split(".")[1]),
    )
    peft = get_peft_model(theirs, LoraConfig(r=rank, lora_alpha=alpha, target_modules=["0"], use_dora=method == "dora"))
    a, p = ours[0], peft.base_model.model[0]
    with torch.no_grad():
        a.lora_A.normal_()
        a.lora_B.normal_()
        p.lora_A["default"].weight.copy_(a.lora_A)
        p.lora_B["default"].weight.copy_(a.lora_B)
        if method == "dora":
            a.magnitude.mul_(torch.rand(out_f, dtype=dtype) + 0.5)
            p.lora_magnitude_vector["default"].weight.copy_(a.magnitude)
    return ours, peft, a, p


def _grads(a, p, method):
    pairs = [(a.lora_A.grad, p.lora_A["default"].weight.grad), (a.lora_B.grad, p.lora_B["default"].weight.grad)]
    if method == "dora":
        pairs.append((a.magnitude.grad, p.lora_magnitude_vector["default"].weight.grad))
    return pairs


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("lead", [(3, 5), (4, 10)])  # 15 / 40 tokens for 24 inputs: DoRA's two fused orders
def test_linear_matches_peft(method, dtype, bias, lead):
    ours, peft, a, p = _pair(method, dtype, bias)
    x = torch.randn(*lead, 24, dtype=dtype, requires_grad=True)
    x2 = x.detach().clone().requires_grad_()
    y1, y2 = ours(x), peft(x2)
    tol = TOL[dtype]
    torch.testing.assert_close(y1, y2, rtol=tol, atol=tol)
    g = torch.randn_like(y1)
    y1.backward(g)
    y2.backward(g)
    torch.testing.assert_close(x.grad, x2.grad, rtol=tol, atol=tol)
    for ours_g, peft_g in _grads(a, p, method):
        torch.testing.assert_close(ours_g, peft_g, rtol=tol, atol=tol)


@pytest.mark.parametrize("scale", [0.0, 0.5, 2.0])
@pytest.mark.parametrize("method", ["lora", "dora"])
def test_runtime_scale_matches_peft(method, scale):
    ours, peft, _, p = _pair(method, torch.float64, True)
    set_adapter_scale(ours, scale)
    p.set_scale("default", scale)
    x = torch.randn(4, 24, dtype=torch.float64)
    torch.testing.assert_close(ours(x), peft(x), rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear, MagnitudeLinear])
def test_output_equals_base_at_init(cls):
    torch.manual_seed(0)
    base = nn.Linear(16, 12)
    x = torch.randn(7, 16)
    adapter = cls(copy.deepcopy(base), rank=4, alpha=4)
    torch.testing.assert_close(adapter(x), base(x), rtol=1e-6, atol=1e-6)


def _trained(cls, dtype=torch.float64, seed=0, **kw):
    torch.manual_seed(seed)
    adapter = (
        cls(nn.Linear(16, 12, dtype=dtype), rank=3, alpha=6, dtype=dtype, **kw)
        if cls is not MagnitudeLinear
        else cls(nn.Linear(16, 12, dtype=dtype), dtype=dtype)
    )
    with torch.no_grad():
        for n, p in adapter.named_parameters():
            if not n.startswith("base."):
                p.add_(torch.randn_like(p) * (0.3 if n != "magnitude" else 0.1))
    return adapter


@pytest.mark.parametrize("cls", [LoRALinear, DoRALinear, MagnitudeLinear])
def test_merge_equals_unmerged_and_is_idempotent(cls):
    adapter = _trained(cls)
    x = torch.randn(5, 16, dtype=torch.float64)
    w0 = adapter.base.weight.detach().clone()
    y = adapter(x)
    adapter.merge()
    adapter.merge()  # idempotent: a second merge changes nothing
    torch.testing.assert_close(adapter(x), y, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter.base(x), y, rtol=1e-12, atol=1e-12)
    adapter.unmerge()
    adapter.unmerge()
    torch.testing.assert_close(adapter.base.weight, w0, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter(x), y, rtol=1e-12, atol=1e-12)


def test_magnitude_only_is_row_scaling_of_w0():
    adapter = _trained(MagnitudeLinear)
    w0 = adapter.base.weight.detach()
    expected = (adapter.magnitude / w0.norm(dim=1)).unsqueeze(1) * w0
    torch.testing.assert_close(adapter.adapted_weight(), expected.detach())
    x = torch.randn(3, 16, dtype=torch.float64)
    torch.testing.assert_close(adapter(x), nn.functional.linear(x, expected, adapter.base.bias))


def test_dora_magnitude_is_per_output_row():
    # The axis pin: m has one entry per OUTPUT feature and starts at the L2 norm over the input axis.
    base = nn.Linear(16, 12)
    adapter = DoRALinear(copy.deepcopy(base), rank=2)
    assert adapter.magnitude.shape == (12,)
    torch.testing.assert_close(adapter.magnitude.detach(), base.weight.norm(dim=1))
    # Scaling m_i scales exactly output feature i.
    with torch.no_grad():
        adapter.magnitude[3] *= 2
    x = torch.randn(4, 16)
    y0, y = base(x), adapter(x)
    torch.testing.assert_close(y[:, 3] - adapter.base.bias[3], 2 * (y0[:, 3] - base.bias[3]))
    torch.testing.assert_close(torch.cat([y[:, :3], y[:, 4:]], 1), torch.cat([y0[:, :3], y0[:, 4:]], 1))


@settings(max_examples=60, deadline=None, derandomize=True)  # the same examples in every CI run
@given(
    out_f=st.integers(1, 48),
    in_f=st.integers(1, 48),
    rank=st.integers(1, 16),
    scale=st.floats(-4, 4, allow_nan=False),
    dtype=st.sampled_from([torch.float64, torch.float32, torch.bfloat16, torch.float16]),
    seed=st.integers(0, 2**16),
)
def test_factored_norm_equals_dense(out_f, in_f, rank, scale, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    w0 = torch.randn(out_f, in_f, generator=g).to(dtype)
    a = torch.randn(rank, in_f, generator=g).to(dtype)
    b = torch.randn(out_f, rank, generator=g).to(dtype)
    factored, dense = row_norm(w0, a, b, scale), dense_row_norm(w0, a, b, scale)
    assert factored.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    # Both accumulate the same (rounded) inputs in fp32/fp64. The factored form sums terms that may
    # cancel, so its error bound is on n², relative to the terms' size before cancellation:
    # (‖W0_i‖ + |s|·Σ_k |B_ik|·‖A_k‖)² bounds every term of the sum (triangle inequality).
    spread = abs(scale) * (b.double().abs() @ a.double().norm(dim=1))  # [out]
    ref_sq = (w0.double().norm(dim=1) + spread) ** 2
    # fp32 summation over up to 48 terms: worst case ~48·6e-8 ≈ 3e-6; a wrong axis or formula is O(1).
    tol = 1e-12 if dtype == torch.float64 else 1e-5
    # A bf16 W0 is read in bf16 (W0·Aᵀ rounded to bf16, 2⁻⁹ relative per element): the cross term
    # 2s·⟨B_i, (W0·Aᵀ)_i⟩ carries that rounding on top.
    w0_at = (w0.double() @ a.double().T).abs()
    cross = 2 * abs(scale) * (b.double().abs() * w0_at).sum(dim=1)
    half = 2.0**-8 if dtype == torch.bfloat16 else 0.0
    err = (factored.double() ** 2 - dense.double() ** 2).abs()
    assert torch.all(err <= tol * (ref_sq + 1) + half * cross), (factored, dense)


def test_factored_norm_never_builds_out_by_in(monkeypatch):
    # The factored formula only multiplies [out, in] by [in, r] and [r, in] by [in, r].
    w0, a, b = torch.randn(64, 96), torch.randn(4, 96), torch.randn(64, 4)
    seen = []
    real = torch.Tensor.__matmul__

    def spy(x, y):
        out = real(x, y)
        seen.append(tuple(out.shape))
        return out

    monkeypatch.setattr(torch.Tensor, "__matmul__", spy)
    row_norm(w0, a, b, 0.5)
    assert (64, 96) not in seen and seen, seen


def test_exact_norm_gradient_matches_dense_autograd():
    torch.manual_seed(0)
    base = nn.Linear(20, 14, dtype=torch.float64)
    ours = DoRALinear(copy.deepcopy(base), rank=3, alpha=5, dtype=torch.float64, norm_grad="exact")
    with torch.no_grad():
        ours.lora_B.normal_()
        ours.magnitude.mul_(1.3)
    a = ours.lora_A.detach().clone().requires_grad_()
    b = ours.lora_B.detach().clone().requires_grad_()
    m = ours.magnitude.detach().clone().requires_grad_()
    x = torch.randn(6, 20, dtype=torch.float64)
    # Reference: Eq. 5 with the dense matrix and its norm, gradient through everything (Eq. 6).
    w = base.weight + ours.scaling * b @ a
    ref = nn.functional.linear(x, m.unsqueeze(1) * w / w.norm(dim=1, keepdim=True), base.bias)
    y = ours(x)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    gy = torch.randn_like(y)
    y.backward(gy)
    ref.backward(gy)
    for mine, theirs in [(ours.lora_A.grad, a.grad), (ours.lora_B.grad, b.grad), (ours.magnitude.grad, m.grad)]:
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)
    # ...and it differs from the detached gradient, which is a different (approximate) rule.
    detached = DoRALinear(copy.deepcopy(base), rank=3, alpha=5, dtype=torch.float64)
    detached.load_state_dict(ours.state_dict())
    detached(x).backward(gy)
    assert not torch.allclose(detached.lora_A.grad, ours.lora_A.grad)


@pytest.mark.parametrize("tokens", [8, 40])  # the norm from the forward's own GEMM / from its own
def test_norm_is_cached_per_step_and_invalidated_by_optimizer(monkeypatch, tokens):
    calls = []
    real = adapter_math.row_norm_from_cross  # what every norm of a DoRA row goes through

    def spy(*a, **k):
        calls.append(1)
        return real(*a, **k)

    monkeypatch.setattr(adapter_math, "row_norm_from_cross", spy)  # row_norm's
    monkeypatch.setattr(adapter_layers, "row_norm_from_cross", spy)  # the layer's, from its forward's GEMM
    torch.manual_seed(0)
    adapter = DoRALinear(nn.Linear(16, 12), rank=4)
    opt = torch.optim.SGD([adapter.lora_A, adapter.lora_B, adapter.magnitude], lr=0.1)
    x = torch.randn(tokens, 16)
    for _ in range(3):  # gradient accumulation: three micro-batches, one norm
        adapter(x).pow(2).mean().backward()
    assert len(calls) == 1
    opt.step()
    adapter(x)
    assert len(calls) == 2  # the step changed A and B in place: recomputed once
    adapter(x)
    assert len(calls) == 2
    # the cached value is the true norm of the current weights
    torch.testing.assert_close(
        adapter.weight_norm(), dense_row_norm(adapter.base.weight, adapter.lora_A, adapter.lora_B, adapter.scaling)
    )
    set_adapter_scale(adapter, 0.5)
    adapter(x)
    assert len(calls) == 3  # a new scale is a new norm
    with torch.no_grad():
        adapter.base.weight.mul_(2)  # W0 changed in place: ‖W0‖² refreshed too
    torch.testing.assert_close(
        adapter.weight_norm(), dense_row_norm(adapter.base.weight, adapter.lora_A, adapter.lora_B, adapter.scaling)
    )


class _CountBaseMatmuls(TorchDispatchMode):
    """Counts the matrix products with an operand of the base weight's size ([out, in] or [in, out])."""

    def __init__(self, weight_shape):
        super().__init__()
        self.shapes = {tuple(weight_shape), tuple(reversed(weight_shape))}
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket in (torch.ops.aten.mm, torch.ops.aten.addmm, torch.ops.aten.addmm_, torch.ops.aten.bmm):
            if any(torch.is_tensor(a) and tuple(a.shape) in self.shapes for a in args):
                self.count += 1
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize("tokens", [3, 40])  # g applied to the output / folded into W0's rows
@pytest.mark.parametrize("grad", [True, False])
def test_one_base_matmul_per_forward(tokens, grad):
    adapter = _trained(DoRALinear, dtype=torch.float32)
    adapter.weight_norm()  # warm the cache
    x = torch.randn(tokens, 16, requires_grad=grad)
    with torch.set_grad_enabled(grad), _CountBaseMatmuls(adapter.base.weight.shape) as counter:
        y = adapter(x)
    assert counter.count == 1
    with torch.no_grad():
        torch.testing.assert_close(
            y, nn.functional.linear(x, adapter.adapted_weight(), adapter.base.bias), rtol=1e-5, atol=1e-5
        )
    if grad:  # backward: dx only (the output-saving layer needs no recompute)
        with _CountBaseMatmuls(adapter.base.weight.shape) as counter:
            y.sum().backward()
        assert counter.count == 1


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_first_forward_after_a_step_shares_its_gemm_with_the_norm(grad, dtype):
    """Fewer tokens than input features (g scales the output): the norm's W0·Aᵀ comes from the forward's
    own GEMM, [x; A]·W0ᵀ, so the first forward after a step reads W0 once, like every other."""
    adapter = _trained(DoRALinear, dtype=torch.float64)
    ref_norm = dense_row_norm(adapter.base.weight, adapter.lora_A, adapter.lora_B, adapter.scaling)
    ref_w = adapter.adapted_weight().detach()
    adapter.base.to(dtype)
    x = torch.randn(5, 16, dtype=torch.float64)
    with torch.no_grad():
        adapter.lora_A.mul_(1.0)  # a new version: the cached norm is stale, as after an optimizer step
    with torch.set_grad_enabled(grad), _CountBaseMatmuls(adapter.base.weight.shape) as counter:
        y = adapter(x.to(dtype))
    assert counter.count == 1
    assert adapter._norm_cache.peek(adapter._norm_key()) is not None  # kept for the rest of the step
    with torch.no_grad():
        if dtype == torch.float64:
            torch.testing.assert_close(adapter.weight_norm(), ref_norm, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(y, nn.functional.linear(x, ref_w, adapter.base.bias), rtol=1e-12, atol=1e-12)
        else:  # the norm as precise as row_norm's own bf16 path; the output as bf16 allows
            torch.testing.assert_close(adapter.weight_norm().double(), ref_norm, rtol=2e-3, atol=0)
            torch.testing.assert_close(
                y.double(), nn.functional.linear(x, ref_w, adapter.base.bias.double()), rtol=3e-2, atol=3e-2
            )
    with torch.set_grad_enabled(grad), _CountBaseMatmuls(adapter.base.weight.shape) as counter:
        adapter(x.to(dtype))
    assert counter.count == 1  # and the next forward uses the cached norm


def _saved_activations(module, x):
    """Storages autograd saves for backward that are not the module's own parameters or buffers."""
    own = {t.untyped_storage().data_ptr() for t in list(module.parameters()) + list(module.buffers())}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in own:
            saved[t.untyped_storage().data_ptr()] = t.numel()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = module(x)
    return saved, y


def test_dora_saves_no_activation_beyond_lora_and_its_output():
    torch.manual_seed(0)
    base = nn.Linear(32, 48)
    lora, dora = LoRALinear(copy.deepcopy(base), rank=4), DoRALinear(copy.deepcopy(base), rank=4)
    x = torch.randn(10, 32, requires_grad=True)
    lora_saved, _ = _saved_activations(lora, x)
    dora_saved, y = _saved_activations(dora, x)
    extra = {p: n for p, n in dora_saved.items() if p not in lora_saved}
    big = {p: n for p, n in extra.items() if n > 48}  # [out]-sized vectors (g) are not activations
    # The only extra activation is the output, which the next layer saves anyway.
    assert big == {y.untyped_storage().data_ptr(): y.numel()}, (extra, y.numel())
    assert sum(lora_saved.values()) == 10 * 32 + 10 * 4  # x and A·x


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_base_with_fp32_adapter(dtype):
    ref = _trained(DoRALinear, dtype=torch.float32)
    half = copy.deepcopy(ref)
    half.base.to(dtype)
    assert half.lora_A.dtype == torch.float32 and half.magnitude.dtype == torch.float32
    x = torch.randn(6, 16)
    y = half(x.to(dtype))
    assert y.dtype == dtype
    torch.testing.assert_close(y.float(), ref(x), rtol=3e-2, atol=3e-2)
    y.float().pow(2).sum().backward()
    for p in (half.lora_A, half.lora_B, half.magnitude):
        assert p.grad is not None and p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all()


def test_dropout_only_in_training():
    torch.manual_seed(0)
    adapter = LoRALinear(nn.Linear(16, 12), rank=4, dropout=0.5)
    with torch.no_grad():
        adapter.lora_B.normal_()
    x = torch.randn(32, 16)
    adapter.train()
    assert not torch.allclose(adapter(x), adapter(x))
    adapter.eval()
    by_hand = (
        x @ adapter.base.weight.T + adapter.base.bias + (x @ adapter.lora_A.T) @ adapter.lora_B.T
    )  # s = alpha / r = 1
    torch.testing.assert_close(adapter(x), by_hand.detach())


@pytest.mark.parametrize("merged", [False, True])
def test_disable_adapters_gives_base_and_restores(merged):
    adapter = _trained(DoRALinear)
    model = nn.Sequential(adapter)
    x = torch.randn(4, 16, dtype=torch.float64)
    y = model(x)
    w0 = adapter.base.weight.detach().clone() if not merged else None
    if merged:
        adapter.merge()
    with disable_adapters(model):
        base_out = model(x)
    assert adapter.merged == merged and adapter.enabled
    torch.testing.assert_close(model(x), y, rtol=1e-12, atol=1e-12)
    adapter.unmerge()
    torch.testing.assert_close(base_out, adapter.base(x))
    if w0 is not None:
        torch.testing.assert_close(adapter.base.weight, w0)


def test_merged_weight_formula():
    g = torch.Generator().manual_seed(0)
    w0, a, b = torch.randn(5, 7, generator=g), torch.randn(2, 7, generator=g), torch.randn(5, 2, generator=g)
    m = torch.rand(5, generator=g) + 0.5
    w = w0 + 0.7 * b @ a
    torch.testing.assert_close(merged_weight(w0, a, b, 0.7, m), m.unsqueeze(1) * w / w.norm(dim=1, keepdim=True))
    torch.testing.assert_close(merged_weight(w0, a, b, 0.7), w)


@pytest.mark.parametrize("training", [True, False])
def test_compiles_without_graph_breaks(training):
    adapter = _trained(DoRALinear, dtype=torch.float32)
    adapter.train(training)
    x = torch.randn(4, 16)
    expected = adapter(x)
    torch._dynamo.reset()
    compiled = torch.compile(adapter, backend="aot_eager", fullgraph=True)  # fullgraph: a break is an error
    with torch.set_grad_enabled(training):
        y = compiled(x)
    torch.testing.assert_close(y, expected)
    if training:
        y.sum().backward()
        assert adapter.magnitude.grad is not None


def test_residual_tail_layers_save_nothing_beyond_lora_and_keep_exact_gradients():
    """For a layer whose output only feeds a residual add, DoRA recomputes z in backward instead of
    saving the output: no activation beyond LoRA's, same gradients."""
    torch.manual_seed(0)
    base = nn.Linear(32, 48)
    lora = LoRALinear(copy.deepcopy(base), rank=4)
    out_mode, tail = DoRALinear(copy.deepcopy(base), rank=4), DoRALinear(copy.deepcopy(base), rank=4)
    tail.magnitude_grad = "recompute"
    with torch.no_grad():
        out_mode.lora_B.copy_(torch.randn(48, 4, generator=torch.Generator().manual_seed(1)))
        out_mode.magnitude.mul_(1.5)
    tail.load_state_dict(out_mode.state_dict())
    x = torch.randn(10, 32, requires_grad=True)
    lora_saved, _ = _saved_activations(lora, x)
    tail_saved, _ = _saved_activations(tail, x)
    assert {p: n for p, n in tail_saved.items() if n > 48} == {p: n for p, n in lora_saved.items() if n > 48}
    gy = torch.randn(10, 48)
    out_mode(x).backward(gy)
    tail(x).backward(gy)
    for p, q in [(out_mode.magnitude, tail.magnitude), (out_mode.lora_A, tail.lora_A), (out_mode.lora_B, tail.lora_B)]:
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-5, atol=1e-5)


def test_add_adapters_marks_residual_tails(tiny_components):
    from dora_diffusion.inject import AdapterConfig as Cfg

    unet = copy.deepcopy(tiny_components["unet"])
    add_adapters(unet, Cfg(method="dora", targets="attn+ff"))
    modes = {n: a.magnitude_grad for n, a in layers.adapter_modules(unet)}
    assert {m for n, m in modes.items() if n.endswith(("to_out.0", "ff.net.2"))} == {"recompute"}
    assert {m for n, m in modes.items() if n.endswith(("to_q", "to_k", "to_v", "ff.net.0.proj"))} == {"output"}


def _dense_dora(adapter: DoRALinear, x: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Reference DoRA by autograd on the plain formula, detached norm: g ⊙ (W0·x + s·B·A·h) + b."""
    n = dense_row_norm(adapter.base.weight, adapter.lora_A, adapter.lora_B, adapter.scaling).detach()
    z = (
        nn.functional.linear(x, adapter.base.weight)
        + nn.functional.linear(nn.functional.linear(h, adapter.lora_A), adapter.lora_B) * adapter.scaling
    )
    y = z * (adapter.magnitude / n)
    return y + adapter.base.bias if adapter.base.bias is not None else y


@pytest.mark.parametrize("tokens", [6, 40])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("dropout", [0.0, 0.3])
@pytest.mark.parametrize("magnitude_grad", ["output", "recompute"])
def test_fused_dora_layer_matches_dense_autograd(tokens, bias, dropout, magnitude_grad):
    """The fused forward/backward (g folded into W0 or applied to the output; dropout; the magnitude's
    gradient from the output or by recomputation) against autograd through the dense formula, fp64."""
    torch.manual_seed(0)
    adapter = DoRALinear(
        nn.Linear(24, 20, bias=bias, dtype=torch.float64), rank=4, alpha=8, dropout=dropout, dtype=torch.float64
    )
    adapter.magnitude_grad = magnitude_grad
    with torch.no_grad():
        adapter.lora_B.normal_()
        adapter.magnitude.mul_(torch.rand(20, dtype=torch.float64) + 0.5)
    ref = copy.deepcopy(adapter)
    x = torch.randn(2, tokens // 2, 24, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_()
    torch.manual_seed(7)
    y = adapter(x)
    torch.manual_seed(7)  # the same dropout mask
    y_ref = _dense_dora(ref, x_ref, nn.functional.dropout(x_ref, dropout) if dropout else x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    g = torch.randn_like(y)
    y.backward(g)
    y_ref.backward(g)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    for name in ("lora_A", "lora_B", "magnitude"):
        torch.testing.assert_close(
            getattr(adapter, name).grad, getattr(ref, name).grad, rtol=1e-10, atol=1e-10, msg=name
        )
    assert adapter.base.weight.grad is None


def test_dora_under_autocast_runs_in_the_autocast_dtype():
    """Mixed-precision training (fp32 parameters, bf16 autocast): the layer computes in bf16 like
    autocast's own matmuls would, and the fp32 parameters get fp32 gradients close to fp32's."""
    ref = _trained(DoRALinear, dtype=torch.float32)
    amp = copy.deepcopy(ref)
    x = torch.randn(4, 10, 16)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = amp(x)
    assert y.dtype == torch.bfloat16
    y_ref = ref(x)
    torch.testing.assert_close(y.float(), y_ref, rtol=3e-2, atol=3e-2)
    y.float().pow(2).sum().backward()
    y_ref.pow(2).sum().backward()
    for name in ("lora_A", "lora_B", "magnitude"):
        mine, theirs = getattr(amp, name).grad, getattr(ref, name).grad
        assert mine.dtype == torch.float32
        assert (mine - theirs).abs().max() <= 5e-2 * theirs.abs().max(), name
