"""Choosing targets, wrapping, state dicts, merging; on the tiny SDXL UNet and CLIP text encoders, PEFT as oracle."""

import copy

import pytest
import torch
from peft import LoraConfig, inject_adapter_in_model
from torch import nn

from dora_diffusion import (
    AdapterConfig,
    AdapterError,
    adapter_parameters,
    adapter_state_dict,
    add_adapters,
    load_adapter_state_dict,
    merge_adapters,
)
from dora_diffusion.inject import find_targets, name_matches, remove_adapters
from dora_diffusion.layers import AdapterLinear, adapter_modules
from helpers import randomize_adapters, text_ids, unet_inputs


@pytest.mark.parametrize(
    "name, pattern, expected",
    [
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "to_q", True),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "attn1.to_q", True),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "attn2.to_q", False),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_qkv", "to_q", False),
        ("mid_block.attentions.0.transformer_blocks.0.attn2.add_k_proj", "k_proj", False),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "to_out.0", True),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "0", True),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_out.0", "out.0", False),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", "attn1.to_*", True),
        ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", "down_blocks.*.to_k", True),
        ("up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k", "down_blocks.*.to_k", False),
    ],
)
def test_whole_name_matching(name, pattern, expected):
    assert name_matches(name, pattern) is expected


def _count_leaves(module, leaves):
    return sum(1 for n, m in module.named_modules() if isinstance(m, nn.Linear) and n.split(".")[-1] in leaves)


def test_presets_on_unet_and_text_encoders(tiny_components):
    unet = copy.deepcopy(tiny_components["unet"])
    names = add_adapters(unet, AdapterConfig(targets="attn"))
    assert names and all(n.endswith(("to_q", "to_k", "to_v", "to_out.0")) for n in names)
    n_attn = sum(1 for n, m in tiny_components["unet"].named_modules() if n.endswith(("attn1", "attn2")))
    assert len(names) == 4 * n_attn
    for comp in ("text_encoder", "text_encoder_2"):  # transformers 5 naming: te1 has no text_model level
        te = copy.deepcopy(tiny_components[comp])
        names = add_adapters(te, AdapterConfig(targets="attn"))
        assert len(names) == 4 * te.config.num_hidden_layers
        assert all(n.split(".")[-1] in ("q_proj", "k_proj", "v_proj", "out_proj") for n in names)
    ff = add_adapters(copy.deepcopy(tiny_components["unet"]), AdapterConfig(targets="attn+ff"))
    assert len(ff) == 5 * n_attn  # one feed-forward (2 linears) per block of two attentions
    every = add_adapters(copy.deepcopy(tiny_components["unet"]), AdapterConfig(targets="all-linear"))
    assert len(every) == sum(1 for m in tiny_components["unet"].modules() if isinstance(m, nn.Linear))
    te2 = add_adapters(copy.deepcopy(tiny_components["text_encoder_2"]), AdapterConfig(targets="all-linear"))
    assert not any(n.endswith("text_projection") for n in te2)


def test_only_adapter_parameters_train(tiny_components):
    unet = copy.deepcopy(tiny_components["unet"])
    add_adapters(unet, AdapterConfig(method="dora", rank=2))
    trainable = [p for p in unet.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in adapter_parameters(unet)}
    n_layers = len(list(adapter_modules(unet)))
    assert len(trainable) == 3 * n_layers


def test_bad_targets_and_ranks_are_clear_errors(tiny_components):
    unet = copy.deepcopy(tiny_components["unet"])
    with pytest.raises(AdapterError, match="to_qq"):
        add_adapters(unet, AdapterConfig(targets=["to_q", "to_qq"]))
    with pytest.raises(AdapterError, match="rank"):
        AdapterConfig(rank=0)
    with pytest.raises(AdapterError, match="method"):
        AdapterConfig(method="vera")
    # rank larger than a layer: error names the layer, and nothing was wrapped
    with pytest.raises(AdapterError, match=r"to_q.*rank must be in 1\.\.64"):
        add_adapters(unet, AdapterConfig(rank=100, targets=["to_q"]))  # attention is 64 channels wide
    assert not list(adapter_modules(unet))
    assert all(p.requires_grad for p in unet.parameters())
    add_adapters(unet, AdapterConfig(targets="attn"))
    with pytest.raises(AdapterError, match="already has adapters"):
        add_adapters(unet, AdapterConfig(targets="attn"))


def test_state_dict_round_trip_and_strict_checks(tiny_components):
    src = copy.deepcopy(tiny_components["unet"])
    add_adapters(src, AdapterConfig(method="dora", rank=4))
    randomize_adapters(src)
    sd = adapter_state_dict(src)
    dst = copy.deepcopy(tiny_components["unet"])
    add_adapters(dst, AdapterConfig(method="dora", rank=4))
    before = adapter_state_dict(dst)
    bad = dict(sd)
    key = next(k for k in bad if k.endswith("lora_A"))
    bad[key] = bad[key][:2]
    bad["nonexistent.lora_A"] = torch.zeros(1)
    del bad[next(k for k in bad if k.endswith("magnitude"))]
    with pytest.raises(AdapterError, match=r"1 missing.*1 unexpected.*1 with the wrong shape"):
        load_adapter_state_dict(dst, bad)
    assert all(torch.equal(before[k], v) for k, v in adapter_state_dict(dst).items())  # untouched
    load_adapter_state_dict(dst, sd)
    inputs = unet_inputs(src)
    with torch.no_grad():
        torch.testing.assert_close(dst(**inputs).sample, src(**inputs).sample, rtol=0, atol=0)


def assert_close_scaled(mine, theirs, tol, what):
    """|mine − theirs| ≤ tol · max(1, max|theirs|): tolerance relative to the tensor's scale, since
    gradients summed over many tokens reach tens and fp32 rounding scales with them."""
    err = (mine - theirs).abs().max().item()
    assert err <= tol * max(1.0, theirs.abs().max().item()), f"{what}: max abs error {err:.3g}"


def _peft_twin(model, ours, method, rank, alpha, dtype):
    """PEFT adapters on a copy of the base ``model`` at our targets, with our parameter values."""
    twin = copy.deepcopy(model).to(dtype)
    names = [n for n, _ in adapter_modules(ours)]
    inject_adapter_in_model(LoraConfig(r=rank, lora_alpha=alpha, target_modules=names, use_dora=method == "dora"), twin)
    with torch.no_grad():
        for name, a in adapter_modules(ours):
            p = twin.get_submodule(name)
            p.lora_A["default"].weight.copy_(a.lora_A)
            p.lora_B["default"].weight.copy_(a.lora_B)
            if method == "dora":
                p.lora_magnitude_vector["default"].weight.copy_(a.magnitude)
    return twin


def _compare_with_peft(model, run, method, dtype, tol, targets="attn+ff"):
    ours = copy.deepcopy(model).to(dtype)
    add_adapters(
        ours, AdapterConfig(method=method, rank=4, alpha=6, targets=targets, adapter_dtype=str(dtype).split(".")[1])
    )
    randomize_adapters(ours, std=0.2)
    twin = _peft_twin(model, ours, method, 4, 6, dtype)
    y_ours, y_peft = run(ours), run(twin)
    assert_close_scaled(y_ours, y_peft, tol, "output")
    g = torch.randn(y_ours.shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64).to(dtype)
    y_ours.backward(g)
    y_peft.backward(g)
    for name, a in adapter_modules(ours):
        p = twin.get_submodule(name)
        pairs = [(a.lora_A.grad, p.lora_A["default"].weight.grad), (a.lora_B.grad, p.lora_B["default"].weight.grad)]
        if method == "dora":
            pairs.append((a.magnitude.grad, p.lora_magnitude_vector["default"].weight.grad))
        for mine, theirs in pairs:
            assert_close_scaled(mine, theirs, tol, name)


@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_unet_matches_peft(tiny_components, method, dtype, tol):
    inputs = unet_inputs(tiny_components["unet"], dtype=dtype)
    _compare_with_peft(tiny_components["unet"], lambda m: m(**inputs).sample, method, dtype, tol)


@pytest.mark.parametrize("component", ["text_encoder", "text_encoder_2"])
@pytest.mark.parametrize("method", ["lora", "dora"])
@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_text_encoders_match_peft(tiny_components, component, method, dtype, tol):
    ids = text_ids()
    _compare_with_peft(tiny_components[component], lambda m: m(ids).last_hidden_state, method, dtype, tol)


@pytest.mark.parametrize("method", ["lora", "dora", "magnitude"])
def test_merge_adapters_equals_unmerged_and_removes_wrappers(tiny_components, method):
    unet = copy.deepcopy(tiny_components["unet"]).double()
    add_adapters(unet, AdapterConfig(method=method, rank=4, targets="attn+ff", adapter_dtype="float64"))
    randomize_adapters(unet, std=0.2)
    inputs = unet_inputs(unet, dtype=torch.float64)
    with torch.no_grad():
        y = unet(**inputs).sample
        merged = merge_adapters(unet)
        assert merged and not any(isinstance(m, AdapterLinear) for m in unet.modules())
        assert set(unet.state_dict()) == set(tiny_components["unet"].state_dict())  # plain diffusers keys again
        torch.testing.assert_close(unet(**inputs).sample, y, rtol=1e-10, atol=1e-10)


def test_remove_adapters_restores_base(tiny_components):
    unet = copy.deepcopy(tiny_components["unet"])
    add_adapters(unet, AdapterConfig(method="dora", rank=4))
    randomize_adapters(unet)
    next(a for _, a in adapter_modules(unet)).merge()
    remove_adapters(unet)
    inputs = unet_inputs(unet)
    with torch.no_grad():
        torch.testing.assert_close(
            unet(**inputs).sample, tiny_components["unet"](**inputs).sample, rtol=1e-5, atol=1e-6
        )


def test_find_targets_skips_existing_wrappers(tiny_components):
    unet = copy.deepcopy(tiny_components["unet"])
    cfg = AdapterConfig(targets="attn")
    before = find_targets(unet, cfg)
    add_adapters(unet, cfg)
    assert find_targets(unet, cfg) == []
    assert len(before) == len(list(adapter_modules(unet)))


def test_granularity_policy(tiny_components, tmp_path):
    """Paper §5.6: direction + magnitude on attention, magnitude only on feed-forward; saved, reloaded and
    read by diffusers' own loader exactly."""
    from diffusers import StableDiffusionXLPipeline

    from dora_diffusion import load_adapter, save_adapter
    from dora_diffusion.inject import adapter_summary

    pipe = StableDiffusionXLPipeline(**copy.deepcopy(tiny_components))
    cfg = AdapterConfig(method="dora", rank=4, targets="attn+ff", policy={"ff": "magnitude"})
    names = add_adapters(pipe.unet, cfg)
    kinds = {n: a.method for n, a in adapter_modules(pipe.unet)}
    assert {kinds[n] for n in names if ".ff." in n} == {"magnitude"}
    assert {kinds[n] for n in names if ".ff." not in n} == {"dora"}
    per = adapter_summary(pipe.unet)["per_method"]
    assert per["magnitude"]["trainable_parameters"] == sum(
        a.out_features for _, a in adapter_modules(pipe.unet) if a.method == "magnitude"
    )
    randomize_adapters(pipe.unet, std=0.05)
    save_adapter(pipe, tmp_path)
    inputs = unet_inputs(pipe.unet)
    with torch.no_grad():
        ref = pipe.unet(**inputs).sample
    ours = StableDiffusionXLPipeline(**copy.deepcopy(tiny_components))
    load_adapter(ours, tmp_path)
    assert {a.method for n, a in adapter_modules(ours.unet) if ".ff." in n} == {"magnitude"}
    theirs = StableDiffusionXLPipeline(**copy.deepcopy(tiny_components))
    theirs.load_lora_weights(tmp_path)
    with torch.no_grad():
        assert torch.equal(ours.unet(**inputs).sample, ref)
        torch.testing.assert_close(theirs.unet(**inputs).sample, ref, rtol=1e-5, atol=1e-5)
    with pytest.raises(AdapterError, match="policy"):
        AdapterConfig(policy={"ff": "vera"})


def test_memory_saving_can_be_turned_off(tiny_components):
    unet = copy.deepcopy(tiny_components["unet"])
    add_adapters(unet, AdapterConfig(method="dora", targets="attn", memory_saving=False))
    assert {a.magnitude_grad for _, a in adapter_modules(unet)} == {"output"}


@pytest.mark.parametrize("memory_saving", [True, False])
def test_gradient_checkpointing_gives_the_same_dora_gradients(tiny_components, memory_saving):
    """The fused DoRA node re-run by activation checkpointing (and the norm cache across the re-run)
    gives the gradients of the plain run."""
    unet = copy.deepcopy(tiny_components["unet"]).double()
    add_adapters(
        unet,
        AdapterConfig(method="dora", rank=4, targets="attn+ff", adapter_dtype="float64", memory_saving=memory_saving),
    )
    randomize_adapters(unet, std=0.05)
    ckpt = copy.deepcopy(unet)
    ckpt.enable_gradient_checkpointing()
    unet.train()
    ckpt.train()
    inputs = unet_inputs(unet, dtype=torch.float64)
    grads, calls = [], []
    for model in (unet, ckpt):
        _, layer = next(iter(adapter_modules(model)))
        count = []
        layer.register_forward_hook(lambda *_, count=count: count.append(1))
        model(**inputs).sample.pow(2).mean().backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.requires_grad})
        calls.append(len(count))
    assert calls == [1, 2]  # checkpointing re-ran the layer in backward
    assert grads[0].keys() == grads[1].keys() and any(n.endswith("magnitude") for n in grads[0])
    for n, g in grads[0].items():
        torch.testing.assert_close(grads[1][n], g, rtol=1e-10, atol=1e-12, msg=n)
