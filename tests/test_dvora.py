"""DVoRA (paper §5.4): VeRA's direction under a DoRA magnitude."""

import copy

import torch
from torch import nn

from dora_diffusion import AdapterConfig, add_adapters, load_adapter, merge_adapters, save_adapter
from dora_diffusion.inject import adapter_parameters, as_dora
from dora_diffusion.layers import DoRALinear, DVoRALinear, adapter_modules, vera_matrices
from helpers import unet_inputs


def _trained_dvora(seed=0, dtype=torch.float64):
    torch.manual_seed(seed)
    layer = DVoRALinear(nn.Linear(12, 10, dtype=dtype), rank=4, alpha=8, dtype=dtype, seed=7)
    with torch.no_grad():
        layer.vera_d.normal_()
        layer.vera_b.normal_()
        layer.magnitude.mul_(torch.rand(10, dtype=dtype) + 0.5)
    return layer


def test_output_equals_base_at_init():
    base = nn.Linear(12, 10)
    layer = DVoRALinear(copy.deepcopy(base), rank=4, seed=3)
    x = torch.randn(5, 12)
    torch.testing.assert_close(layer(x), base(x))


def test_matches_a_naive_dense_implementation():
    layer = _trained_dvora()
    a, b = (t.double() for t in vera_matrices(7, 10, 12, 4))  # defined in fp32, whatever the adapter dtype
    dv = torch.diag(layer.vera_b) @ b @ torch.diag(layer.vera_d) @ a  # ΔV = diag(b)·B·diag(d)·A
    w = layer.base.weight + layer.scaling * dv
    dense = layer.magnitude.unsqueeze(1) * w / w.norm(dim=1, keepdim=True)
    x = torch.randn(6, 12, dtype=torch.float64)
    torch.testing.assert_close(layer(x), nn.functional.linear(x, dense, layer.base.bias), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(layer.adapted_weight(), dense.detach(), rtol=1e-12, atol=1e-12)


def test_gradients_match_the_dense_formula_with_detached_norm():
    layer = _trained_dvora()
    a, b = (t.double() for t in vera_matrices(7, 10, 12, 4))  # defined in fp32, whatever the adapter dtype
    d = layer.vera_d.detach().clone().requires_grad_()
    bb = layer.vera_b.detach().clone().requires_grad_()
    m = layer.magnitude.detach().clone().requires_grad_()
    x = torch.randn(6, 12, dtype=torch.float64)
    w = layer.base.weight + layer.scaling * (bb.unsqueeze(1) * b) @ (d.unsqueeze(1) * a)
    ref = nn.functional.linear(x, (m / w.norm(dim=1).detach()).unsqueeze(1) * w, layer.base.bias)
    gy = torch.randn_like(ref)
    layer(x).backward(gy)
    ref.backward(gy)
    for mine, theirs in [(layer.vera_d.grad, d.grad), (layer.vera_b.grad, bb.grad), (layer.magnitude.grad, m.grad)]:
        torch.testing.assert_close(mine, theirs, rtol=1e-10, atol=1e-10)


def test_frozen_matrices_are_shared_per_shape_and_only_vectors_train(tiny_components):
    unet = copy.deepcopy(tiny_components["unet"])
    add_adapters(unet, AdapterConfig(method="dvora", rank=4, targets="attn"))
    mods = [a for _, a in adapter_modules(unet)]
    by_shape = {}
    for a in mods:
        by_shape.setdefault(tuple(a.base.weight.shape), set()).add(a.vera_A.data_ptr())
    assert all(len(ptrs) == 1 for ptrs in by_shape.values()) and len(by_shape) > 1
    trainable = {id(p) for p in unet.parameters() if p.requires_grad}
    assert trainable == {id(p) for p in adapter_parameters(unet)}
    assert sum(p.numel() for p in adapter_parameters(unet)) == sum(a.rank + 2 * a.out_features for a in mods)


def test_save_load_merge_is_exact_and_compact(tiny_pipe, tiny_components, tmp_path):
    from diffusers import StableDiffusionXLPipeline

    pipe = tiny_pipe
    add_adapters(pipe.unet, AdapterConfig(method="dvora", rank=4, alpha=4, targets="attn+ff", vera_seed=11))
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for _, a in adapter_modules(pipe.unet):
            a.vera_d.add_(torch.randn(a.vera_d.shape, generator=g))
            a.vera_b.add_(torch.randn(a.vera_b.shape, generator=g) * 0.1)
    file = save_adapter(pipe, tmp_path)
    from safetensors.torch import load_file

    keys = load_file(str(file)).keys()
    assert not any("lora.down" in k for k in keys) and any(k.endswith("vera_lambda_d") for k in keys)  # seed + vectors
    inputs = unet_inputs(pipe.unet)
    with torch.no_grad():
        ref = pipe.unet(**inputs).sample
    loaded = StableDiffusionXLPipeline(**copy.deepcopy(tiny_components))
    report = load_adapter(loaded, tmp_path)
    assert report.method == {"unet": "dvora"}
    with torch.no_grad():
        assert torch.equal(loaded.unet(**inputs).sample, ref)
        as_dora(loaded.unet)  # the expanded DoRA form that other tools read
        assert all(type(a) is DoRALinear for _, a in adapter_modules(loaded.unet))
        torch.testing.assert_close(loaded.unet(**inputs).sample, ref, rtol=1e-5, atol=1e-5)
        merge_adapters(loaded.unet)
        torch.testing.assert_close(loaded.unet(**inputs).sample, ref, rtol=1e-5, atol=1e-5)
