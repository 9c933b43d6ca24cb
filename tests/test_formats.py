"""The diffusers/PEFT adapter file: exact round trips, diffusers' own loader as the oracle, bad files."""

import copy
import json

import pytest
import torch
from diffusers import StableDiffusionXLPipeline
from safetensors import safe_open
from safetensors.torch import save_file

from dora_diffusion import AdapterConfig, AdapterFileError, add_adapters, load_adapter, save_adapter, set_adapter_scale
from dora_diffusion.formats import WEIGHT_NAME, unload_adapter
from dora_diffusion.layers import AdapterLinear, adapter_modules
from helpers import randomize_adapters, text_ids, unet_inputs

COMPONENTS = ("unet", "text_encoder", "text_encoder_2")


def trained_pipe(tiny_components, method="dora", components=COMPONENTS, rank=4, alpha=8.0, targets="attn"):
    pipe = StableDiffusionXLPipeline(**copy.deepcopy(tiny_components))
    for i, comp in enumerate(components):
        add_adapters(getattr(pipe, comp), AdapterConfig(method=method, rank=rank, alpha=alpha, targets=targets))
        randomize_adapters(getattr(pipe, comp), seed=10 + i, std=0.2)
    return pipe


def outputs(pipe):
    """UNet output and both text encoders' outputs on fixed inputs."""
    with torch.no_grad():
        return (
            pipe.unet(**unet_inputs(pipe.unet)).sample,
            pipe.text_encoder(text_ids()).last_hidden_state,
            pipe.text_encoder_2(text_ids()).text_embeds,
        )


def fresh(tiny_components):
    return StableDiffusionXLPipeline(**copy.deepcopy(tiny_components))


@pytest.mark.parametrize("method", ["lora", "dora", "magnitude"])
@pytest.mark.parametrize("components", [("unet",), COMPONENTS])
def test_save_load_round_trip_is_exact(tiny_components, tmp_path, method, components):
    pipe = trained_pipe(tiny_components, method, components)
    file = save_adapter(pipe, tmp_path / "run")
    assert file.name == WEIGHT_NAME
    loaded = fresh(tiny_components)
    report = load_adapter(loaded, tmp_path / "run")
    assert set(report.layers) == set(components)
    assert all(report.method[c] == method for c in components)
    for ours, theirs in zip(outputs(pipe), outputs(loaded), strict=True):
        assert torch.equal(ours, theirs)


def test_file_keys_and_metadata(tiny_components, tmp_path):
    pipe = trained_pipe(tiny_components, "dora", alpha=16.0)
    file = save_adapter(pipe, tmp_path / "a.safetensors", metadata={"base_model": "tiny"})
    with safe_open(str(file), "pt") as f:
        keys, meta = set(f.keys()), f.metadata()
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    assert {f"unet.{q}.lora.down.weight", f"unet.{q}.lora.up.weight", f"unet.{q}.lora_magnitude_vector"} <= keys
    for te in ("text_encoder", "text_encoder_2"):  # canonical text_model. level, whatever transformers' naming
        base = f"{te}.text_model.encoder.layers.0.self_attn.q_proj"
        assert {f"{base}.lora_linear_layer.down.weight", f"{base}.lora_magnitude_vector.weight"} <= keys
    assert not any(".base." in k for k in keys)
    ours = json.loads(meta["dora_diffusion"])
    assert ours["magnitude_axis"] == "out" and ours["base_model"] == "tiny"
    assert ours["components"]["unet"] == {**ours["components"]["unet"], "method": "dora", "rank": 4, "alpha": 16.0}
    diffusers_meta = json.loads(meta["lora_adapter_metadata"])
    assert diffusers_meta["unet.lora_alpha"] == 16.0 and diffusers_meta["unet.use_dora"] is True


@pytest.mark.parametrize("method", ["lora", "dora", "magnitude"])
def test_diffusers_load_lora_weights_reproduces_our_outputs(tiny_components, tmp_path, method):
    # alpha != rank: the scale must come through diffusers' metadata path too.
    pipe = trained_pipe(tiny_components, method, alpha=12.0, targets="attn+ff")
    save_adapter(pipe, tmp_path)
    theirs = fresh(tiny_components)
    theirs.load_lora_weights(tmp_path)
    ours = outputs(pipe)
    base = outputs(fresh(tiny_components))
    for i, (mine, loaded) in enumerate(zip(ours, outputs(theirs), strict=True)):
        assert not torch.allclose(mine, base[i], atol=1e-4)  # the adapter does change this output
        torch.testing.assert_close(loaded, mine, rtol=1e-5, atol=1e-5)


def test_text_encoder_magnitudes_spelled_without_weight_are_dropped_by_diffusers(tiny_components, tmp_path):
    """Documents the ecosystem bug our key spelling avoids: with transformers 5, diffusers drops
    text-encoder keys ``...lora_magnitude_vector`` (no ``.weight``); our loader reads both."""
    pipe = trained_pipe(tiny_components, "dora", components=("text_encoder",))
    file = save_adapter(pipe, tmp_path)
    with safe_open(str(file), "pt") as f:
        tensors = {
            k.replace("lora_magnitude_vector.weight", "lora_magnitude_vector"): f.get_tensor(k) for k in f.keys()
        }
        meta = f.metadata()
    legacy = tmp_path / "legacy.safetensors"
    save_file(tensors, str(legacy), metadata=meta)
    ref = outputs(pipe)[1]
    theirs = fresh(tiny_components)
    theirs.load_lora_weights(str(legacy))
    diffusers_out = outputs(theirs)[1]
    ours = fresh(tiny_components)
    load_adapter(ours, legacy)
    torch.testing.assert_close(outputs(ours)[1], ref, rtol=0, atol=0)
    if torch.allclose(diffusers_out, ref, atol=1e-5):
        pytest.skip("this diffusers/transformers pair loads the legacy spelling: the workaround is no longer needed")
    assert not torch.allclose(diffusers_out, ref, atol=1e-3)


def test_load_scale(tiny_components, tmp_path):
    pipe = trained_pipe(tiny_components, "dora", components=("unet",))
    save_adapter(pipe, tmp_path)
    half = fresh(tiny_components)
    report = load_adapter(half, tmp_path, scale=0.5)
    assert all(a.scale == 0.5 for _, a in adapter_modules(half.unet)) and report.layers["unet"] > 0
    set_adapter_scale(pipe.unet, 0.5)
    assert torch.equal(outputs(half)[0], outputs(pipe)[0])
    assert not torch.allclose(outputs(half)[0], outputs(fresh(tiny_components))[0], atol=1e-4)


def test_load_replaces_previous_adapter_and_unload_restores_base(tiny_components, tmp_path):
    save_adapter(trained_pipe(tiny_components, "lora", ("unet",), targets="attn+ff"), tmp_path / "a")
    save_adapter(trained_pipe(tiny_components, "dora", ("unet",)), tmp_path / "b")
    pipe = fresh(tiny_components)
    load_adapter(pipe, tmp_path / "a")
    load_adapter(pipe, tmp_path / "b")
    ref = fresh(tiny_components)
    load_adapter(ref, tmp_path / "b")
    assert torch.equal(outputs(pipe)[0], outputs(ref)[0])
    assert {a.method for _, a in adapter_modules(pipe.unet)} == {"dora"}
    unload_adapter(pipe)
    assert not list(adapter_modules(pipe.unet))
    assert torch.equal(outputs(pipe)[0], outputs(fresh(tiny_components))[0])


def test_save_refuses_to_overwrite(tiny_components, tmp_path):
    pipe = trained_pipe(tiny_components, "lora", ("unet",))
    file = save_adapter(pipe, tmp_path)
    before = file.read_bytes()
    with pytest.raises(FileExistsError, match=str(file)):
        save_adapter(trained_pipe(tiny_components, "dora", ("unet",)), tmp_path)
    assert file.read_bytes() == before
    save_adapter(pipe, tmp_path, overwrite=True)
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp")]


# ---- bad files: each a clear error naming the file, the pipeline unchanged -------------------------


def _state(pipe):
    return {c: {k: v.clone() for k, v in getattr(pipe, c).state_dict().items()} for c in COMPONENTS}


def _assert_unchanged(pipe, before):
    for c in COMPONENTS:
        module = getattr(pipe, c)
        assert not any(isinstance(m, AdapterLinear) for m in module.modules())
        after = module.state_dict()
        assert after.keys() == before[c].keys() and all(torch.equal(after[k], v) for k, v in before[c].items())


@pytest.mark.parametrize("suffix", [".bin", ".pt", ".ckpt"])
def test_pickle_files_are_refused(tiny_components, tmp_path, suffix):
    bad = tmp_path / f"adapter{suffix}"
    bad.write_bytes(b"\x80\x04not really a pickle")
    pipe = fresh(tiny_components)
    before = _state(pipe)
    with pytest.raises(AdapterFileError, match=rf"{bad.name}.*pickle.*only \.safetensors"):
        load_adapter(pipe, bad)
    _assert_unchanged(pipe, before)


def test_folder_with_only_a_pickle_is_refused(tiny_components, tmp_path):
    (tmp_path / "pytorch_lora_weights.bin").write_bytes(b"x")
    with pytest.raises(AdapterFileError, match="pytorch_lora_weights.bin.*pickle"):
        load_adapter(fresh(tiny_components), tmp_path)


def test_truncated_and_garbage_files_are_clear_errors(tiny_components, tmp_path):
    file = save_adapter(trained_pipe(tiny_components, "dora", ("unet",)), tmp_path / "good.safetensors")
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(file.read_bytes()[: file.stat().st_size // 2])
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 64)
    pipe = fresh(tiny_components)
    before = _state(pipe)
    for bad in (truncated, garbage):
        with pytest.raises(AdapterFileError, match=bad.name):
            load_adapter(pipe, bad)
    _assert_unchanged(pipe, before)
    with pytest.raises(AdapterFileError, match="no such file"):
        load_adapter(pipe, tmp_path / "missing.safetensors")


def test_non_finite_adapter_loads_with_a_warning_naming_file_and_key(tiny_components, tmp_path):
    """A diverged run saves NaN/inf with the right shapes: it loads (what the user asked), but not silently."""
    from safetensors.torch import load_file

    pipe = trained_pipe(tiny_components, "dora", ("unet",))
    file = save_adapter(pipe, tmp_path / "run")
    with safe_open(str(file), "pt") as f:
        meta = f.metadata()
    tensors = load_file(str(file))
    bad_key = sorted(k for k in tensors if k.endswith("lora.up.weight"))[1]
    tensors[bad_key] = tensors[bad_key].clone()
    tensors[bad_key][0, 0] = float("nan")
    tensors[sorted(tensors)[-1]] = torch.full_like(tensors[sorted(tensors)[-1]], float("inf"))
    bad = tmp_path / "bad.safetensors"
    save_file(tensors, str(bad), metadata=meta)
    first = next(k for k in tensors if not torch.isfinite(tensors[k]).all())  # the file's order
    with pytest.warns(UserWarning, match=rf"bad\.safetensors.*{first}.*NaN or inf.*2 tensors") as caught:
        load_adapter(fresh(tiny_components), bad)
    assert len(caught) == 1
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a finite file: no warning
        load_adapter(fresh(tiny_components), file)


def test_adapter_for_another_architecture_is_refused(tiny_components, tmp_path):
    # An SD 1.5-style file: same module names, 768/320-wide layers that this UNet does not have.
    q = "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q"
    k = "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k"
    sd15 = {
        f"unet.{q}.lora.down.weight": torch.zeros(4, 640),
        f"unet.{q}.lora.up.weight": torch.zeros(640, 4),
        f"unet.{k}.lora.down.weight": torch.zeros(4, 768),
        f"unet.{k}.lora.up.weight": torch.zeros(640, 4),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.down.weight": torch.zeros(4, 320),
        "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.lora.up.weight": torch.zeros(320, 4),
    }
    file = tmp_path / "sd15.safetensors"
    save_file(sd15, str(file))
    pipe = trained_pipe(tiny_components, "lora", ("unet",))  # a pipeline that already has an adapter...
    y = outputs(pipe)[0]
    with pytest.raises(AdapterFileError, match=r"sd15\.safetensors.*does not fit.*another model"):
        load_adapter(pipe, file)
    assert torch.equal(outputs(pipe)[0], y)  # ...keeps it, untouched
    no_keys = tmp_path / "other.safetensors"
    save_file({"model.layers.0.q.weight": torch.zeros(2, 2)}, str(no_keys))
    with pytest.raises(AdapterFileError, match="no LoRA/DoRA keys"):
        load_adapter(pipe, no_keys)
